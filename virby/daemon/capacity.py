"""
How many connections one daemon serves at once, and what happens past that.

Two limits decide it, and the daemon sets both at start instead of inheriting whatever it
was given:

  - The accept queue.  Connections that arrive while the daemon is busy wait in the kernel's
    queue of the listening socket; when it is full, Linux drops them in a way the client
    cannot see (with SYN cookies the client believes it is connected, and an SSH client,
    which waits for the server to speak first, then hangs forever).  Twisted's C{tcp:}
    endpoint asks for 50; launchd asks for the kernel's maximum.  The daemon asks again
    for L{BACKLOG} on every listening socket, adopted ones included: C{listen(2)} on a
    socket that already listens sets its queue length anew, on Linux and on macOS (XNU's
    C{solisten}), and the kernel caps it (Linux C{net.core.somaxconn}, 4096 by default;
    macOS C{kern.ipc.somaxconn}, 128 by default).
  - Open files.  A spliced connection holds two descriptors (the client's and the guest's),
    and launchd starts jobs with a soft limit of 256.  The daemon raises its soft limit as
    far as the hard limit and its reactor allow (L{adjustDescriptorLimit}) and splits it in
    one budget (L{DescriptorLimit}): L{RESERVED_DESCRIPTORS} for everything else, on Linux
    an eighth for the relay's pipes (L{pipesWithin}, two descriptors a pipe, lent to the
    chunks in flight: L{virby.daemon.relay.PipePool}), and the rest, two each, for connections.
    Past that, L{ConnectionLimit} stops accepting, as HAProxy's C{maxconn} does: new
    connections wait in the accept queue and are served as others end, and the log says
    when and for how long.

The reactor matters on macOS: Twisted's default reactor there is the select reactor, and
C{select(2)} cannot watch a descriptor numbered C{FD_SETSIZE} (1024) or above (CPython
raises C{ValueError}, and the select reactor would drop such connections one by one).
Under that reactor the soft limit is held at 1024, so no descriptor ever gets that high.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from zope.interface import implementer

from virby.logs import Logger

log = Logger()

#: The accept queue asked for on every listening socket (the kernel caps it).
BACKLOG = 1024
#: The soft open-file limit asked for: room for 2000 connections, far more than builds.
WANTED_DESCRIPTORS = 4096
#: Descriptors kept for all but splices: stdio, the log, the listening and control sockets,
#: vfkit's pipes and lock, the REST client, readiness probes, the lease file, status
#: queries, Twisted's own (its waker, its reserve for EMFILE).
RESERVED_DESCRIPTORS = 64
#: The relay's pipes may hold up to an eighth of the open files: two descriptors a pipe,
#: within these bounds.
PIPE_SHARE = 8
MIN_PIPES = 4
MAX_PIPES = 256
#: C{select(2)} cannot watch descriptors at or above C{FD_SETSIZE}.
SELECT_CEILING = 1024
#: One warning per this many seconds while connections are refused, with their count.
WARNING_INTERVAL = 10.0


def pipesWithin(soft: int) -> int:
    """How many pipes the relay's pool may hold under a soft open-file limit of C{soft}."""
    return max(MIN_PIPES, min(MAX_PIPES, soft // (2 * PIPE_SHARE)))


@dataclass(frozen=True)
class DescriptorLimit:
    """
    The open-file limit the daemon runs with, and how it is spent: the one budget that the
    connection limit and the relay's pipe pool both read, so together they stay within it.

    @ivar before: the soft limit it was started with.
    @ivar soft: the soft limit now.
    @ivar hard: the hard limit, C{None} when unlimited.
    @ivar ceiling: what the reactor can watch, C{None} when it has no limit.
    @ivar problem: why the soft limit could not be set as wanted, if it could not.
    @ivar pipes: how many pipes the relay may hold (0 where it does not splice).
    """

    before: int
    soft: int
    hard: int | None
    ceiling: int | None
    problem: str | None = None
    pipes: int = 0

    @property
    def connections(self) -> int:
        """How many connections fit: two descriptors each, after the reserve and the pipes."""
        return max(1, (self.soft - RESERVED_DESCRIPTORS - 2 * self.pipes) // 2)

    def why(self) -> str:
        """Why L{connections} is the most: what the budget gives them, in a few words."""
        pipes = f", beside {self.pipes} pipes of two" if self.pipes else ""
        return f"two open files each{pipes}, and its open-file limit is {self.soft}"

    def describe(self) -> str:
        hard = "unlimited" if self.hard is None else str(self.hard)
        text = (
            f"open files: {self.soft} (started with {self.before}, hard limit {hard}); "
            f"serving up to {self.connections} connections at once"
        )
        if self.pipes:
            text += f", beside up to {self.pipes} pipes for splice(2)"
        if self.ceiling is not None and self.soft >= self.ceiling:
            text += f" (the select reactor watches descriptors below {self.ceiling} only)"
        if self.problem:
            text += f"; {self.problem}"
        return text


def reactorCeiling(reactor: object) -> int | None:
    """The highest descriptor count C{reactor} can watch, or C{None} when unbounded."""
    from twisted.internet.selectreactor import SelectReactor

    return SELECT_CEILING if isinstance(reactor, SelectReactor) else None


def adjustDescriptorLimit(
    reactor: object,
    wanted: int = WANTED_DESCRIPTORS,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    *,
    splicing: bool = False,
) -> DescriptorLimit:
    """
    Raise the soft open-file limit to C{wanted} (never lowering one set higher), within the
    hard limit, and hold it at the reactor's ceiling when it has one (lowering it if need be).

    @param splicing: whether the relay moves bytes through pipes (L{pipesWithin} of them).
    """
    limit = _adjusted(reactor, wanted, getrlimit, setrlimit)
    if not splicing:
        return limit
    return replace(limit, pipes=pipesWithin(limit.soft))


def _adjusted(
    reactor: object,
    wanted: int,
    getrlimit: Callable[[int], tuple[int, int]],
    setrlimit: Callable[[int, tuple[int, int]], None],
) -> DescriptorLimit:
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    ceiling = reactorCeiling(reactor)
    target = wanted if soft == infinite else max(soft, wanted)
    if ceiling is not None:
        target = ceiling
    if hard != infinite:
        target = min(target, hard)
    limit = DescriptorLimit(soft, soft, None if hard == infinite else hard, ceiling)
    if target == soft:
        return limit
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        return DescriptorLimit(
            soft, soft, limit.hard, ceiling, f"it could not be set to {target}: {e}"
        )
    return DescriptorLimit(soft, target, limit.hard, ceiling)


def kernelBacklogCap() -> tuple[int, str] | None:
    """The kernel's cap on an accept queue and the setting that holds it, if known."""
    if sys.platform.startswith("linux"):
        with (
            contextlib.suppress(OSError, ValueError),
            open("/proc/sys/net/core/somaxconn", encoding="ascii") as f,
        ):
            return int(f.read().strip()), "net.core.somaxconn"
    elif sys.platform == "darwin":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            value = ctypes.c_int(0)
            size = ctypes.c_size_t(ctypes.sizeof(value))
            name = b"kern.ipc.somaxconn"
            if libc.sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, 0) == 0:
                return value.value, "kern.ipc.somaxconn"
    return None


def widenAcceptQueue(port: IListeningPort, backlog: int = BACKLOG) -> bool:
    """
    Ask for an accept queue of C{backlog} on a listening TCP port, adopted or not.

    @return: whether the port had a stream socket to ask on.
    """
    sock = getattr(port, "socket", None)
    if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
        return False
    try:
        sock.listen(backlog)
    except OSError as e:
        log.warn("cannot widen the accept queue of {port}: {why}", port=port, why=e)
        return False
    return True


@runtime_checkable
class Pausable(Protocol):
    """A listening port that can stop and resume accepting (Twisted's C{tcp.Port} can)."""

    numberAccepts: int

    def stopReading(self) -> None: ...

    def startReading(self) -> None: ...


@implementer(IProtocolFactory, ILoggingContext)
class ConnectionLimit:
    """
    Serves at most C{limit} connections at once through C{wrapped}, as HAProxy's C{maxconn}
    does: at the limit, the listening ports (L{attach}) stop accepting, and what arrives
    waits in the kernel's accept queue (L{BACKLOG}) until a connection ends (L{ended}).
    Nothing is closed for want of room, and nothing hangs that would not have: a client
    held back is served once another leaves.

    A connection that still arrives at the limit (from another port, or before any port is
    attached) is closed at once (returning C{None} makes the port close the socket).  The
    log says when accepting stops and resumes, how long it was held and how many were
    closed, each count whole: one line per L{WARNING_INTERVAL} at most while they go on.

    @param count: how many connections are open now.
    """

    def __init__(
        self,
        wrapped: IProtocolFactory,
        limit: int,
        count: Callable[[], int],
        clock: IReactorTime,
        why: str,
    ) -> None:
        self.wrapped = wrapped
        self.limit = limit
        self._count = count
        self._clock = clock
        self._why = why
        self._ports: list[Pausable] = []
        self._pausedAt: float | None = None
        self._lastWarning: float | None = None
        self._unreported = 0
        self._flush: IDelayedCall | None = None
        self._clamp: IDelayedCall | None = None
        self.refused = 0
        self.pauses = 0

    def logPrefix(self) -> str:
        """The splice's name, so the port's log lines read as they did."""
        return type(self.wrapped).__name__

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        for call in (self._flush, self._clamp):
            if call is not None and call.active():
                call.cancel()
        self._flush = self._clamp = None
        self._report()
        self.wrapped.doStop()

    @property
    def paused(self) -> bool:
        return self._pausedAt is not None

    def attach(self, ports: Sequence[object]) -> None:
        """The ports to pause at the limit: those that can be (Twisted's TCP and unix)."""
        self._ports = [port for port in ports if isinstance(port, Pausable)]
        self._clampAccepts()

    def detach(self) -> None:
        """The daemon retires: the ports must stay paused, whatever ends from now on."""
        self._ports = []

    def _room(self) -> int:
        return self.limit - self._count()

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if self._room() > 0:
            protocol = self.wrapped.buildProtocol(addr)
            if protocol is not None:
                self._scheduleClamp()
                # The wrapped factory counts this one from its connectionMade, which the
                # port calls after this returns (and before it accepts the next).
                if self._room() <= 1:
                    self._pause()
            return protocol
        self.refused += 1
        self._unreported += 1
        now = self._clock.seconds()
        if self._lastWarning is None or now - self._lastWarning >= WARNING_INTERVAL:
            log.warn(
                "closing a new connection from {peer}: {limit} are open, the most this "
                "daemon serves at once ({why})",
                peer=addr,
                limit=self.limit,
                why=self._why,
            )
            self._lastWarning = now
            self._unreported = 0
            self._flush = self._clock.callLater(WARNING_INTERVAL, self._flushed)
        return None

    def _flushed(self) -> None:
        self._flush = None
        self._report()

    def _report(self) -> None:
        """Say how many more were closed since the last line, if any were."""
        if self._unreported:
            log.warn(
                "closed {count} more new connections at the limit of {limit} (in all "
                "{refused} since the daemon started)",
                count=self._unreported,
                limit=self.limit,
                refused=self.refused,
            )
            self._unreported = 0
            self._lastWarning = self._clock.seconds()

    def ended(self) -> None:
        """A connection ended: there is room again, so the ports accept again."""
        if self._pausedAt is None or self._room() <= 0:
            return
        held = self._clock.seconds() - self._pausedAt
        self._pausedAt = None
        self._clampAccepts()
        for port in self._ports:
            port.startReading()
        log.info(
            "accepting again: new connections waited in the accept queue for {held:.1f} s "
            "while {limit} were open",
            held=held,
            limit=self.limit,
        )

    def _pause(self) -> None:
        if self._pausedAt is not None or not self._ports:
            return
        self._pausedAt = self._clock.seconds()
        self.pauses += 1
        for port in self._ports:
            port.stopReading()
        log.warn(
            "holding new connections in the accept queue: {limit} are open, the most this "
            "daemon serves at once ({why}); they are accepted as others end",
            limit=self.limit,
            why=self._why,
        )

    def _scheduleClamp(self) -> None:
        if self._clamp is None:
            self._clamp = self._clock.callLater(0, self._clamped)

    def _clamped(self) -> None:
        self._clamp = None
        self._clampAccepts()

    def _clampAccepts(self) -> None:
        """
        Twisted's port accepts up to C{numberAccepts} connections in one event, and asks the
        factory only after each C{accept}: kept within the room left, none of them is
        accepted only to be closed.  (It grows the number again after each event; this runs
        before the next.)
        """
        room = max(1, self._room())
        for port in self._ports:
            if getattr(port, "numberAccepts", 0) > room:
                port.numberAccepts = room
