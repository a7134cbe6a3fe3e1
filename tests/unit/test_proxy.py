"""The splice's control plane and its transports path, on string transports and a memory reactor."""

from __future__ import annotations

import itertools
import socket

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from tests.fakes import FakeHypervisor, FakeReactor, Status, readyGuest
from virby.daemon.lifecycle import Lifecycle, VMUnavailable
from virby.daemon.proxy import (
    BANNER_SECONDS,
    CLIENT_SILENCE_SECONDS,
    GUEST_ATTEMPTS,
    GUEST_CONNECTS,
    MAX_HELD,
    Phase,
    ProxyFactory,
    isLoopback,
)
from virby.daemon.readiness import ReadyGuest


class Transport(StringTransport):
    """A TCP-like string transport: half-close and TCP_NODELAY recorded."""

    def __init__(self, peer=None) -> None:
        super().__init__(peerAddress=peer or IPv4Address("TCP", "127.0.0.1", 50000))
        self.writeClosed = False
        self.noDelay = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Backend:
    def __init__(self, ready: Deferred | None = None) -> None:
        self.ready = ready if ready is not None else Deferred(lambda d: self.cancelled.append(d))
        self.opened: list = []
        self.closed: list = []
        self.cancelled: list = []

    def connectionOpened(self, connection) -> None:
        self.opened.append(connection)

    def connectionClosed(self, connection) -> None:
        self.closed.append(connection)

    def whenReady(self) -> Deferred:
        return self.ready


def guest(host: str = "g", port: int = 22) -> ReadyGuest:
    return ReadyGuest(host, port)


def accept(backend, peer=None, reactor=None):
    reactor = reactor or FakeReactor()
    factory = ProxyFactory(reactor, backend, connectTimeout=7)
    transport = Transport(peer)
    protocol = factory.buildProtocol(transport.getPeer())
    assert protocol is not None
    protocol.makeConnection(transport)
    return reactor, protocol, transport


#: What the guest's sshd says first: the splice begins once it has.
BANNER = b"SSH-2.0-guest\r\n"


def connect_guest(reactor: FakeReactor, index: int = -1, banner: bytes = BANNER):
    """The guest accepts the connect, and (unless C{banner} is empty) speaks."""
    host, port, factory, timeout, _ = reactor.tcpClients[index]
    guest = factory.buildProtocol(None)
    assert guest is not None
    transport = Transport(IPv4Address("TCP", host, port))
    guest.makeConnection(transport)
    if banner:
        guest.dataReceived(banner)
    return guest, transport, (host, port, timeout)


def hang_up(inbound, transport) -> None:
    """The client closes: its EOF arrives, and the transport, closing, reports the loss."""
    inbound.readConnectionLost()
    if transport.disconnecting and not transport.disconnected:
        transport.disconnected = True
        inbound.connectionLost(None)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        (IPv4Address("TCP", "127.0.0.1", 1), True),
        (IPv4Address("TCP", "127.8.9.10", 1), True),
        (IPv6Address("TCP", "::1", 1), True),
        (IPv6Address("TCP", "::ffff:127.0.0.1", 1), True),
        (IPv4Address("TCP", "192.168.1.5", 1), False),
        (IPv6Address("TCP", "fe80::1%en0", 1), False),
        (IPv6Address("TCP", "::ffff:10.0.0.1", 1), False),
        (UNIXAddress(b"/tmp/x"), True),
    ],
)
def test_loopback_only(address, allowed) -> None:
    assert isLoopback(address) is allowed
    factory = ProxyFactory(FakeReactor(), Backend())
    assert (factory.buildProtocol(address) is not None) is allowed


def test_unknown_data_path() -> None:
    with pytest.raises(ValueError, match="one of fast, portable, transports"):
        ProxyFactory(FakeReactor(), Backend(), dataPath="turbo")


def test_held_bytes_go_first_then_the_splice() -> None:
    backend = Backend()
    reactor, inbound, client = accept(backend)
    assert backend.opened == [inbound]
    assert client.noDelay
    inbound.dataReceived(b"SSH-2.0-client\r\n")
    assert reactor.tcpClients == []
    backend.ready.callback(guest("192.168.64.2", 22))
    guest_side, guest_transport, (host, port, timeout) = connect_guest(reactor, banner=b"")
    assert (host, port, timeout) == ("192.168.64.2", 22, 7)
    assert guest_transport.noDelay
    assert guest_transport.value() == b"", "held until the guest has spoken"
    inbound.dataReceived(b"more")
    guest_side.dataReceived(b"SSH-2.0-guest\r\n")
    assert guest_transport.value() == b"SSH-2.0-client\r\nmore"
    assert client.producerState == "producing"
    assert client.value() == b"SSH-2.0-guest\r\n"
    assert (inbound.bytesIn, inbound.bytesOut) == (20, 15)


def test_while_waiting_the_client_is_read_up_to_a_bound_then_paused() -> None:
    """Reading is how a hang-up is noticed; the bound is what keeps a flood in the kernel."""
    backend = Backend()
    reactor, inbound, client = accept(backend)
    assert client.producerState == "producing"
    chunk = b"x" * 4096
    for _ in range(MAX_HELD // len(chunk) - 1):
        inbound.dataReceived(chunk)
    assert client.producerState == "producing"
    inbound.dataReceived(chunk)
    assert client.producerState == "paused"
    backend.ready.callback(guest())
    _, guest_transport, _ = connect_guest(reactor)
    assert guest_transport.value() == chunk * (MAX_HELD // len(chunk))
    assert client.producerState == "producing"


def test_backpressure_both_ways() -> None:
    backend = Backend(succeed(guest()))
    reactor, _inbound, client = accept(backend)
    _guest, guest_transport, _ = connect_guest(reactor)
    assert guest_transport.producer is client and guest_transport.streaming
    assert client.producer is guest_transport and client.streaming
    # The guest side's buffer is full: it pauses its producer, the client's transport.
    guest_transport.producer.pauseProducing()
    assert client.producerState == "paused"
    client.producer.pauseProducing()
    assert guest_transport.producerState == "paused"


def test_half_close_client_first() -> None:
    backend = Backend(succeed(guest()))
    reactor, inbound, client = accept(backend)
    guest_side, guest_transport, _ = connect_guest(reactor)
    inbound.dataReceived(b"request")
    inbound.readConnectionLost()
    assert guest_transport.writeClosed, "EOF passed on to the guest"
    assert not client.disconnecting and not guest_transport.disconnecting
    guest_side.dataReceived(b"answer")
    assert client.value() == BANNER + b"answer", "the guest's answer still flows after the EOF"
    guest_side.readConnectionLost()
    assert client.writeClosed
    assert client.disconnecting and guest_transport.disconnecting


def test_half_close_guest_first() -> None:
    backend = Backend(succeed(guest()))
    reactor, inbound, client = accept(backend)
    guest_side, guest_transport, _ = connect_guest(reactor)
    guest_side.readConnectionLost()
    assert client.writeClosed and not client.disconnecting
    inbound.dataReceived(b"late")
    assert guest_transport.value() == b"late"
    inbound.readConnectionLost()
    assert client.disconnecting and guest_transport.disconnecting


def test_boot_failure_closes_the_client() -> None:
    backend = Backend(fail(VMUnavailable("the VM did not boot: no lease")))
    reactor, inbound, client = accept(backend)
    assert client.disconnecting and reactor.tcpClients == []
    inbound.connectionLost(None)
    assert backend.closed == [inbound]


def test_guest_refusal_closes_the_client() -> None:
    backend = Backend(succeed(guest()))
    reactor, _inbound, client = accept(backend)
    factory = reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert client.disconnecting


def test_client_leaving_while_waiting_withdraws_the_wait() -> None:
    backend = Backend()
    reactor, inbound, _client = accept(backend)
    inbound.connectionLost(None)
    assert len(backend.cancelled) == 1
    assert backend.closed == [inbound]
    assert reactor.tcpClients == []


def test_client_leaving_while_connecting_stops_the_connect() -> None:
    backend = Backend(succeed(guest()))
    reactor, inbound, _client = accept(backend)
    connector = reactor.connectors[-1]
    inbound.connectionLost(None)
    assert connector._disconnected if hasattr(connector, "_disconnected") else True
    assert backend.closed == [inbound]


def test_a_client_closed_while_the_guest_socket_connects_is_never_relayed() -> None:
    """
    virby stop --force (or the client's EOF) between the guest connect starting and ending,
    before the client's connectionLost: the guest's socket is closed and the closing client
    transport keeps its descriptor, so that it finishes closing.
    """
    backend = Backend()
    _reactor, inbound, client = accept(backend)
    inbound.abort("forced stop")
    upstream, other = socket.socketpair()
    try:
        inbound._startRelay(other, upstream, b"")
        assert not inbound.spliced and inbound.phase is Phase.CLOSING
        assert upstream.fileno() == -1, "the guest's socket is closed"
        assert client.disconnecting
    finally:
        upstream.close()
        other.close()


def test_client_leaving_closes_the_guest_side() -> None:
    backend = Backend(succeed(guest()))
    reactor, inbound, _client = accept(backend)
    guest_side, guest_transport, _ = connect_guest(reactor)
    inbound.connectionLost(None)
    assert guest_transport.disconnecting
    guest_side.connectionLost(None)
    assert backend.closed == [inbound]


def test_guest_leaving_closes_the_client() -> None:
    backend = Backend(succeed(guest()))
    reactor, _inbound, client = accept(backend)
    guest_side, _, _ = connect_guest(reactor)
    guest_side.connectionLost(None)
    assert client.disconnecting


def test_abort_closes_both_sides_now() -> None:
    backend = Backend(succeed(guest()))
    reactor, inbound, client = accept(backend)
    _, guest_transport, _ = connect_guest(reactor)
    inbound.abort("the VM exited with status 1")
    assert client.aborted and guest_transport.aborted


class Running(Backend):
    """A VM that is up: every connection is told so at once."""

    def whenReady(self) -> Deferred:
        return succeed(guest())


def test_traffic_counts_open_and_closed_connections() -> None:
    reactor = FakeReactor()
    backend = Running()
    factory = ProxyFactory(reactor, backend)
    pairs = []
    for _ in range(2):
        transport = Transport()
        inbound = factory.buildProtocol(transport.getPeer())
        assert inbound is not None
        inbound.makeConnection(transport)
        guest_side, _, _ = connect_guest(reactor)
        inbound.dataReceived(b"12345")
        guest_side.dataReceived(b"abc")
        pairs.append((inbound, guest_side))
    banners = 2 * len(BANNER)
    assert factory.traffic() == (10, 6 + banners)
    pairs[0][0].connectionLost(None)  # type: ignore[arg-type]  # the reason is not read
    pairs[1][0].dataReceived(b"6")
    assert factory.traffic() == (11, 6 + banners)


# -- the probe's connection, handed over


class Probe:
    """Stands for the readiness probe's protocol, past the banner."""

    def __init__(self, received: bytes) -> None:
        self.received = received
        self.lost = False
        self.closed = False
        self.transport = Transport(IPv4Address("TCP", "192.168.64.2", 22))

    def attach(self, protocol) -> None:
        protocol.makeConnection(self.transport)

    def close(self) -> None:
        self.closed = True


class Booting(Backend):
    """A VM that boots: each connection gets its own wait, all told at once."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[Deferred] = []

    def whenReady(self) -> Deferred:
        waiter: Deferred = Deferred()
        self.waiters.append(waiter)
        return waiter

    def becomeReady(self, ready: ReadyGuest) -> None:
        for waiter in self.waiters:
            waiter.callback(ready)
        ready.release()


def test_the_first_waiter_gets_the_probes_connection_and_its_banner() -> None:
    backend = Booting()
    reactor = FakeReactor()
    _, first, first_client = accept(backend, reactor=reactor)
    _, second, _ = accept(backend, reactor=reactor)
    first.dataReceived(b"SSH-2.0-client\r\n")
    probe = Probe(b"SSH-2.0-OpenSSH_9.2\r\n")
    ready = ReadyGuest("192.168.64.2", 22, probe)  # type: ignore[arg-type]
    backend.becomeReady(ready)
    assert first_client.value() == b"SSH-2.0-OpenSSH_9.2\r\n", "the banner comes first"
    assert probe.transport.value() == b"SSH-2.0-client\r\n"
    assert [c[:2] for c in reactor.tcpClients] == [("192.168.64.2", 22)], "only the second"
    assert not probe.closed
    assert not second.spliced and second.phase is Phase.CONNECTING


def test_an_unclaimed_probe_connection_is_closed() -> None:
    probe = Probe(b"SSH-2.0-x\r\n")
    ready = ReadyGuest("h", 22, probe)  # type: ignore[arg-type]
    ready.release()
    assert probe.closed and ready.claim() is None


# -- with the real lifecycle: clients that leave while the VM boots, and a VM that dies


def booting(clients: int):
    reactor = FakeReactor()
    hypervisor = FakeHypervisor(readyGuest, quickStop=True, console=[])
    lifecycle = Lifecycle(reactor, hypervisor, onDemand=True, ttl=60)
    factory = ProxyFactory(reactor, lifecycle, connectTimeout=7)
    accepted = []
    for n in range(clients):
        transport = Transport(IPv4Address("TCP", "127.0.0.1", 40000 + n))
        inbound = factory.buildProtocol(transport.getPeer())
        assert inbound is not None
        inbound.makeConnection(transport)
        accepted.append((inbound, transport))
    return reactor, hypervisor, lifecycle, accepted


def test_clients_that_hang_up_while_the_vm_boots_stop_counting_and_are_never_spliced() -> None:
    reactor, hypervisor, lifecycle, accepted = booting(3)
    snapshot = lifecycle.snapshot()
    assert (snapshot.active_connections, snapshot.waiting_connections) == (0, 3)
    for inbound, transport in accepted[:2]:
        assert transport.producerState == "producing", "read while waiting"
        inbound.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n")
        hang_up(inbound, transport)
    snapshot = lifecycle.snapshot()
    assert (snapshot.active_connections, snapshot.waiting_connections) == (0, 1)
    hypervisor.becomeReady(guest=ReadyGuest("192.168.64.2", 22))
    assert len(reactor.tcpClients) == 1, "only the client still there is spliced"


def test_a_connection_made_and_closed_at_once_begins_a_boot_and_holds_nothing_up() -> None:
    """
    What C{virby start} does to start an on-demand daemon: one connection, closed before
    the daemon runs, so the daemon reads its end as soon as it accepts it.  Its boot is the
    one the start then shares, and the VM is left to the idle clock as after any boot.
    """
    reactor, hypervisor, lifecycle, [(inbound, transport)] = booting(1)
    assert lifecycle.state.value == "booting"
    hang_up(inbound, transport)
    assert transport.disconnecting and not transport.aborted
    snapshot = lifecycle.snapshot()
    assert (snapshot.active_connections, snapshot.waiting_connections) == (0, 0)
    assert lifecycle.state.value == "booting", "the boot it began goes on"
    started = lifecycle.startNow()
    hypervisor.becomeReady(guest=ReadyGuest("192.168.64.2", 22))
    assert started.result.booted and reactor.tcpClients == [], "shared, and never spliced"
    assert lifecycle.snapshot().idle_stop_in == 60, "nothing holds the VM up"
    reactor.advance(60)
    assert lifecycle.state.value in ("stopping", "stopped")


def test_a_vm_that_dies_while_booting_closes_each_waiting_client_once_and_in_order() -> None:
    _reactor, hypervisor, _lifecycle, accepted = booting(2)
    with capturedLogs() as events:
        hypervisor.last.ended.callback(Status("exited with status 1"))
    closing = [e for e in events if "closing the connection" in e.get("log_format", "")]
    assert len(closing) == 2, [e["log_format"] for e in events]
    for _, transport in accepted:
        assert transport.disconnecting and not transport.aborted, "an EOF, not a reset"


def test_a_vm_that_dies_with_spliced_connections_resets_both_sides() -> None:
    reactor, hypervisor, _lifecycle, accepted = booting(1)
    hypervisor.becomeReady(guest=ReadyGuest("192.168.64.2", 22))
    _, guest_transport, _ = connect_guest(reactor)
    hypervisor.last.ended.callback(Status("exited with status 1"))
    (_inbound, transport) = accepted[0]
    assert transport.aborted and guest_transport.aborted


EVENTS = ["ready", "fail", "clientData", "clientEOF", "guestEOF", "clientLost", "guestLost"]


@pytest.mark.parametrize("order", list(itertools.permutations(EVENTS, 4)))
def test_accounting_exactly_once_in_any_order(order) -> None:
    """Whatever happens, the lifecycle hears of the close exactly once, and only then."""
    backend = Backend()
    reactor, inbound, client = accept(backend)
    guest_side = None
    for event in order:
        if event == "ready" and not backend.ready.called:
            backend.ready.callback(guest())
            if reactor.tcpClients:
                guest_side, _, _ = connect_guest(reactor)
        elif event == "fail" and not backend.ready.called:
            backend.ready.errback(VMUnavailable("boot failed"))
        elif event == "clientData" and not client.disconnected:
            inbound.dataReceived(b"x")
        elif event == "clientEOF":
            inbound.readConnectionLost()
        elif event == "guestEOF" and guest_side is not None:
            guest_side.readConnectionLost()
        elif event == "clientLost" and not client.disconnected:
            client.disconnected = True
            inbound.connectionLost(None)
        elif event == "guestLost" and guest_side is not None:
            guest_side.connectionLost(None)
    if not client.disconnected:
        client.disconnected = True
        inbound.connectionLost(None)
    assert backend.opened == [inbound]
    assert backend.closed == [inbound]


def test_the_factory_counts_its_open_connections_for_admission() -> None:
    reactor = FakeReactor()
    factory = ProxyFactory(reactor, Backend())
    connections = []
    for _ in range(3):
        transport = Transport()
        inbound = factory.buildProtocol(transport.getPeer())
        assert inbound is not None
        inbound.makeConnection(transport)
        connections.append(inbound)
    assert factory.openConnections == 3
    # Twice, with no reason (it is not read): the count falls once.
    connections[0].connectionLost(None)  # type: ignore[arg-type]
    connections[0].connectionLost(None)  # type: ignore[arg-type]
    assert factory.openConnections == 2


# -- connecting to the guest: a bounded number at once, and a silent guest tried again


def waiting_clients(count: int):
    backend = Booting()
    reactor = FakeReactor()
    factory = ProxyFactory(reactor, backend)
    clients = []
    for _ in range(count):
        transport = Transport()
        inbound = factory.buildProtocol(transport.getPeer())
        assert inbound is not None
        inbound.makeConnection(transport)
        clients.append((inbound, transport))
    return reactor, backend, clients


def test_at_most_a_bounded_number_of_guest_connects_are_in_flight() -> None:
    reactor, backend, clients = waiting_clients(GUEST_CONNECTS + 8)
    backend.becomeReady(guest())
    assert len(reactor.tcpClients) == GUEST_CONNECTS, "the rest wait for a slot"
    connect_guest(reactor, index=0)
    assert len(reactor.tcpClients) == GUEST_CONNECTS + 1, "a guest that spoke frees its slot"
    connect_guest(reactor, index=1, banner=b"")
    assert len(reactor.tcpClients) == GUEST_CONNECTS + 1, "connected is not enough"
    clients[-1][0].connectionLost(None)
    for index in range(2, GUEST_CONNECTS + 1):
        connect_guest(reactor, index=index)
    assert len(reactor.tcpClients) == GUEST_CONNECTS + 7, "the client that left took no slot"
    for index in range(GUEST_CONNECTS + 1, GUEST_CONNECTS + 7):
        connect_guest(reactor, index=index)
    spliced = [inbound for inbound, _ in clients if inbound.spliced]
    assert len(spliced) == GUEST_CONNECTS + 6, "all but the silent one and the one that left"


def test_a_guest_that_says_nothing_is_tried_again_then_the_client_is_closed() -> None:
    reactor, backend, [(inbound, client)] = waiting_clients(1)
    inbound.dataReceived(b"SSH-2.0-client\r\n")
    backend.becomeReady(guest())
    silent = []
    with capturedLogs() as events:
        for attempt in range(GUEST_ATTEMPTS):
            assert len(reactor.tcpClients) == attempt + 1
            _, transport, _ = connect_guest(reactor, banner=b"")
            silent.append(transport)
            reactor.advance(BANNER_SECONDS - 0.1)
            assert not transport.aborted
            reactor.advance(0.1)
            assert transport.aborted, "a silent guest connection is dropped"
    assert len(reactor.tcpClients) == GUEST_ATTEMPTS, "bounded"
    assert client.disconnecting and not inbound.spliced
    lines = [formatEvent(e) for e in events]
    assert sum("trying again" in line for line in lines) == GUEST_ATTEMPTS - 1
    assert any(
        f"said nothing in 5 s for {client.getPeer()}, {GUEST_ATTEMPTS} times: closing" in line
        for line in lines
    ), lines
    assert inbound.factory.guestConnects.tokens == GUEST_CONNECTS, "every slot given back"


def test_a_retry_after_an_early_close_serves_the_client_with_what_it_sent() -> None:
    reactor, backend, [(inbound, client)] = waiting_clients(1)
    inbound.dataReceived(b"SSH-2.0-client\r\n")
    backend.becomeReady(guest())
    first, first_transport, _ = connect_guest(reactor, banner=b"")
    first.readConnectionLost()
    first.connectionLost(None)
    assert first_transport.disconnecting
    _, second_transport, _ = connect_guest(reactor)
    assert second_transport.value() == b"SSH-2.0-client\r\n"
    assert client.value() == BANNER and inbound.spliced
    assert inbound.factory.guestConnects.tokens == GUEST_CONNECTS


def test_a_client_leaving_while_the_guest_is_silent_gives_its_slot_back() -> None:
    reactor, backend, [(inbound, _client)] = waiting_clients(1)
    backend.becomeReady(guest())
    connect_guest(reactor, banner=b"")
    inbound.connectionLost(None)
    assert reactor.connectors[-1]._disconnected, "the connection is dropped"
    assert inbound.factory.guestConnects.tokens == GUEST_CONNECTS
    reactor.advance(BANNER_SECONDS)
    assert len(reactor.tcpClients) == 1, "no retry for a client that is gone"


def test_on_the_relay_path_a_silent_guest_socket_is_given_up_as_silent() -> None:
    from virby.daemon.proxy import GuestSilent

    reactor, _backend, [(inbound, _client)] = waiting_clients(1)
    upstream, guest_end = socket.socketpair()
    upstream.setblocking(False)
    outcome: list = []
    inbound._awaitBanner(upstream).addBoth(outcome.append)
    reactor.advance(BANNER_SECONDS)
    [failure] = outcome
    assert failure.check(GuestSilent) and "said nothing in 5 s" in failure.getErrorMessage()
    assert upstream.fileno() == -1 and not reactor.readers
    guest_end.close()


# -- a client that says nothing


def lose(inbound, transport) -> None:
    """The transport, closing, reports the loss (as the reactor would, a turn later)."""
    if transport.disconnecting and not transport.disconnected:
        transport.disconnected = True
        inbound.connectionLost(None)


def test_a_client_that_sends_nothing_is_closed_and_stops_holding_the_vm() -> None:
    reactor, _hypervisor, lifecycle, [(silent, silent_transport), (talker, talker_transport)] = (
        booting(2)
    )
    talker.dataReceived(b"SSH-2.0-client\r\n")
    assert lifecycle.snapshot().waiting_connections == 2, "both wait for the boot"
    with capturedLogs() as events:
        reactor.advance(CLIENT_SILENCE_SECONDS - 1)
        assert not silent_transport.disconnecting
        reactor.advance(1)
    assert silent_transport.disconnecting and not silent_transport.aborted
    assert not talker_transport.disconnecting, "a client that spoke stays"
    assert any(
        "port=40000): it sent nothing in 30 s, as no SSH client does" in formatEvent(e)
        for e in events
    )
    lose(silent, silent_transport)
    assert lifecycle.snapshot().waiting_connections == 1


def test_a_spliced_client_that_sends_nothing_is_closed_with_its_guest_side() -> None:
    backend = Backend(succeed(guest()))
    reactor, inbound, client = accept(backend)
    _guest_side, guest_transport, _ = connect_guest(reactor)
    assert inbound.spliced and client.value() == BANNER
    reactor.advance(CLIENT_SILENCE_SECONDS)
    assert client.disconnecting and guest_transport.disconnecting
    lose(inbound, client)
    assert backend.closed == [inbound]


def test_a_spliced_client_that_spoke_outlives_the_bound() -> None:
    backend = Backend(succeed(guest()))
    reactor, inbound, client = accept(backend)
    connect_guest(reactor)
    inbound.dataReceived(b"SSH-2.0-client\r\n")
    reactor.advance(CLIENT_SILENCE_SECONDS * 10)
    assert not client.disconnecting


def test_a_closed_client_leaves_no_timer_behind() -> None:
    backend = Backend()
    reactor, inbound, _client = accept(backend)
    inbound.connectionLost(None)
    assert reactor.getDelayedCalls() == []


def test_a_probe_connection_that_says_nothing_is_replaced_by_a_connect() -> None:
    backend = Booting()
    reactor = FakeReactor()
    _, inbound, client = accept(backend, reactor=reactor)
    probe = Probe(b"")
    backend.becomeReady(ReadyGuest("192.168.64.2", 22, probe))  # type: ignore[arg-type]
    assert reactor.tcpClients == []
    reactor.advance(BANNER_SECONDS)
    assert probe.transport.aborted
    assert [c[:2] for c in reactor.tcpClients] == [("192.168.64.2", 22)]
    connect_guest(reactor)
    assert inbound.spliced and client.value() == BANNER
