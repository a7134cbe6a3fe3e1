"""Small file helpers for the daemon's runtime files in the working directory."""

from __future__ import annotations

import contextlib
import os


def write_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """
    Write C{data} to C{path} so that readers see the old content or the new, never half:
    a crash while writing a pidfile must not leave a pid that names nothing.
    """
    temporary = f"{path}.tmp.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def remove_quietly(path: str) -> None:
    """Remove a runtime file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
