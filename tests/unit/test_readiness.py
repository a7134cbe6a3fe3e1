"""Readiness: the banner probe and the wait for the guest, on a memory reactor."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tests.fakes import FakeReactor
from virby.daemon.readiness import (
    FAST_PROBING,
    LATE_PROBE_INTERVAL,
    PROBE_INTERVAL,
    BootTimeout,
    ProbeError,
    ReadyGuest,
    probeBanner,
    waitForGuest,
)
from virby.leases import LeaseFileError


def results(d) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


def connect(reactor: FakeReactor, index: int = -1):
    """Complete the pending connectTCP: returns (protocol, transport)."""
    factory = reactor.tcpClients[index][2]
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def refuse(reactor: FakeReactor, index: int = -1) -> None:
    factory = reactor.tcpClients[index][2]
    # No connector: the probe's factory does not look at it.
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # type: ignore[arg-type]


def test_banner_after_preamble_lines_and_the_connection_is_kept() -> None:
    reactor = FakeReactor()
    got = results(probeBanner(reactor, "192.168.64.2", 22, 2))
    assert reactor.tcpClients[0][:2] == ("192.168.64.2", 22)
    protocol, transport = connect(reactor)
    protocol.dataReceived(b"hello there\r\nSSH-2.0-Open")
    assert got == []
    protocol.dataReceived(b"SSH_9.2\r\n")
    assert got == [protocol] and protocol.banner == "SSH-2.0-OpenSSH_9.2"
    assert protocol.received == b"hello there\r\nSSH-2.0-OpenSSH_9.2\r\n"
    assert not transport.disconnecting, "kept open for the first waiting client"
    assert transport.producerState == "paused", "and not read any further"
    reactor.advance(10)
    assert not transport.disconnecting, "the probe's timeout ended with the banner"


def test_not_ssh() -> None:
    reactor = FakeReactor()
    got = results(probeBanner(reactor, "h", 22, 2))
    protocol, _ = connect(reactor)
    protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n" + b"x" * 2000)
    assert got[0].check(ProbeError)


def test_closed_before_banner() -> None:
    reactor = FakeReactor()
    got = results(probeBanner(reactor, "h", 22, 2))
    protocol, _ = connect(reactor)
    protocol.connectionLost(None)
    assert got[0].check(ProbeError)


def test_probe_times_out() -> None:
    reactor = FakeReactor()
    got = results(probeBanner(reactor, "h", 22, 2))
    connect(reactor)
    reactor.advance(2)
    assert got[0].check(Exception)
    assert (
        reactor.connectors[0]._disconnected
        if hasattr(reactor.connectors[0], "_disconnected")
        else True
    )


class Leases:
    def __init__(self) -> None:
        self.ip: str | None = None
        self.calls = 0
        self.error: Exception | None = None

    def __call__(self) -> str | None:
        self.calls += 1
        if self.error:
            raise self.error
        return self.ip


def test_waits_for_a_lease_then_a_banner() -> None:
    reactor = FakeReactor()
    leases = Leases()
    got = results(waitForGuest(reactor, leases, 22, timeout=30, interval=0.25))
    for _ in range(4):
        reactor.advance(0.25)
    assert reactor.tcpClients == [] and leases.calls == 5
    leases.ip = "192.168.64.5"
    reactor.advance(0.25)
    assert len(reactor.tcpClients) == 1
    reactor.advance(1)
    assert len(reactor.tcpClients) == 1, "never two probes in flight"
    refuse(reactor)
    reactor.advance(0.25)
    assert len(reactor.tcpClients) == 2, "a refused probe is retried"
    protocol, _ = connect(reactor)
    protocol.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert [g.address for g in got] == [("192.168.64.5", 22)]
    assert got[0].claim() is protocol
    assert not [c for c in reactor.getDelayedCalls() if c.active()]


def pending(reactor: FakeReactor) -> list[float]:
    """The delays of the timers that are set, soonest first."""
    now = reactor.seconds()
    return sorted(round(c.getTime() - now, 6) for c in reactor.getDelayedCalls() if c.active())


def test_once_the_guest_refuses_probes_are_retried_soon_and_only_then() -> None:
    """Fast, and no busy loop: one timer, PROBE_INTERVAL after each refusal, nothing else."""
    reactor = FakeReactor()
    leases = Leases()
    leases.ip = "192.168.64.5"
    waitForGuest(reactor, leases, 22, timeout=30, interval=0.25)
    for attempt in range(1, 4):
        assert len(reactor.tcpClients) == attempt
        refuse(reactor)
        assert pending(reactor) == [PROBE_INTERVAL, round(30 - reactor.seconds(), 6)]
        reactor.advance(PROBE_INTERVAL * 0.9)
        assert len(reactor.tcpClients) == attempt
        reactor.advance(PROBE_INTERVAL * 0.1)
    assert PROBE_INTERVAL <= 0.002


def test_fast_probing_lasts_a_while_after_the_first_refusal() -> None:
    reactor = FakeReactor()
    leases = Leases()
    leases.ip = "192.168.64.5"
    waitForGuest(reactor, leases, 22, timeout=600, interval=0.25)
    refuse(reactor)
    reactor.advance(FAST_PROBING)
    refuse(reactor)
    assert pending(reactor)[0] == LATE_PROBE_INTERVAL


def test_a_probe_that_gets_no_answer_is_retried_at_the_lease_interval() -> None:
    """A guest whose network is not up yet (a stale lease) is not probed in a tight loop."""
    reactor = FakeReactor()
    leases = Leases()
    leases.ip = "192.168.64.5"
    waitForGuest(reactor, leases, 22, timeout=600, interval=0.25, probeTimeout=2)
    connect(reactor)
    reactor.advance(2)
    assert len(reactor.tcpClients) == 1
    assert pending(reactor)[0] == 0.25


def test_a_fresh_lease_replaces_a_stale_one() -> None:
    reactor = FakeReactor()
    leases = Leases()
    leases.ip = "192.168.64.5"
    got = results(waitForGuest(reactor, leases, 22, timeout=30))
    refuse(reactor)
    leases.ip = "192.168.64.6"
    reactor.advance(0.25)
    assert reactor.tcpClients[-1][0] == "192.168.64.6"
    protocol, _ = connect(reactor)
    protocol.dataReceived(b"SSH-2.0-x\n")
    assert [g.address for g in got] == [("192.168.64.6", 22)]


def test_no_lease_timeout_says_so() -> None:
    reactor = FakeReactor()
    got = results(waitForGuest(reactor, Leases(), 22, timeout=10, what="MAC 02:00:00:00:00:01"))
    reactor.advance(10)
    error = got[0].value
    assert isinstance(error, BootTimeout) and error.reason == "no-lease"
    assert "MAC 02:00:00:00:00:01" in str(error) and "firewall" in str(error)
    assert not [c for c in reactor.getDelayedCalls() if c.active()]


def test_no_ssh_timeout_names_the_address_and_last_error() -> None:
    reactor = FakeReactor()
    leases = Leases()
    leases.ip = "192.168.64.9"
    got = results(waitForGuest(reactor, leases, 2222, timeout=5))
    refuse(reactor)
    reactor.advance(5)
    error = got[0].value
    assert isinstance(error, BootTimeout) and error.reason == "no-ssh"
    assert "192.168.64.9" in str(error) and "2222" in str(error)
    assert "refused" in str(error).lower()


def test_an_unreadable_lease_file_fails_at_once() -> None:
    reactor = FakeReactor()
    leases = Leases()
    leases.error = LeaseFileError("cannot read the lease file /x")
    got = results(waitForGuest(reactor, leases, 22, timeout=30))
    assert got[0].check(LeaseFileError)
    assert not [c for c in reactor.getDelayedCalls() if c.active()]


def test_cancel_stops_everything() -> None:
    reactor = FakeReactor()
    leases = Leases()
    leases.ip = "192.168.64.5"
    waiting = waitForGuest(reactor, leases, 22, timeout=30)
    got = results(waiting)
    connect(reactor)
    waiting.cancel()
    assert got[0].check(CancelledError)
    calls = leases.calls
    reactor.advance(60)
    assert leases.calls == calls
    assert not [c for c in reactor.getDelayedCalls() if c.active()]


@pytest.mark.parametrize("banner", [b"SSH-1.99-old\n", b"SSH-2.0-x\r\n"])
def test_banner_versions(banner) -> None:
    reactor = FakeReactor()
    got = results(probeBanner(reactor, "h", 22, 2))
    protocol, _ = connect(reactor)
    protocol.dataReceived(banner)
    assert got[0].banner == banner.rstrip(b"\r\n").decode()


def test_a_ready_guest_lends_its_connection_once_and_closes_it_if_unclaimed() -> None:
    reactor = FakeReactor()
    got = results(probeBanner(reactor, "h", 22, 2))
    protocol, transport = connect(reactor)
    protocol.dataReceived(b"SSH-2.0-x\r\n")
    ready = ReadyGuest("h", 22, got[0])
    assert ready.claim() is protocol and ready.claim() is None
    ready.release()
    assert not transport.disconnecting, "a claimed connection is the client's"
    other = ReadyGuest("h", 22, got[0])
    other.release()
    assert transport.disconnecting


def test_a_spare_lost_before_it_is_claimed_is_not_lent() -> None:
    reactor = FakeReactor()
    got = results(probeBanner(reactor, "h", 22, 2))
    protocol, _ = connect(reactor)
    protocol.dataReceived(b"SSH-2.0-x\r\n")
    protocol.connectionLost(None)
    assert ReadyGuest("h", 22, got[0]).claim() is None


def test_attach_hands_the_transport_to_another_protocol() -> None:
    from twisted.internet.protocol import Protocol

    reactor = FakeReactor()
    got = results(probeBanner(reactor, "h", 22, 2))
    protocol, transport = connect(reactor)
    transport.protocol = protocol
    protocol.dataReceived(b"SSH-2.0-x\r\n")
    taker = Protocol()
    got[0].attach(taker)
    assert transport.protocol is taker and taker.transport is transport
