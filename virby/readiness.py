"""
Is the guest ready?  Ready means its sshd sends an SSH banner: a reachable API or a lease
says only that the VM exists, and upstream's authenticated ``ssh ... true`` check spent its
whole timeout on auth failures that a retry never fixes.

The wait re-reads the lease on every tick, so a stale lease from the previous boot gives way
to the fresh one, and it never has two probes in flight.  The lifecycle cancels it the moment
vfkit exits, and that stops everything at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from virby.errors import VirbyError
from virby.logs import Logger

log = Logger()

#: RFC 4253 lets a server send other lines before its banner; a short limit keeps a
#: non-SSH service from being read forever.
MAX_PREAMBLE = 1024


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


class _BannerProtocol(Protocol):
    def __init__(self, result: Deferred[str]) -> None:
        self._result = result
        self._buffer = b""
        self._seen = 0

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            self._seen += len(line) + 1
            if line.startswith(b"SSH-"):
                self._finish(line.rstrip(b"\r").decode("ascii", "replace"))
                return
        if self._seen + len(self._buffer) > MAX_PREAMBLE:
            self._fail(ProbeError("answered without an SSH banner"))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._fail(ProbeError("closed the connection before sending an SSH banner"))

    def _finish(self, banner: str) -> None:
        if not self._result.called:
            self._result.callback(banner)
        self.transport.loseConnection()

    def _fail(self, error: Exception) -> None:
        if not self._result.called:
            self._result.errback(error)
        self.transport.loseConnection()


class _BannerFactory(ClientFactory):
    noisy = False  # per-connection factory start/stop lines say nothing useful

    def __init__(self, result: Deferred[str]) -> None:
        self._result = result

    def buildProtocol(self, addr: Any) -> Protocol:
        return _BannerProtocol(self._result)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self._result.called:
            self._result.errback(reason)


def probe_banner(reactor: Any, host: str, port: int, timeout: float) -> Deferred[str]:
    """Connect to C{host:port} and fire with the SSH banner line; cancellable."""
    connector: list[IConnector] = []
    result: Deferred[str] = Deferred(lambda _: connector and connector[0].disconnect())
    connector.append(reactor.connectTCP(host, port, _BannerFactory(result), timeout=timeout))
    result.addTimeout(timeout, reactor)
    return result


def _describe(reason: Failure) -> str:
    return " ".join((str(reason.value) or reason.type.__name__).split())


class _GuestWait:
    """One wait for one boot: a LoopingCall of lease lookups and banner probes."""

    def __init__(
        self,
        reactor: Any,
        lookup: Callable[[], str | None],
        port: int,
        timeout: float,
        interval: float,
        probeTimeout: float,
        what: str,
    ) -> None:
        self._reactor = reactor
        self._lookup = lookup
        self._port = port
        self._timeout = timeout
        self._probeTimeout = probeTimeout
        self._what = what
        self._probe: Deferred[str] | None = None
        self._lastIP: str | None = None
        self._lastError: str | None = None
        self.result: Deferred[str] = Deferred(lambda _: self._stop())
        self._deadline = reactor.callLater(timeout, self._timedOut)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._loop.start(interval, now=True).addErrback(self._finish)

    def _tick(self) -> None:
        if self._probe is not None or self.result.called:
            return
        ip = self._lookup()
        if ip is None:
            return
        if ip != self._lastIP:
            log.debug("the VM has a lease for {ip}", ip=ip)
        self._lastIP = ip
        self._probe = probe = probe_banner(self._reactor, ip, self._port, self._probeTimeout)
        probe.addCallbacks(self._answered, self._probeFailed, callbackArgs=(ip,))

    def _answered(self, banner: str, ip: str) -> None:
        self._probe = None
        log.debug("{ip} answered {banner}", ip=ip, banner=banner)
        self._finish(ip)

    def _probeFailed(self, reason: Failure) -> None:
        self._probe = None
        if not reason.check(CancelledError) or self._lastError is None:
            self._lastError = _describe(reason)

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
        if self._loop.running:
            self._loop.stop()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.cancel()

    def _finish(self, result: str | Failure) -> None:
        self._stop()
        if not self.result.called:
            if isinstance(result, Failure):
                self.result.errback(result)
            else:
                self.result.callback(result)


def wait_for_guest(
    reactor: Any,
    lookup: Callable[[], str | None],
    port: int,
    timeout: float,
    interval: float = 0.25,
    probe_timeout: float = 2.0,
    what: str = "the VM",
) -> Deferred[str]:
    """
    Fire with the guest's address once its sshd answers on C{port}.

    @param lookup: the lease lookup; an exception from it (an unreadable lease file) ends
        the wait at once with that error.
    @param what: how the no-lease message names the VM (its MAC and the lease file).
    @return: a cancellable Deferred; it fails with L{BootTimeout} after C{timeout} seconds.
    """
    return _GuestWait(reactor, lookup, port, timeout, interval, probe_timeout, what).result
