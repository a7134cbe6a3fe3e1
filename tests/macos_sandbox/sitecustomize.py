"""
macOS's unix socket path limit, for the test mode that plays Nix's macOS build sandbox
(see tests/conftest.py).  On macOS C{sun_path} holds 104 bytes with its NUL, so a path of
more than 103 bytes cannot be bound or connected to; Linux allows 107, which would hide
every path that breaks on a Mac.  Loaded as C{sitecustomize} in every Python process the
tests start (the directory is put on C{PYTHONPATH}), and by the test process itself.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import socket
import sys

#: The longest unix socket path macOS takes, in bytes (104 less the NUL).
MAX_PATH = 103


def _check(sock: socket.socket, address: object) -> None:
    if sock.family != socket.AF_UNIX or not isinstance(address, (str, bytes)):
        return
    raw = os.fsencode(address)
    if raw[:1] != b"\0" and len(raw) > MAX_PATH:
        # What CPython raises on macOS for a path too long for sun_path.
        raise OSError("AF_UNIX path too long")


def install() -> None:
    """Make bind, connect and connect_ex refuse what macOS refuses (once per process)."""
    if getattr(socket.socket, "_virby_macos_limit", False):
        return
    for name in ("bind", "connect", "connect_ex"):
        original = getattr(socket.socket, name)

        def limited(self, address, _original=original):
            _check(self, address)
            return _original(self, address)

        limited.__name__ = name
        setattr(socket.socket, name, limited)
    socket.socket._virby_macos_limit = True


def _chain() -> None:
    """Run the C{sitecustomize} this one hides, if there is one further down sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    install()
    _chain()
