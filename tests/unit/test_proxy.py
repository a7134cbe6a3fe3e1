"""The splice, on string transports and a memory reactor."""

from __future__ import annotations

import itertools

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from virby.lifecycle import VMUnavailable
from virby.proxy import ProxyFactory, is_loopback


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


def accept(backend: Backend, peer=None):
    reactor = MemoryReactorClock()
    factory = ProxyFactory(reactor, backend, connectTimeout=7)
    transport = Transport(peer)
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    return reactor, protocol, transport


def connect_guest(reactor: MemoryReactorClock):
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    guest = factory.buildProtocol(None)
    transport = Transport(IPv4Address("TCP", host, port))
    guest.makeConnection(transport)
    return guest, transport, (host, port, timeout)


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
    assert is_loopback(address) is allowed
    factory = ProxyFactory(MemoryReactorClock(), Backend())
    assert (factory.buildProtocol(address) is not None) is allowed


def test_waits_paused_then_splices_with_held_bytes_first() -> None:
    backend = Backend()
    reactor, inbound, client = accept(backend)
    assert backend.opened == [inbound]
    assert client.producerState == "paused" and client.noDelay
    inbound.dataReceived(b"SSH-2.0-client\r\n")
    assert reactor.tcpClients == []
    backend.ready.callback(("192.168.64.2", 22))
    guest, guest_transport, (host, port, timeout) = connect_guest(reactor)
    assert (host, port, timeout) == ("192.168.64.2", 22, 7)
    assert guest_transport.value() == b"SSH-2.0-client\r\n"
    assert client.producerState == "producing"
    assert guest_transport.noDelay
    inbound.dataReceived(b"more")
    guest.dataReceived(b"SSH-2.0-guest\r\n")
    assert guest_transport.value().endswith(b"more")
    assert client.value() == b"SSH-2.0-guest\r\n"


def test_backpressure_both_ways() -> None:
    backend = Backend(succeed(("g", 22)))
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
    backend = Backend(succeed(("g", 22)))
    reactor, inbound, client = accept(backend)
    guest, guest_transport, _ = connect_guest(reactor)
    inbound.dataReceived(b"request")
    inbound.readConnectionLost()
    assert guest_transport.writeClosed, "EOF passed on to the guest"
    assert not client.disconnecting and not guest_transport.disconnecting
    guest.dataReceived(b"answer")
    assert client.value() == b"answer", "the guest's answer still flows after the EOF"
    guest.readConnectionLost()
    assert client.writeClosed
    assert client.disconnecting and guest_transport.disconnecting


def test_half_close_guest_first() -> None:
    backend = Backend(succeed(("g", 22)))
    reactor, inbound, client = accept(backend)
    guest, guest_transport, _ = connect_guest(reactor)
    guest.readConnectionLost()
    assert client.writeClosed and not client.disconnecting
    inbound.dataReceived(b"late")
    assert guest_transport.value() == b"late"
    inbound.readConnectionLost()
    assert client.disconnecting and guest_transport.disconnecting


def test_client_eof_while_waiting_is_passed_on_after_connect() -> None:
    backend = Backend()
    reactor, inbound, _client = accept(backend)
    inbound.dataReceived(b"x")
    inbound.readConnectionLost()
    backend.ready.callback(("g", 22))
    _, guest_transport, _ = connect_guest(reactor)
    assert guest_transport.value() == b"x" and guest_transport.writeClosed


def test_boot_failure_closes_the_client() -> None:
    backend = Backend(fail(VMUnavailable("the VM did not boot: no lease")))
    reactor, inbound, client = accept(backend)
    assert client.disconnecting and reactor.tcpClients == []
    inbound.connectionLost(None)
    assert backend.closed == [inbound]


def test_guest_refusal_closes_the_client() -> None:
    backend = Backend(succeed(("g", 22)))
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


def test_client_leaving_closes_the_guest_side() -> None:
    backend = Backend(succeed(("g", 22)))
    reactor, inbound, _client = accept(backend)
    guest, guest_transport, _ = connect_guest(reactor)
    inbound.connectionLost(None)
    assert guest_transport.disconnecting
    guest.connectionLost(None)
    assert backend.closed == [inbound]


def test_guest_leaving_closes_the_client() -> None:
    backend = Backend(succeed(("g", 22)))
    reactor, _inbound, client = accept(backend)
    guest, _, _ = connect_guest(reactor)
    guest.connectionLost(None)
    assert client.disconnecting


def test_abort_closes_both_sides_now() -> None:
    backend = Backend(succeed(("g", 22)))
    reactor, inbound, client = accept(backend)
    _, guest_transport, _ = connect_guest(reactor)
    inbound.abort("the VM exited with status 1")
    assert client.aborted and guest_transport.aborted


EVENTS = ["ready", "fail", "clientData", "clientEOF", "guestEOF", "clientLost", "guestLost"]


@pytest.mark.parametrize("order", list(itertools.permutations(EVENTS, 4)))
def test_accounting_exactly_once_in_any_order(order) -> None:
    """Whatever happens, the lifecycle hears of the close exactly once, and only then."""
    backend = Backend()
    reactor, inbound, client = accept(backend)
    guest = None
    for event in order:
        if event == "ready" and not backend.ready.called:
            backend.ready.callback(("g", 22))
            if reactor.tcpClients:
                guest, _, _ = connect_guest(reactor)
        elif event == "fail" and not backend.ready.called:
            backend.ready.errback(VMUnavailable("boot failed"))
        elif event == "clientData" and not client.disconnected:
            inbound.dataReceived(b"x")
        elif event == "clientEOF":
            inbound.readConnectionLost()
        elif event == "guestEOF" and guest is not None:
            guest.readConnectionLost()
        elif event == "clientLost" and not client.disconnected:
            client.disconnected = True
            inbound.connectionLost(None)
        elif event == "guestLost" and guest is not None:
            guest.connectionLost(None)
    if not client.disconnected:
        client.disconnected = True
        inbound.connectionLost(None)
    assert backend.opened == [inbound]
    assert backend.closed == [inbound]
