"""
What a Mac's Python lacks, taken away from this one, for the test mode that plays Nix's
macOS build sandbox (see tests/conftest.py).  Loaded as C{sitecustomize} in every Python
process the tests start (the directory is put on C{PYTHONPATH}), and by the test process
itself:

 - a unix socket path: on macOS C{sun_path} holds 104 bytes with its NUL, so CPython refuses
   a path of 104 bytes or more ("AF_UNIX path too long") before any system call; Linux
   allows 107, which would hide every path that breaks on a Mac;
 - abstract unix socket names: only Linux has them (CPython reads a leading NUL so under
   C{#ifdef __linux__} alone); elsewhere the name is a path, which the kernel reads as the
   empty string and does not find;
 - C{os.splice} and C{select.epoll}, which CPython builds on Linux only.
"""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import os
import select
import socket
import sys

#: The longest unix socket path macOS takes, in bytes (104 less the NUL).
MAX_PATH = 103
#: What CPython has on Linux alone, by module.
LINUX_ONLY = {os: ("splice",), select: ("epoll",)}


def _check(sock: socket.socket, address: object) -> None:
    if sock.family != socket.AF_UNIX or not isinstance(address, (str, bytes)):
        return
    raw = os.fsencode(address)
    if len(raw) > MAX_PATH:
        # What CPython raises on macOS for a path too long for sun_path.
        raise OSError("AF_UNIX path too long")
    if raw[:1] == b"\0":
        # XNU copies sun_path up to its NUL and looks up "": no such file.
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))


def install() -> None:
    """Make this Python lack what a Mac's lacks (once per process)."""
    if getattr(socket.socket, "_virby_macos_limit", False):
        return
    for name in ("bind", "connect", "connect_ex"):
        original = getattr(socket.socket, name)

        def limited(self, address, _original=original, _name=name):
            try:
                _check(self, address)
            except FileNotFoundError as e:
                if _name == "connect_ex":
                    return e.errno  # connect_ex reports what the kernel says
                raise
            return _original(self, address)

        limited.__name__ = name
        setattr(socket.socket, name, limited)
    # A mark of our own on the class, that the limits are in place: not one of its attributes.
    socket.socket._virby_macos_limit = True  # type: ignore[attr-defined]
    for module, names in LINUX_ONLY.items():
        for name in names:
            if hasattr(module, name):
                delattr(module, name)


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
