"""
The daemon's control endpoint: an owner-only unix socket in the working directory that
answers every connection with one JSON line describing the daemon, then closes.

A unix socket (not a TCP port) because upstream's control API on 127.0.0.1 let any local
user stop the VM; here the working directory (0700) and the socket (0600) keep it to the
daemon's user and root.

Two daemons are kept off one working directory by L{DAEMON_LOCK}, an flock the kernel drops
when the daemon dies (L{virby.locks}), not by the socket: so whatever is found at the
socket's path by a daemon that holds the lock is left over from a dead one, and replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IReactorUNIX
from twisted.internet.protocol import Factory, Protocol

from virby.logs import Logger

log = Logger()

#: The control socket's name inside the working directory.
CONTROL_SOCKET = "control.sock"

#: The lock one daemon per working directory holds for its whole life.
DAEMON_LOCK = "daemon.lock"

#: Older daemons locked the socket with a symlink naming their pid; it is junk now.
_OLD_SOCKET_LOCK = CONTROL_SOCKET + ".lock"


class StatusProtocol(Protocol):
    """Write the status document and hang up: there is nothing to ask but "how are you"."""

    factory: ControlFactory

    def connectionMade(self) -> None:
        try:
            document = self.factory.describe()
        except Exception:
            log.failure("building the status document failed")
            document = {"state": "unknown", "last_error": "status failed: see the daemon log"}
        self.transport.write(json.dumps(document, sort_keys=True).encode() + b"\n")
        self.transport.loseConnection()


class ControlFactory(Factory):
    noisy = False  # per-connection factory start/stop lines say nothing useful

    protocol = StatusProtocol

    def __init__(self, describe: Callable[[], dict[str, Any]]) -> None:
        self.describe = describe


class StaleSocketError(Exception):
    """What is at the control socket's path cannot be replaced; the message says why."""


def clearStaleSocket(path: str) -> None:
    """
    Remove what a dead daemon left at C{path} (its socket, or any junk file), and the pid
    symlink an older version used as its lock.  Only a daemon holding L{DAEMON_LOCK} may
    call this: no live daemon can be using the path then.

    @raise StaleSocketError: when C{path} is a directory or cannot be removed.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(info.st_mode):
            raise StaleSocketError(f"{path} is a directory, not the control socket: remove it")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StaleSocketError(f"cannot replace {path}: {e.strerror or e}") from None
    old = os.path.join(os.path.dirname(path), _OLD_SOCKET_LOCK)
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(old).st_mode):
            os.unlink(old)


def controlEndpoint(reactor: IReactorUNIX, path: str) -> UNIXServerEndpoint:
    """
    Owner-only.  Not locked by pid (L{DAEMON_LOCK} keeps a second daemon away), so a stale
    pid can never stop a start.
    """
    return UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=False)
