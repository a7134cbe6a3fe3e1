"""
The splice between a builder connection on the host port and the guest's sshd.

The shape is Twisted's C{portforward}, with what it leaves out:

  - The client side stops reading until the guest side is connected, so the bytes a client
    sends while the VM boots wait in the kernel, not in our memory.
  - Each transport is the other's streaming producer: a slow reader pauses the fast writer,
    in both directions, so nothing is ever buffered without bound.
  - Half-close is propagated: a client that shuts down its write side (``ssh`` after its
    input, ``nix`` after a closure) still gets the guest's answer.  The pair closes only
    when both directions have finished, or either side is lost.
  - Only loopback peers are served.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IConnector, IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from virby.logs import Logger

log = Logger()


class Backend(TypingProtocol):
    """What a spliced connection needs from the VM lifecycle."""

    def connectionOpened(self, connection: InboundConnection) -> None: ...

    def connectionClosed(self, connection: InboundConnection) -> None: ...

    def whenReady(self) -> Deferred[tuple[str, int]]: ...


def is_loopback(address: IAddress) -> bool:
    """Loopback IPv4/IPv6 (also IPv4-mapped); unix-socket peers have no host and pass."""
    host = getattr(address, "host", None)
    if host is None:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _noDelay(transport: Any) -> None:
    """SSH is interactive: Nagle's delay would add up to 40 ms to every round trip."""
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        with contextlib.suppress(OSError):
            setNoDelay(True)


@implementer(IHalfCloseableProtocol)
class InboundConnection(Protocol):
    """A client of the builder port, spliced to the guest once the VM is ready."""

    factory: ProxyFactory

    def __init__(self) -> None:
        self.guest: GuestConnection | None = None
        self._waiting: Deferred[tuple[str, int]] | None = None
        self._connector: IConnector | None = None
        self._held: list[bytes] = []
        self._clientDone = False
        self._guestDone = False
        self._closed = False
        self.bytesIn = 0
        self.bytesOut = 0

    def connectionMade(self) -> None:
        _noDelay(self.transport)
        self.transport.pauseProducing()
        self.factory.backend.connectionOpened(self)
        log.debug("connection from {peer}", peer=self.transport.getPeer())
        self._waiting = self.factory.backend.whenReady()
        self._waiting.addCallbacks(self._guestReady, self._guestUnavailable)

    def _guestReady(self, address: tuple[str, int]) -> None:
        self._waiting = None
        if self._closed:
            return
        host, port = address
        self._connector = self.factory.reactor.connectTCP(
            host, port, GuestFactory(self), timeout=self.factory.connectTimeout
        )

    def _guestUnavailable(self, reason: Failure) -> None:
        self._waiting = None
        if reason.check(CancelledError) or self._closed:
            return
        log.info(
            "closing the connection from {peer}: {why}",
            peer=self.transport.getPeer(),
            why=reason.getErrorMessage(),
        )
        self.transport.loseConnection()

    def guestConnected(self, guest: GuestConnection) -> None:
        """Splice: each side throttles the other, held bytes go first, reading resumes."""
        if self._closed:
            guest.transport.loseConnection()
            return
        self.guest = guest
        guest.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(guest.transport, True)
        held, self._held = self._held, []
        for data in held:
            guest.transport.write(data)
        if self._clientDone:
            guest.transport.loseWriteConnection()
        self.transport.resumeProducing()

    def guestFailed(self, reason: Failure) -> None:
        log.warn(
            "cannot reach the guest's sshd for {peer}: {why}",
            peer=self.transport.getPeer(),
            why=reason.getErrorMessage(),
        )
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        if self.guest is not None:
            self.guest.transport.write(data)
        else:
            self._held.append(data)

    def readConnectionLost(self) -> None:
        """The client has sent everything: pass the EOF on, keep reading the guest."""
        self._clientDone = True
        if self.guest is not None:
            self.guest.transport.loseWriteConnection()
        self._closeIfFinished()

    def writeConnectionLost(self) -> None:
        pass

    def guestFinishedSending(self) -> None:
        self._guestDone = True
        self.transport.loseWriteConnection()
        self._closeIfFinished()

    def _closeIfFinished(self) -> None:
        if self._clientDone and self._guestDone:
            self.transport.loseConnection()
            if self.guest is not None:
                self.guest.transport.loseConnection()

    def abort(self, why: str) -> None:
        """Close both sides now: the VM behind this connection is gone."""
        log.info(
            "closing the connection from {peer}: {why}", peer=self.transport.getPeer(), why=why
        )
        self.transport.abortConnection()
        if self.guest is not None:
            self.guest.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closed = True
        self._held = []
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self.guest is not None:
            self.guest.transport.loseConnection()
        elif self._connector is not None:
            self._connector.disconnect()
        log.debug(
            "connection closed: {bytesIn} bytes in, {bytesOut} bytes out",
            bytesIn=self.bytesIn,
            bytesOut=self.bytesOut,
        )
        self.factory.backend.connectionClosed(self)


@implementer(IHalfCloseableProtocol)
class GuestConnection(Protocol):
    """The guest side of one splice."""

    def __init__(self, inbound: InboundConnection) -> None:
        self.inbound = inbound

    def connectionMade(self) -> None:
        _noDelay(self.transport)
        self.inbound.guestConnected(self)

    def dataReceived(self, data: bytes) -> None:
        self.inbound.bytesOut += len(data)
        self.inbound.transport.write(data)

    def readConnectionLost(self) -> None:
        self.inbound.guestFinishedSending()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.inbound.transport.loseConnection()


class GuestFactory(ClientFactory):
    noisy = False  # per-connection factory start/stop lines say nothing useful

    def __init__(self, inbound: InboundConnection) -> None:
        self.inbound = inbound

    def buildProtocol(self, addr: IAddress) -> GuestConnection:
        return GuestConnection(self.inbound)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.inbound.guestFailed(reason)


class ProxyFactory(Factory):
    """Builds an L{InboundConnection} per loopback client; refuses everyone else."""

    noisy = False  # one log line per connection is the proxy's own, at debug

    protocol = InboundConnection

    def __init__(self, reactor: Any, backend: Backend, connectTimeout: float = 10.0) -> None:
        self.reactor = reactor
        self.backend = backend
        self.connectTimeout = connectTimeout

    def buildProtocol(self, addr: IAddress) -> InboundConnection | None:
        if not is_loopback(addr):
            log.warn("refused a connection from {peer}: only loopback peers are served", peer=addr)
            return None
        return super().buildProtocol(addr)  # type: ignore[return-value]
