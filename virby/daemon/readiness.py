"""
Is the guest ready?  Ready means its sshd sends an SSH banner: a reachable API or a lease
says only that the VM exists, and upstream's authenticated ``ssh ... true`` check spent its
whole timeout on auth failures that a retry never fixes.

The wait re-reads the lease on every tick, so a stale lease from the previous boot gives way
to the fresh one, and it never has two probes in flight.  The lifecycle cancels it the moment
vfkit exits, and that stops everything at once.

Every millisecond between sshd starting to listen and the first banner at a waiting client
is time a build waits, and nothing tells the host that moment: it has to be polled.  A lease
lookup is a C{stat}, every 50 ms until the VM has a lease.  Then the guest is probed, one
connection attempt at a time.  Once it refuses one, its network is up and only sshd is
missing, which on a healthy boot is a matter of a second or two: for L{FAST_PROBING} seconds
from that first refusal, each refused probe is followed by the next after L{PROBE_INTERVAL}
(2 ms: 1 ms of waiting on average, for about 6% of a core, at 0.12 ms of CPU an attempt),
then after L{LATE_PROBE_INTERVAL}.  Nothing runs in between: no busy loop.  A probe that
fails otherwise (no answer, not SSH) is retried at the lease interval.

The probe that gets the banner keeps its connection, and the first waiting client gets it
(L{ReadyGuest}), so it does not wait for sshd to start a second session process: OpenSSH
takes 7 ms for that on an idle 2-core Linux machine (docs/benchmarks.md), and more under load.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IProtocol,
    ISystemHandle,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from virby.errors import VirbyError, oneLine
from virby.logs import Logger
from virby.reactors import IProbeReactor, IStreamTransport

log = Logger()

#: RFC 4253 lets a server send other lines before its banner; a short limit keeps a
#: non-SSH service from being read forever.
MAX_PREAMBLE = 1024

#: Seconds from a refused probe to the next while sshd is expected (see above).
PROBE_INTERVAL = 0.002

#: Seconds, from the guest's first refusal, of probing every L{PROBE_INTERVAL}.
FAST_PROBING = 5.0

#: Seconds from a refused probe to the next after that.
LATE_PROBE_INTERVAL = 0.02


class ProbeError(Exception):
    """The address answered, but not with an SSH banner."""


class BootTimeout(VirbyError):
    """
    The guest did not become reachable in time.

    @ivar reason: C{"no-lease"} or C{"no-ssh"}.
    """

    def __init__(self, reason: str, message: str, ip: str | None, last_error: str | None):
        super().__init__(message)
        self.reason = reason
        self.ip = ip
        self.last_error = last_error


class BannerProbe(Protocol):
    """
    Reads up to the SSH banner line, then stops reading and keeps the connection open: a
    L{ReadyGuest} lends it, already past the banner, to the first client that wants it.
    """

    # Set by makeConnection, before any event reaches this protocol.
    transport: IStreamTransport

    def __init__(self, result: Deferred[BannerProbe]) -> None:
        self._result = result
        self.received = b""
        self._scanned = 0
        self.banner: str | None = None
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        while (end := self.received.find(b"\n", self._scanned)) != -1:
            line = self.received[self._scanned : end]
            self._scanned = end + 1
            if line.startswith(b"SSH-"):
                self.banner = line.rstrip(b"\r").decode("ascii", "replace")
                self.transport.pauseProducing()
                if not self._result.called:
                    self._result.callback(self)
                return
        if len(self.received) > MAX_PREAMBLE:
            self._fail(ProbeError("answered without an SSH banner"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._fail(ProbeError("closed the connection before sending an SSH banner"))

    def _fail(self, error: Exception) -> None:
        if not self._result.called:
            self._result.errback(error)
        self.close()

    def close(self) -> None:
        if not self.lost:
            self.transport.loseConnection()

    def attach(self, protocol: IProtocol) -> None:
        """
        Hand the connection to C{protocol}: from now on the transport's events are its own.
        It still has to deliver L{received} (the guest's first bytes) before anything else.
        """
        transport = self.transport
        transport.protocol = protocol
        protocol.makeConnection(transport)

    def detach(self) -> socket.socket | None:
        """
        Take the connection's socket out of its transport, for a relay to drive; C{None}
        when the transport has none (a memory transport).  The transport stays paused and
        holds nothing: collected, it closes nothing.  The new owner still has to deliver
        L{received} first.
        """
        transport = self.transport
        handle = transport.getHandle() if ISystemHandle.providedBy(transport) else None
        if not isinstance(handle, socket.socket):
            return None
        transport.pauseProducing()
        self.lost = True
        return socket.socket(handle.family, handle.type, handle.proto, fileno=handle.detach())


class _BannerFactory(ClientFactory[BannerProbe]):
    noisy = False  # per-connection factory start/stop lines say nothing useful

    def __init__(self, result: Deferred[BannerProbe]) -> None:
        self._result = result

    def buildProtocol(self, addr: IAddress | None) -> BannerProbe:
        return BannerProbe(self._result)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self._result.called:
            self._result.errback(reason)


def probeBanner(
    reactor: IProbeReactor, host: str, port: int, timeout: float
) -> Deferred[BannerProbe]:
    """
    Connect to C{host:port} and fire, once the SSH banner line arrived, with the open
    connection (paused after the banner; close it or L{BannerProbe.attach} it); cancellable.
    """
    connector: list[IConnector] = []

    def cancel(_: Deferred[BannerProbe]) -> None:
        if connector:
            connector[0].disconnect()

    result: Deferred[BannerProbe] = Deferred(cancel)
    connector.append(reactor.connectTCP(host, port, _BannerFactory(result), timeout=timeout))
    result.addTimeout(timeout, reactor)
    return result


class ReadyGuest:
    """
    The guest's sshd answered: its address, and, until L{release}, the probe's connection.

    A client that waited for the boot would otherwise open a second connection and wait
    again for sshd to start a session process and send its banner (7 ms for OpenSSH 9.2 on
    an idle 2-core machine, more on a loaded guest); the probe's connection has that behind
    it.  The first client to
    L{claim} it gets it, the others connect anew.
    """

    def __init__(self, host: str, port: int, spare: BannerProbe | None = None) -> None:
        self.host = host
        self.port = port
        self._spare = spare

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def claim(self) -> BannerProbe | None:
        """The probe's open connection, once: C{None} when it is taken, released or lost."""
        spare, self._spare = self._spare, None
        if spare is None or spare.lost:
            return None
        return spare

    def release(self) -> None:
        """Close the probe's connection if no client claimed it."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()

    def __repr__(self) -> str:
        return f"<ReadyGuest {self.host}:{self.port}{' with a spare' if self._spare else ''}>"


class _GuestWait:
    """
    One wait for one boot: lease lookups every C{interval} until the VM has a lease, then
    banner probes, one at a time, each C{probeInterval} after the last one failed.
    """

    def __init__(
        self,
        reactor: IProbeReactor,
        lookup: Callable[[], str | None],
        port: int,
        timeout: float,
        interval: float,
        probeInterval: float,
        probeTimeout: float,
        what: str,
    ) -> None:
        self._reactor = reactor
        self._lookup = lookup
        self._port = port
        self._timeout = timeout
        self._interval = interval
        self._probeInterval = probeInterval
        self._firstRefusal: float | None = None
        self._probeTimeout = probeTimeout
        self._what = what
        self._probe: Deferred[BannerProbe] | None = None
        self._next: IDelayedCall | None = None
        self._stopped = False
        self._lastIP: str | None = None
        self._lastError: str | None = None
        self.result: Deferred[ReadyGuest] = Deferred(lambda _: self._stop())
        self._deadline: IDelayedCall | None = reactor.callLater(timeout, self._timedOut)
        self._tick()

    def _tick(self) -> None:
        self._next = None
        if self._stopped:
            return
        try:
            ip = self._lookup()
        except Exception:
            self._finish(Failure())
            return
        if ip is None:
            self._next = self._reactor.callLater(self._interval, self._tick)
            return
        if ip != self._lastIP:
            log.debug("the VM has a lease for {ip}", ip=ip)
        self._lastIP = ip
        self._probe = probe = probeBanner(self._reactor, ip, self._port, self._probeTimeout)
        probe.addCallbacks(self._answered, self._probeFailed, callbackArgs=(ip,))

    def _answered(self, spare: BannerProbe, ip: str) -> None:
        self._probe = None
        log.debug("{ip} answered {banner}", ip=ip, banner=spare.banner)
        if self._stopped:
            spare.close()
            return
        self._finish(ReadyGuest(ip, self._port, spare))

    def _probeFailed(self, reason: Failure) -> None:
        self._probe = None
        if not reason.check(CancelledError) or self._lastError is None:
            self._lastError = oneLine(reason)
        if not self._stopped:
            self._next = self._reactor.callLater(self._retryAfter(reason), self._tick)

    def _retryAfter(self, reason: Failure) -> float:
        """Fast while a refusal says the guest is up and its sshd is coming (see above)."""
        if not reason.check(ConnectionRefusedError):
            return self._interval
        now = self._reactor.seconds()
        if self._firstRefusal is None:
            self._firstRefusal = now
        if now - self._firstRefusal < FAST_PROBING:
            return self._probeInterval
        return max(self._probeInterval, LATE_PROBE_INTERVAL)

    def _timedOut(self) -> None:
        self._deadline = None
        if self._lastIP is None:
            error = BootTimeout(
                "no-lease",
                f"no DHCP lease for {self._what} within {self._timeout:.0f}s; on macOS allow "
                "bootpd through the firewall, and let the guest send its MAC as DHCP client id",
                None,
                None,
            )
        else:
            error = BootTimeout(
                "no-ssh",
                f"the VM at {self._lastIP} did not answer SSH on port {self._port} within "
                f"{self._timeout:.0f}s (last error: {self._lastError or 'none'})",
                self._lastIP,
                self._lastError,
            )
        self._finish(Failure(error))

    def _stop(self) -> None:
        self._stopped = True
        for call in (self._next, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._next = self._deadline = None
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.cancel()

    def _finish(self, result: ReadyGuest | Failure) -> None:
        self._stop()
        if not self.result.called:
            if isinstance(result, Failure):
                self.result.errback(result)
            else:
                self.result.callback(result)
        elif isinstance(result, ReadyGuest):
            result.release()


def waitForGuest(
    reactor: IProbeReactor,
    lookup: Callable[[], str | None],
    port: int,
    timeout: float,
    interval: float = 0.05,
    probeInterval: float = PROBE_INTERVAL,
    probeTimeout: float = 2.0,
    what: str = "the VM",
) -> Deferred[ReadyGuest]:
    """
    Fire with the L{ReadyGuest} once its sshd answers on C{port}.

    @param lookup: the lease lookup; an exception from it (an unreadable lease file) ends
        the wait at once with that error.
    @param interval: seconds between lease lookups while the VM has no lease.
    @param probeInterval: seconds from a refused probe to the next, while sshd is expected.
    @param what: how the no-lease message names the VM (its MAC and the lease file).
    @return: a cancellable Deferred; it fails with L{BootTimeout} after C{timeout} seconds.
    """
    return _GuestWait(
        reactor, lookup, port, timeout, interval, probeInterval, probeTimeout, what
    ).result
