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
  - The guest is connected to by at most L{GUEST_CONNECTS} clients at once, and a guest
    connection that stays silent (an SSH server speaks first) is tried again: a cold start
    tells every waiting client at once, and their connects must not overflow the guest
    sshd's listen queue, whose overflow leaves connections that never get a banner.
  - Only loopback peers are served.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import ipaddress
import socket
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorFDSet,
    IReactorTime,
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

#: Guest connects in flight at once, each counted from its connect until the guest's sshd
#: has spoken.  sshd accepts from a listen queue of 128 (OpenSSH's SSH_LISTEN_BACKLOG): when
#: the VM comes up with hundreds of clients waiting and each connects at once, the queue
#: overflows, and with SYN cookies the overflow leaves connections that look established
#: and never get a banner.  A quarter of the queue keeps well inside it, and far inside the
#: guest sshd's MaxStartups (virby/guest-sshd.json); a connect takes a millisecond or two, so
#: the bound costs a burst nothing that matters.
GUEST_CONNECTS = 32

#: How long a connected guest may stay silent before the connection is tried again: sshd
#: sends its banner as soon as it has accepted (RFC 4253, 4.2), so one that has said nothing
#: in this long was most likely never accepted (see L{GUEST_CONNECTS}).
BANNER_SECONDS = 5.0

#: Connections tried for one client before it is closed, with a line in the log.
GUEST_ATTEMPTS = 3

#: How long a client may send nothing before it is closed.  An SSH client sends its banner
#: as soon as it has connected (RFC 4253, 4.2), without waiting for the server's; one that
#: has sent nothing in this long is no SSH client, and would otherwise hold the VM up (a
#: connection boots it and keeps it past its idle time) for as long as it stays open.
#: Long enough for a client on a loaded machine, short beside any idle time.
CLIENT_SILENCE_SECONDS = 30.0

#: The data paths, by name: C{fast} is splice(2) where the system has it, else C{portable}.
DATA_PATHS = ("fast", "portable", "transports")


class GuestSilent(Exception):
    """The guest's sshd took the connection but said nothing: the attempt is worth a retry."""


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
    #: Connecting to the guest's sshd, until it has spoken (L{BANNER_SECONDS}, at most
    #: L{GUEST_ATTEMPTS} tries, L{GUEST_CONNECTS} at once); the client is still read and held.
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
        self._pending: Deferred[Any] | None = None
        self._splice: Splice | None = None
        self._held: list[bytes] = []
        self._heldSize = 0
        self._target: ReadyGuest | None = None
        self._attempts = 0
        self._heard = False
        self._silence: IDelayedCall | None = None

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
        self._silence = self.factory.reactor.callLater(
            self.factory.clientSilence, self._clientSilent
        )
        self._pending = waiting = self.factory.backend.whenReady()
        waiting.addCallbacks(self._guestReady, self._guestUnavailable)

    def _clientSilent(self) -> None:
        """No byte from the client in L{CLIENT_SILENCE_SECONDS}: it is no SSH client."""
        self._silence = None
        if self._heard or self.bytesIn or self._ending:
            return
        self._close(f"it sent nothing in {self.factory.clientSilence:g} s, as no SSH client does")

    def _guestReady(self, guest: ReadyGuest) -> None:
        self._pending = None
        if self.phase is not Phase.WAITING:
            return
        self.phase = Phase.CONNECTING
        self._target = guest
        spare = guest.claim()
        if spare is not None:
            log.debug("{peer()} gets the readiness probe's connection", peer=self.transport.getPeer)
            client = self._clientSocket()
            upstream = spare.detach() if client is not None else None
            if client is not None and upstream is not None:
                self._startRelay(client, upstream, spare.received)
            else:
                # The probe read the banner, so this answers at once; should it not, a
                # connection of our own is tried instead.
                answered: Deferred[GuestConnection] = Deferred()
                answered.addCallbacks(self.guestConnected, self._attemptFailed)
                spare.attach(GuestConnection(answered, self.factory.reactor, spare.received))
            return
        self._connectGuest()

    def _guestUnavailable(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(CancelledError) or self._ending:
            return
        self._close(reason.getErrorMessage())

    def _clientSocket(self) -> socket.socket | None:
        return _rawSocket(self.transport) if self.factory.relays else None

    # -- connecting to the guest

    def _connectGuest(self) -> None:
        """One attempt: wait for a slot among L{GUEST_CONNECTS}, then connect."""
        self._attempts += 1
        self._pending = slot = self.factory.guestConnects.acquire()
        slot.addCallbacks(self._slotTaken, lambda reason: reason.trap(CancelledError))

    def _slotTaken(self, _: object) -> None:
        self._pending = None
        if self.phase is not Phase.CONNECTING or self._target is None:
            self.factory.guestConnects.release()
            return
        host, port = self._target.host, self._target.port
        reactor, timeout = self.factory.reactor, self.factory.connectTimeout
        client = self._clientSocket()
        attempt: Deferred[Any]
        if client is not None and relay.addressFamily(host) is not None:
            attempt = relay.connect(reactor, host, port, timeout).addCallback(self._awaitBanner)
            attempt.addCallback(lambda answer: self._startRelay(client, *answer))
        else:
            guests = GuestFactory(reactor, self.factory.bannerTimeout)
            reactor.connectTCP(host, port, guests, timeout=timeout)
            attempt = guests.answered.addCallback(self.guestConnected)
        if not attempt.called:
            self._pending = attempt
        attempt.addBoth(self._attemptEnded)
        attempt.addErrback(self._attemptFailed)

    def _awaitBanner(
        self, upstream: socket.socket
    ) -> tuple[socket.socket, bytes] | Deferred[tuple[socket.socket, bytes]]:
        reactor, silence = self.factory.reactor, self.factory.bannerTimeout
        if silence is None:
            return (upstream, b"")
        spoken = relay.firstBytes(reactor, upstream).addTimeout(silence, reactor)
        spoken.addErrback(_asSilence, silence)
        return spoken.addCallback(lambda greeting: (upstream, greeting))

    def _attemptEnded(self, result: object) -> object:
        """Spliced, failed or given up: the slot goes to the next connect."""
        self._pending = None
        self.factory.guestConnects.release()
        return result

    def _attemptFailed(self, reason: Failure) -> None:
        if reason.check(CancelledError) or self._ending:
            return
        if not reason.check(GuestSilent):
            self.guestFailed(reason)
            return
        if self._attempts < GUEST_ATTEMPTS:
            log.info(
                "the guest's sshd {why} for {peer}: trying again ({attempt} of {attempts})",
                why=reason.getErrorMessage(),
                peer=self.transport.getPeer(),
                attempt=self._attempts + 1,
                attempts=GUEST_ATTEMPTS,
            )
            self._connectGuest()
            return
        log.warn(
            "the guest's sshd {why} for {peer}, {attempts} times: closing the connection",
            why=reason.getErrorMessage(),
            peer=self.transport.getPeer(),
            attempts=GUEST_ATTEMPTS,
        )
        self.phase = Phase.CLOSING
        self.transport.loseConnection()

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

    def _startRelay(self, client: socket.socket, upstream: socket.socket, greeting: bytes) -> None:
        """Both sockets are connected: the relay moves the bytes, the held ones first."""
        if self.phase is not Phase.CONNECTING:
            # Closed (aborted, or the client hung up) while the connect was under way, and
            # its connectionLost is yet to come: a relay now would take over the client's
            # descriptor from its closing transport, which then never finishes closing.
            relay.closeSocket(upstream)
            return
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
        self._heard = True
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

    def _close(self, why: str, abort: bool = False) -> None:
        """
        Close in order (the client gets an EOF and everything sent to it before), with the
        splice if there is one; with C{abort}, reset both sides now.
        """
        self.phase = Phase.CLOSING
        log.info(
            "closing the connection from {peer}: {why}", peer=self.transport.getPeer(), why=why
        )
        if self._splice is not None:
            self._splice.close(abort=abort)
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def abort(self, why: str) -> None:
        """
        The VM behind this connection is gone (or the daemon is stopping): close both sides
        now.  A client still waiting for the VM has been sent nothing, and gets an orderly
        close, not a reset; one that is already closing is left to it, and logged once.
        """
        if self._ending:
            return
        self._close(why, abort=self._splice is not None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._held, self._heldSize = [], 0
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self._silence = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        if self._splice is not None:
            self._splice.close()
        log.debug(
            "connection closed: {bytesIn} bytes in, {bytesOut} bytes out",
            bytesIn=self.bytesIn,
            bytesOut=self.bytesOut,
        )
        self.factory.closed(self)
        self.factory.backend.connectionClosed(self)


def _asSilence(reason: Failure, seconds: float) -> Failure:
    """A guest that was connected and then said nothing, or closed first: worth a retry."""
    if reason.check(TimeoutError):
        return Failure(GuestSilent(f"said nothing in {seconds:g} s"))
    if reason.check(ConnectionDone, ConnectionLost):
        return Failure(GuestSilent("closed the connection before it said anything"))
    return reason


@implementer(IHalfCloseableProtocol)
class GuestConnection(Protocol):
    """
    The guest side of one splice on the transports.  Until the guest has spoken, its first
    bytes are kept (C{greeting}) and C{answered} fires with this connection once there are
    some, or fails with L{GuestSilent} after L{BANNER_SECONDS} or an early close; then its
    events go to the splice.

    @ivar greeting: what the guest sent before the splice (its banner; also when the
        connection is the readiness probe's, which read it); it goes to the client first.
    """

    # Set by makeConnection, before any event reaches this protocol.
    transport: IStreamTransport

    def __init__(
        self,
        answered: Deferred[GuestConnection],
        clock: IReactorTime,
        greeting: bytes = b"",
        silence: float | None = BANNER_SECONDS,
    ) -> None:
        self.answered = answered
        self.greeting = greeting
        self._silenceSeconds = silence
        self.splice: TransportSplice | None = None
        self._clock = clock
        self._silence: IDelayedCall | None = None

    def connectionMade(self) -> None:
        _noDelay(self.transport)
        if self.greeting or self._silenceSeconds is None:
            self._answer()
        else:
            self._silence = self._clock.callLater(self._silenceSeconds, self._silent)

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.guestData(data)
        elif not self.answered.called:
            self.greeting += data
            self._answer()

    def _answer(self) -> None:
        self._stopWaiting()
        self.answered.callback(self)

    def _silent(self) -> None:
        self._silence = None
        self._fail(GuestSilent(f"said nothing in {self._silenceSeconds:g} s"))
        self.transport.abortConnection()

    def _fail(self, reason: Exception) -> None:
        self._stopWaiting()
        if not self.answered.called:
            self.answered.errback(Failure(reason))

    def _stopWaiting(self) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self._silence = None

    def readConnectionLost(self) -> None:
        if self.splice is not None:
            self.splice.guestFinishedSending()
        elif not self.answered.called:
            self._fail(GuestSilent("closed the connection before it said anything"))
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.splice is not None:
            self.splice.guestLost(reason)
        else:
            self._fail(GuestSilent("closed the connection before it said anything"))


class GuestFactory(ClientFactory[GuestConnection]):
    """
    One connect to the guest on the transports: C{answered} fires with the connection once
    the guest has spoken; cancelling it stops the connect, or drops the connection.
    """

    noisy = False  # per-connection factory start/stop lines say nothing useful

    def __init__(self, clock: IReactorTime, silence: float | None = BANNER_SECONDS) -> None:
        self._clock = clock
        self._silenceSeconds = silence
        self._connector: IConnector | None = None
        self.answered: Deferred[GuestConnection] = Deferred(self._cancel)

    def startedConnecting(self, connector: IConnector) -> None:
        self._connector = connector

    def _cancel(self, _: Deferred[GuestConnection]) -> None:
        if self._connector is not None:
            self._connector.disconnect()

    def buildProtocol(self, addr: IAddress | None) -> GuestConnection:
        return GuestConnection(self.answered, self._clock, silence=self._silenceSeconds)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.answered.called:
            self.answered.errback(reason)


class ProxyFactory(Factory[InboundConnection]):
    """
    Builds an L{InboundConnection} per loopback client; refuses everyone else.

    @param dataPath: C{fast} (splice(2) where the system has it, else C{portable}),
        C{portable} (one shared buffer, the path macOS runs), or C{transports} (the
        Twisted protocol path, which every splice also falls back to when either side is
        not a plain TCP socket).
    @param bannerTimeout: how long a guest connection may stay silent before it is tried
        again (L{GUEST_ATTEMPTS} in all); C{None} splices at once, for a guest that does not
        speak first (the benchmarks' sink), as an SSH server always does.
    @param clientSilence: how long a client may send nothing before it is closed
        (L{CLIENT_SILENCE_SECONDS}).
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
        bannerTimeout: float | None = BANNER_SECONDS,
        clientSilence: float = CLIENT_SILENCE_SECONDS,
    ) -> None:
        if dataPath not in DATA_PATHS:
            raise ValueError(f"unknown data path {dataPath!r}: one of {', '.join(DATA_PATHS)}")
        self.reactor = reactor
        self.backend = backend
        self.connectTimeout = connectTimeout
        self.bannerTimeout = bannerTimeout
        self.clientSilence = clientSilence
        self.relays = dataPath != "transports" and IReactorFDSet.providedBy(reactor)
        splicing = dataPath == "fast" and spliceAvailable()
        self.pipes = PipePool(reactor, limit=pipeLimit) if splicing else None
        self.buffers = BufferPool()
        self.guestConnects = DeferredSemaphore(GUEST_CONNECTS)
        self._open: set[InboundConnection] = set()
        #: Told when a connection has ended: the admission limit (L{ConnectionLimit}).
        self.onClosed: Callable[[], None] | None = None
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
        if self.onClosed is not None:
            self.onClosed()
        self.bytesToGuest += connection.bytesIn
        self.bytesToClients += connection.bytesOut

    def traffic(self) -> tuple[int, int]:
        """Bytes delivered so far to the guest and to the clients, open connections included."""
        return (
            self.bytesToGuest + sum(c.bytesIn for c in self._open),
            self.bytesToClients + sum(c.bytesOut for c in self._open),
        )
