"""
The splice between a builder connection on the host port and the guest's sshd.

This module is the control plane of each splice: it accepts, waits for the VM, connects to
the guest (or takes the readiness probe's connection), tells the lifecycle what is open,
and closes both sides when the VM dies or the daemon stops.  Once both sockets are connected
the bytes move through L{virby.daemon.relay}, on the reactor, without a Python object per chunk;
where that cannot be (a transport that is not a plain TCP socket, as on the memory reactors
of the unit tests or under TLS) they move through the transports, in the shape of Twisted's
C{portforward}, with what it leaves out.  Either way:

  - While the VM boots, the client is read, and at most L{MAX_HELD} bytes are held; then its
    transport pauses and the rest waits in the kernel.  Reading is how a client that hangs
    up is noticed at once: it stops being counted, and is never spliced.
  - Each direction keeps its backpressure: a slow reader pauses the fast writer, so nothing
    is buffered without bound.
  - Half-close is propagated: a client that shuts down its write side still gets the guest's
    answer.  The pair closes only when both directions have finished, or either side is lost.
  - Only loopback peers are served.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import ipaddress
import socket
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IHalfCloseableProtocol,
    IReactorFDSet,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from virby.daemon import relay
from virby.daemon.readiness import ReadyGuest
from virby.daemon.relay import (
    BufferPool,
    PipePool,
    Relay,
    Splice,
    TransportSplice,
    spliceAvailable,
)
from virby.logs import Logger
from virby.reactors import ISpliceReactor, IStreamTransport

log = Logger()

#: What a client may send before it is spliced: an SSH client sends its banner and its key
#: exchange offer (about 1.5 KiB) and then waits for the server's.
MAX_HELD = 64 * 1024

#: The data paths, by name: C{fast} is splice(2) where the system has it, else C{portable}.
DATA_PATHS = ("fast", "portable", "transports")


class Backend(TypingProtocol):
    """What a spliced connection needs from the VM lifecycle."""

    def connectionOpened(self, connection: InboundConnection) -> None: ...

    def connectionClosed(self, connection: InboundConnection) -> None: ...

    def whenReady(self) -> Deferred[ReadyGuest]: ...


def isLoopback(address: IAddress) -> bool:
    """Loopback IPv4/IPv6 (also IPv4-mapped); unix-socket peers have no host and pass."""
    host = getattr(address, "host", None)
    return True if host is None else _isLoopbackHost(host)


@functools.lru_cache(maxsize=256)
def _isLoopbackHost(host: str) -> bool:
    """Cached: every connection asks, from one of a handful of addresses."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _noDelay(transport: object) -> None:
    """SSH is interactive: Nagle's delay would add up to 40 ms to every round trip."""
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        with contextlib.suppress(OSError):
            setNoDelay(True)


def _rawSocket(transport: ITransport) -> socket.socket | None:
    """The socket under a plain (not TLS) TCP transport: what the relay can drive."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    return transport.getHandle()


class Phase(enum.Enum):
    """Where an inbound connection is; each phase but the last moves only forward."""

    #: Waiting for the VM (L{Backend.whenReady}); the client is read, up to L{MAX_HELD}.
    WAITING = "waiting"
    #: Connecting to the guest's sshd; the client is still read and held.
    CONNECTING = "connecting"
    #: A L{virby.daemon.relay.Splice} moves the bytes.
    SPLICED = "spliced"
    #: Closing, by either side or ours: nothing new is started.
    CLOSING = "closing"
    #: Lost, and accounted for.
    CLOSED = "closed"


@implementer(IHalfCloseableProtocol)
class InboundConnection(Protocol):
    """
    A client of the builder port: it waits for the VM, connects to the guest, then hands
    both sides to a L{virby.daemon.relay.Splice}: the relay (which gets both sockets: the
    client's borrowed from its paused transport, the guest's connected here or taken from
    the readiness probe), or the transports' splice when either side is no plain socket.

    @ivar phase: where it is (L{Phase}).  Besides it, only what that phase holds: while
        waiting or connecting, the one thing to cancel (C{_pending}) and the client's held
        bytes; once spliced, the splice.
    """

    factory: ProxyFactory
    # Set by makeConnection, before any event reaches this protocol.
    transport: IStreamTransport

    def __init__(self) -> None:
        self.phase = Phase.WAITING
        self._pending: Deferred[ReadyGuest] | Deferred[socket.socket] | IConnector | None = None
        self._splice: Splice | None = None
        self._held: list[bytes] = []
        self._heldSize = 0

    @property
    def spliced(self) -> bool:
        """A splice was started (it may have ended since)."""
        return self._splice is not None

    @property
    def bytesIn(self) -> int:
        """Bytes from the client delivered to the guest."""
        return self._splice.bytesToGuest if self._splice is not None else 0

    @property
    def bytesOut(self) -> int:
        """Bytes from the guest delivered to the client."""
        return self._splice.bytesToClient if self._splice is not None else 0

    @property
    def _ending(self) -> bool:
        return self.phase in (Phase.CLOSING, Phase.CLOSED)

    # -- waiting for the guest

    def connectionMade(self) -> None:
        _noDelay(self.transport)
        self.factory.opened(self)
        self.factory.backend.connectionOpened(self)
        # Debug lines name callables, called only when debug logging is on: these run for
        # every connection, and formatting costs more than the rest of the line's work.
        log.debug("connection from {peer()}", peer=self.transport.getPeer)
        self._pending = waiting = self.factory.backend.whenReady()
        waiting.addCallbacks(self._guestReady, self._guestUnavailable)

    def _guestReady(self, guest: ReadyGuest) -> None:
        self._pending = None
        if self.phase is not Phase.WAITING:
            return
        self.phase = Phase.CONNECTING
        client = _rawSocket(self.transport) if self.factory.relays else None
        spare = guest.claim()
        if spare is not None:
            log.debug("{peer()} gets the readiness probe's connection", peer=self.transport.getPeer)
            upstream = spare.detach() if client is not None else None
            if client is not None and upstream is not None:
                self._startRelay(client, upstream, spare.received)
            else:
                spare.attach(GuestConnection(self, greeting=spare.received))
            return
        if client is not None and relay.addressFamily(guest.host) is not None:
            self._pending = connecting = relay.connect(
                self.factory.reactor, guest.host, guest.port, self.factory.connectTimeout
            )
            connecting.addCallbacks(
                self._guestSocketConnected, self.guestFailed, callbackArgs=(client,)
            )
            return
        self._pending = self.factory.reactor.connectTCP(
            guest.host, guest.port, GuestFactory(self), timeout=self.factory.connectTimeout
        )

    def _guestUnavailable(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(CancelledError) or self._ending:
            return
        self._close(reason.getErrorMessage())

    def guestFailed(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(CancelledError) or self._ending:
            return
        log.warn(
            "cannot reach the guest's sshd for {peer}: {why}",
            peer=self.transport.getPeer(),
            why=reason.getErrorMessage(),
        )
        self.phase = Phase.CLOSING
        self.transport.loseConnection()

    def _takeHeld(self) -> bytes:
        held, self._held, self._heldSize = b"".join(self._held), [], 0
        return held

    # -- the splice

    def _guestSocketConnected(self, upstream: socket.socket, client: socket.socket) -> None:
        self._pending = None
        if self.phase is not Phase.CONNECTING:
            # Closed (aborted, or the client hung up) while the connect was under way, and
            # its connectionLost is yet to come: a relay now would take over the client's
            # descriptor from its closing transport, which then never finishes closing.
            relay.closeSocket(upstream)
            return
        self._startRelay(client, upstream, b"")

    def _startRelay(self, client: socket.socket, upstream: socket.socket, greeting: bytes) -> None:
        """Both sockets are connected: the relay moves the bytes, the held ones first."""
        self.transport.pauseProducing()
        self._startSplice(
            Relay(
                self.factory.reactor,
                client,
                upstream,
                done=self._spliceDone,
                toGuest=self._takeHeld(),
                toClient=greeting,
                pipes=self.factory.pipes,
                buffers=self.factory.buffers,
            )
        )

    def guestConnected(self, guest: GuestConnection) -> None:
        """The guest's transport is connected: the transports' splice moves the bytes."""
        self._pending = None
        if self.phase is not Phase.CONNECTING:
            guest.transport.loseConnection()
            return
        guest.splice = splice = TransportSplice(
            self.transport,
            guest.transport,
            done=self._spliceDone,
            toGuest=self._takeHeld(),
            toClient=guest.greeting,
        )
        self._startSplice(splice)

    def _startSplice(self, splice: Splice) -> None:
        self._splice = splice
        self.phase = Phase.SPLICED
        splice.start()

    def _spliceDone(self, reason: Failure | None) -> None:
        """Both directions ended (or one side was lost): close the two sides."""
        if reason is not None:
            log.debug(
                "the splice for {peer()} ended: {why()}",
                peer=self.transport.getPeer,
                why=reason.getErrorMessage,
            )
        if self._ending:
            return
        self.phase = Phase.CLOSING
        if self._splice is not None:
            self._splice.close()
        self.transport.loseConnection()

    # -- the client's events

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.SPLICED:
            assert self._splice is not None
            self._splice.clientData(data)
        elif self.phase in (Phase.WAITING, Phase.CONNECTING):
            self._held.append(data)
            self._heldSize += len(data)
            if self._heldSize >= MAX_HELD:
                self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        """
        The client has sent everything.  Spliced: pass the EOF on, keep reading the guest.
        Not spliced yet: an SSH client never ends its stream before it has read the server's
        banner (RFC 4253, 4.2), so this one has hung up, most likely gone altogether.
        """
        if self.phase is Phase.SPLICED:
            assert self._splice is not None
            self._splice.clientFinishedSending()
        elif not self._ending:
            log.debug("{peer()} hung up before the guest answered", peer=self.transport.getPeer)
            self.phase = Phase.CLOSING
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    # -- closing

    def _close(self, why: str) -> None:
        """Close in order: the client gets an EOF and everything sent to it before."""
        self.phase = Phase.CLOSING
        log.info(
            "closing the connection from {peer}: {why}", peer=self.transport.getPeer(), why=why
        )
        self.transport.loseConnection()

    def abort(self, why: str) -> None:
        """
        The VM behind this connection is gone (or the daemon is stopping): close both sides
        now.  A client still waiting for the VM has been sent nothing, and gets an orderly
        close, not a reset; one that is already closing is left to it, and logged once.
        """
        if self._ending:
            return
        if self._splice is None:
            self._close(why)
            return
        self.phase = Phase.CLOSING
        log.info(
            "closing the connection from {peer}: {why}", peer=self.transport.getPeer(), why=why
        )
        self._splice.close(abort=True)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._held, self._heldSize = [], 0
        pending, self._pending = self._pending, None
        if isinstance(pending, Deferred):
            pending.cancel()
        elif pending is not None:
            pending.disconnect()
        if self._splice is not None:
            self._splice.close()
        log.debug(
            "connection closed: {bytesIn} bytes in, {bytesOut} bytes out",
            bytesIn=self.bytesIn,
            bytesOut=self.bytesOut,
        )
        self.factory.closed(self)
        self.factory.backend.connectionClosed(self)


@implementer(IHalfCloseableProtocol)
class GuestConnection(Protocol):
    """
    The guest side of one splice on the transports: until the splice begins, its events go
    to the inbound connection; then to the splice.

    @ivar greeting: what the guest sent before this protocol took over (the banner, when the
        connection is the readiness probe's); it goes to the client first.
    """

    # Set by makeConnection, before any event reaches this protocol.
    transport: IStreamTransport

    def __init__(self, inbound: InboundConnection, greeting: bytes = b"") -> None:
        self.inbound = inbound
        self.greeting = greeting
        self.splice: TransportSplice | None = None

    def connectionMade(self) -> None:
        _noDelay(self.transport)
        self.inbound.guestConnected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.guestData(data)

    def readConnectionLost(self) -> None:
        if self.splice is not None:
            self.splice.guestFinishedSending()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.splice is not None:
            self.splice.guestLost(reason)


class GuestFactory(ClientFactory[GuestConnection]):
    noisy = False  # per-connection factory start/stop lines say nothing useful

    def __init__(self, inbound: InboundConnection) -> None:
        self.inbound = inbound

    def buildProtocol(self, addr: IAddress | None) -> GuestConnection:
        return GuestConnection(self.inbound)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.inbound.guestFailed(reason)


class ProxyFactory(Factory[InboundConnection]):
    """
    Builds an L{InboundConnection} per loopback client; refuses everyone else.

    @param dataPath: C{fast} (splice(2) where the system has it, else C{portable}),
        C{portable} (one shared buffer, the path macOS runs), or C{transports} (the
        Twisted protocol path, which every splice also falls back to when either side is
        not a plain TCP socket).
    @param pipeLimit: how many pipes splice(2) may hold at once: the daemon's budget
        (L{virby.daemon.capacity.DescriptorLimit.pipes}); by default, the pipes' share of the
        open-file limit now.
    @ivar bytesToGuest: bytes delivered to the guest by the connections that have closed;
        L{traffic} adds those of the open ones.
    """

    noisy = False  # one log line per connection is the proxy's own, at debug

    protocol = InboundConnection

    def __init__(
        self,
        reactor: ISpliceReactor,
        backend: Backend,
        connectTimeout: float = 10.0,
        dataPath: str = "fast",
        pipeLimit: int | None = None,
    ) -> None:
        if dataPath not in DATA_PATHS:
            raise ValueError(f"unknown data path {dataPath!r}: one of {', '.join(DATA_PATHS)}")
        self.reactor = reactor
        self.backend = backend
        self.connectTimeout = connectTimeout
        self.relays = dataPath != "transports" and IReactorFDSet.providedBy(reactor)
        splicing = dataPath == "fast" and spliceAvailable()
        self.pipes = PipePool(reactor, limit=pipeLimit) if splicing else None
        self.buffers = BufferPool()
        self._open: set[InboundConnection] = set()
        self.bytesToGuest = 0
        self.bytesToClients = 0

    def buildProtocol(self, addr: IAddress | None) -> InboundConnection | None:
        if addr is not None and not isLoopback(addr):
            log.warn("refused a connection from {peer}: only loopback peers are served", peer=addr)
            return None
        return super().buildProtocol(addr)

    def opened(self, connection: InboundConnection) -> None:
        self._open.add(connection)

    @property
    def openConnections(self) -> int:
        """Connections accepted and not yet lost: what the admission limit counts."""
        return len(self._open)

    def closed(self, connection: InboundConnection) -> None:
        self._open.discard(connection)
        self.bytesToGuest += connection.bytesIn
        self.bytesToClients += connection.bytesOut

    def traffic(self) -> tuple[int, int]:
        """Bytes delivered so far to the guest and to the clients, open connections included."""
        return (
            self.bytesToGuest + sum(c.bytesIn for c in self._open),
            self.bytesToClients + sum(c.bytesOut for c in self._open),
        )
