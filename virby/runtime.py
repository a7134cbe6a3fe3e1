"""
Small file helpers for the daemon's runtime files in the working directory, run on the
reactor.  L{writeAtomically} is the disks' own (L{virby.disk}), which is fit for the reactor
for the few bytes of a pidfile or a MAC: a few milliseconds at most, once per boot.
"""

from __future__ import annotations

import contextlib
import os

from virby.disk import writeAtomically

__all__ = ["removeQuietly", "writeAtomically"]


def removeQuietly(path: str) -> None:
    """Remove a runtime file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
