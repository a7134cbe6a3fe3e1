"""
The daemon's control endpoint: an owner-only unix socket in the working directory that
takes one request and gives one reply per connection.

A unix socket (not a TCP port) because upstream's control API on 127.0.0.1 let any local
user stop the VM; here the working directory (0700) and the socket (0600) keep it to the
daemon's user and root, and the daemon checks the peer's credentials as well (a socket
whose mode was loosened, or a directory opened with allow-user-ssh, lets no one else in).

The protocol's wire format (version 1, C{docs/control.md}) is L{virby.wire}'s, shared with
the commands that ask.  A request must arrive within L{REQUEST_TIMEOUT} seconds
and be at most L{MAX_REQUEST} bytes: a client that sends nothing, or megabytes, is told so
and cut off.  A client may end its request with the end of its input instead of a newline
(C{nc -N}, C{socat}, C{printf} without one): the connection is half-closeable, so what it
sent is answered on the half still open.

Two daemons are kept off one working directory by L{virby.layout.DAEMON_LOCK}, an flock the
kernel drops when the daemon dies (L{virby.locks}), not by the socket: so whatever is found
at the socket's path by a daemon that holds the lock is left over from a dead one, and
replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import pwd
import socket
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
    IReactorUNIX,
    ISystemHandle,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from virby.daemon.capacity import BACKLOG
from virby.errors import VirbyError
from virby.layout import OLD_SOCKET_LOCK
from virby.logs import Logger
from virby.wire import (
    MAX_REQUEST,
    Request,
    RequestError,
    encodeReply,
    errorReply,
    parseRequest,
)

log = Logger()

#: How long a client has to send its request once connected.
REQUEST_TIMEOUT = 5.0
#: How long a reply may take to be read once written, before the connection is cut.
REPLY_TIMEOUT = 10.0


class Commands(TypingProtocol):
    """What the control socket can ask of the daemon (L{virby.daemon.service.DaemonService})."""

    def status(self) -> dict[str, Any]: ...

    def start(self) -> Deferred[dict[str, Any]]: ...

    def stop(self, force: bool) -> Deferred[dict[str, Any]]: ...

    def renew(self, package: str | None) -> Deferred[dict[str, Any]]: ...


# -- who is asking


def socketPeerUid(sock: socket.socket) -> int | None:
    """
    The uid of the process at the other end of a unix socket: C{SO_PEERCRED} on Linux,
    C{getpeereid(2)} (which reads C{LOCAL_PEERCRED}) on macOS and the BSDs; C{None} when
    the system will not say.
    """
    if sys.platform.startswith("linux"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
    getpeereid = _getpeereid()
    if getpeereid is None:
        return None
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        return None
    return uid.value


@functools.cache
def _getpeereid() -> Any:
    """libc's C{getpeereid}, looked up once for the daemon's life, or C{None} without one."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return getattr(libc, "getpeereid", None)


def transportPeerUid(transport: ITransport | None) -> int | None:
    """L{socketPeerUid} of a Twisted unix-socket transport."""
    handle = transport.getHandle() if ISystemHandle.providedBy(transport) else None
    if not isinstance(handle, socket.socket):
        return None
    try:
        return socketPeerUid(handle)
    except OSError:
        return None


def _userName(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# -- the server


@implementer(IHalfCloseableProtocol)
class ControlProtocol(Protocol):
    """
    One request, one reply, then hang up.

    Half-closeable: a client's end of input ends its request (or says it sent none), and
    the reply still goes out on the half it keeps open.  A client's full close reads the
    same as its half-close, so a client that leaves while its C{start} waits is noticed
    when its reply is written, not before; the boot goes on either way.
    """

    factory: ControlFactory
    # A unix socket's transport is Twisted's TCP one, with abortConnection.
    transport: ITCPTransport | None

    def __init__(self) -> None:
        self._buffer = b""
        self._extra = 0
        self._request: Deferred[dict[str, Any]] | None = None
        self._deadline: IDelayedCall | None = None
        self._answered = False

    def connectionMade(self) -> None:
        uid = self.factory.peerUid(self.transport)
        if uid is None or uid not in self.factory.allowed:
            who = "someone the system would not name" if uid is None else f"uid {uid}"
            log.info("refused a control request from {who}", who=who)
            self._reply(
                errorReply(
                    f"only root and the daemon's user ({self.factory.ownerName}) may "
                    "ask the daemon: run the command with sudo"
                )
            )
            return
        self._deadline = self.factory.clock.callLater(REQUEST_TIMEOUT, self._tooSlow)

    def dataReceived(self, data: bytes) -> None:
        if self._answered or self._request is not None:
            # One request per connection: what follows it is ignored, up to a bound.
            self._extra += len(data)
            if self._extra > MAX_REQUEST:
                self._cutOff()
            return
        self._buffer += data
        newline = self._buffer.find(b"\n")
        if newline < 0 and len(self._buffer) < MAX_REQUEST:
            return
        if newline < 0 or newline >= MAX_REQUEST:
            self._reply(errorReply(f"the request is longer than {MAX_REQUEST} bytes"))
            return
        line, self._buffer = self._buffer[:newline], b""
        self._handle(line)

    def readConnectionLost(self) -> None:
        """
        The client sent all it will: what came without its newline is the request, and
        nothing at all is answered as such.  A request already taken goes on.
        """
        if self._answered or self._request is not None:
            return
        line, self._buffer = self._buffer, b""
        if not line.strip():
            self._reply(errorReply("the input ended before a request: send one JSON object"))
            return
        self._handle(line)

    def writeConnectionLost(self) -> None:
        """The client will read nothing more: its reply cannot be delivered."""
        if self.transport is not None:
            self.transport.loseConnection()

    def _handle(self, line: bytes) -> None:
        """Run one request line and reply with its outcome."""
        self._cancelDeadline()
        try:
            request = parseRequest(line)
        except RequestError as e:
            self._reply(errorReply(str(e)))
            return
        self._request = maybeDeferred(self._run, request)
        self._request.addCallbacks(lambda reply: {"ok": True, **reply}, _explain)
        self._request.addCallback(self._reply)

    def _run(self, request: Request) -> Deferred[dict[str, Any]]:
        commands = self.factory.commands
        if request.command == "status":
            return succeed({"status": commands.status()})
        if request.command == "start":
            return commands.start()
        if request.command == "renew":
            return commands.renew(request.package)
        return commands.stop(request.force)

    def _tooSlow(self) -> None:
        self._deadline = None
        self._reply(errorReply(f"no request within {REQUEST_TIMEOUT:.0f}s"))

    def _reply(self, reply: dict[str, Any]) -> None:
        if self._answered or self.transport is None:
            return
        self._answered = True
        self._cancelDeadline()
        self.transport.write(encodeReply(reply))
        self.transport.loseConnection()
        # A client that does not read its reply does not keep the connection forever.
        self._deadline = self.factory.clock.callLater(REPLY_TIMEOUT, self._cutOff)

    def _cutOff(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self.transport.abortConnection()

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelDeadline()
        self._answered = True
        if self._request is not None and not self._request.called:
            # The client left: withdraw its wait; a boot or a stop under way goes on.
            self._request.cancel()


def _explain(reason: Failure) -> dict[str, Any]:
    """An expected failure is its own line; anything else is a bug, logged in full."""
    if reason.check(CancelledError):
        return errorReply("cancelled")
    if isinstance(reason.value, VirbyError):
        return errorReply(str(reason.value))
    log.failure("a control request failed", reason)
    return errorReply("the request failed: see the daemon's log")


class ControlFactory(Factory[ControlProtocol]):
    """
    @param commands: what requests act on.
    @param clock: for the request and reply timeouts.
    @param peerUid: who is at the other end of a connection (L{transportPeerUid}).
    @param allowed: the uids that may ask: root and the daemon's own.
    """

    noisy = False  # per-connection factory start/stop lines say nothing useful

    protocol = ControlProtocol

    def __init__(
        self,
        commands: Commands,
        clock: IReactorTime,
        peerUid: Callable[[ITransport | None], int | None] = transportPeerUid,
        allowed: frozenset[int] | None = None,
    ) -> None:
        self.commands = commands
        self.clock = clock
        self.peerUid = peerUid
        self.owner = os.geteuid()
        # Looked up once, before the reactor runs: the user database can be slow on a Mac
        # (opendirectoryd, network accounts), and a refusal must not wait on it.
        self.ownerName = _userName(self.owner)
        self.allowed = allowed if allowed is not None else frozenset({0, self.owner})


class StaleSocketError(Exception):
    """What is at the control socket's path cannot be replaced; the message says why."""


def clearStaleSocket(path: str) -> None:
    """
    Remove what a dead daemon left at C{path} (its socket, or any junk file), and the pid
    symlink an older version used as its lock.  Only a daemon holding
    L{virby.layout.DAEMON_LOCK} may call this: no live daemon can be using the path then.

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
    old = os.path.join(os.path.dirname(path), OLD_SOCKET_LOCK)
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(old).st_mode):
            os.unlink(old)


def controlEndpoint(reactor: IReactorUNIX, path: str) -> UNIXServerEndpoint:
    """
    Owner-only.  Not locked by pid (L{virby.layout.DAEMON_LOCK} keeps a second daemon away),
    so a stale pid can never stop a start.

    Its accept queue is the builder's (L{BACKLOG}), not Twisted's 50: a hundred commands
    asking at once (a monitor, a script in a loop) queue instead of being refused.
    """
    return UNIXServerEndpoint(reactor, path, backlog=BACKLOG, mode=0o600, wantPID=False)
