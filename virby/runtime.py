"""Small file helpers for the daemon's runtime files in the working directory."""

from __future__ import annotations

import contextlib
import os

from virby.disk import write_atomically

__all__ = ["remove_quietly", "write_atomically"]


def remove_quietly(path: str) -> None:
    """Remove a runtime file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
