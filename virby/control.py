"""
The daemon's control endpoint: an owner-only unix socket in the working directory that
answers every connection with one JSON line describing the daemon, then closes.

A unix socket (not a TCP port) because upstream's control API on 127.0.0.1 let any local
user stop the VM; here the working directory (0700) and the socket (0600) keep it to the
daemon's user and root.  The same socket's lock file keeps two daemons off one working
directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IReactorUNIX
from twisted.internet.protocol import Factory, Protocol

from virby.logs import Logger

log = Logger()

#: The control socket's name inside the working directory.
CONTROL_SOCKET = "control.sock"


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


def controlEndpoint(reactor: IReactorUNIX, path: str) -> UNIXServerEndpoint:
    """
    Owner-only, and locked by pid: a second daemon on the same working directory fails to
    listen instead of stealing the first one's socket.
    """
    return UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
