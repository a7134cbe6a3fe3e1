"""How many connections the daemon serves at once, and what happens past that."""

from __future__ import annotations

import resource
import socket

import pytest
from twisted.internet.interfaces import ILoggingContext
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from virby.daemon.capacity import (
    RESERVED_DESCRIPTORS,
    ConnectionLimit,
    DescriptorLimit,
    adjustDescriptorLimit,
    pipesWithin,
    widenAcceptQueue,
)

INFINITY = resource.RLIM_INFINITY


class Limits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def put(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.set.append(limits)
        self.soft, self.hard = limits


def adjust(reactor, limits: Limits, splicing: bool = False) -> DescriptorLimit:
    return adjustDescriptorLimit(
        reactor, getrlimit=limits.get, setrlimit=limits.put, splicing=splicing
    )


def select_reactor() -> SelectReactor:
    return SelectReactor.__new__(SelectReactor)  # the type is all that counts


@pytest.mark.parametrize(
    ("reactor", "soft", "hard", "result"),
    [
        (MemoryReactorClock, 256, INFINITY, 4096),  # launchd's default: raised
        (MemoryReactorClock, 256, 2000, 2000),  # as far as the hard limit goes
        (MemoryReactorClock, 256, 256, 256),  # nothing to raise
        (MemoryReactorClock, 65536, INFINITY, 65536),  # never lowered
        (select_reactor, 256, INFINITY, 1024),  # macOS's default reactor: up to select's ceiling
        (select_reactor, 4096, INFINITY, 1024),  # ... and lowered to it
        (select_reactor, 256, 512, 512),
    ],
)
def test_the_soft_limit_is_raised_as_far_as_it_sensibly_goes(reactor, soft, hard, result) -> None:
    limits = Limits(soft, hard)
    limit = adjust(reactor(), limits)
    assert limit.soft == limits.soft == result and limit.before == soft
    assert limits.set == ([] if result == soft else [(result, hard)])
    assert limit.connections == (result - RESERVED_DESCRIPTORS) // 2


@pytest.mark.parametrize("soft", [256, 1000, 1024, 4096, 20000, 65536])
def test_connections_and_the_relays_pipes_fit_in_the_open_files_together(soft) -> None:
    """
    Every connection holds two descriptors, and every pipe the relay may hold two more: the
    capacity the daemon states must leave room for both, and the pool must be held to it.
    """
    limit = adjust(MemoryReactorClock(), Limits(soft, soft), splicing=True)
    assert limit.pipes == pipesWithin(soft) > 0
    assert RESERVED_DESCRIPTORS + 2 * limit.pipes + 2 * limit.connections <= limit.soft
    assert f"beside up to {limit.pipes} pipes" in limit.describe()
    assert f"beside {limit.pipes} pipes of two" in limit.why()


def test_without_splice_the_budget_is_all_connections() -> None:
    limit = adjust(MemoryReactorClock(), Limits(256, 256))
    assert limit.pipes == 0 and limit.connections == (256 - RESERVED_DESCRIPTORS) // 2


def test_a_limit_that_cannot_be_raised_is_kept_and_said(tmp_path) -> None:
    limit = adjust(MemoryReactorClock(), Limits(256, INFINITY, refuse=True))
    assert limit.soft == 256 and limit.connections == 96
    assert "could not be set to 4096: not allowed" in limit.describe()


def test_the_description_states_the_connections() -> None:
    limit = adjust(select_reactor(), Limits(256, INFINITY))
    assert limit.describe() == (
        "open files: 1024 (started with 256, hard limit unlimited); serving up to 480 "
        "connections at once (the select reactor watches descriptors below 1024 only)"
    )


# Stand-ins of what the limit only passes on or formats: a port that is only its socket,
# a factory that builds strings, peers that are names.  They are not the types asked for,
# on purpose, and each use says so with an ignore.
class Port:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def queued(listener: socket.socket, clients: int) -> int:
    """How many of C{clients} simultaneous connections the kernel queues unaccepted."""
    port = listener.getsockname()
    made = []
    for _ in range(clients):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(port)
        made.append(client)
    listener.setblocking(False)
    count = 0
    try:
        while True:
            listener.accept()[0].close()
            count += 1
    except BlockingIOError:
        pass
    for client in made:
        client.close()
    return count


def test_an_adopted_socket_gets_a_wider_accept_queue() -> None:
    """listen() again on a listening socket sets its queue anew (Linux; XNU alike)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        assert widenAcceptQueue(Port(listener), 256)  # type: ignore[arg-type]
        assert queued(listener, 100) == 100


def test_a_port_without_a_stream_socket_is_left_alone() -> None:
    assert not widenAcceptQueue(object())  # type: ignore[arg-type]


class Wrapped:
    def __init__(self) -> None:
        self.built: list = []
        self.started = self.stopped = 0

    def doStart(self) -> None:
        self.started += 1

    def doStop(self) -> None:
        self.stopped += 1

    def buildProtocol(self, addr):
        self.built.append(addr)
        return f"protocol for {addr}"


class PausablePort:
    """A listening port as the limit drives it: reading or not, and its accepts per event."""

    def __init__(self) -> None:
        self.reading = True
        self.numberAccepts = 100

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_at_the_limit_the_ports_stop_accepting_until_a_connection_ends(logged) -> None:
    clock = Clock()
    wrapped = Wrapped()
    open_now = [0]
    limit = ConnectionLimit(wrapped, 3, lambda: open_now[0], clock, "a reason")  # type: ignore[arg-type]
    ports = [PausablePort(), PausablePort()]
    limit.attach([*ports, object()])
    assert [p.numberAccepts for p in ports] == [3, 3], "no event accepts more than fit"
    limit.doStart()
    for peer in ("a", "b"):
        assert limit.buildProtocol(peer) == f"protocol for {peer}"  # type: ignore[arg-type]
        open_now[0] += 1
        assert all(p.reading for p in ports) and not limit.paused
    clock.advance(0)
    assert [p.numberAccepts for p in ports] == [1, 1]
    clock.advance(5)
    assert limit.buildProtocol("c") == "protocol for c"  # type: ignore[arg-type]
    open_now[0] += 1
    assert not any(p.reading for p in ports) and limit.paused, "the rest wait in the kernel"
    assert limit.refused == 0
    clock.advance(7.25)
    open_now[0] -= 1
    limit.ended()
    assert all(p.reading for p in ports) and not limit.paused
    assert limit.pauses == 1
    assert [line for line in logged if "accept queue" in line] == [
        "holding new connections in the accept queue: 3 are open, the most this daemon "
        "serves at once (a reason); they are accepted as others end",
        "accepting again: new connections waited in the accept queue for 7.2 s while 3 were open",
    ]
    limit.ended()
    assert limit.pauses == 1
    limit.doStop()
    assert (wrapped.started, wrapped.stopped) == (1, 1)


def test_a_retiring_daemons_ports_stay_paused_whatever_ends_after(logged) -> None:
    """Once the daemon retires, connections queued meanwhile are for the next daemon."""
    clock = Clock()
    open_now = [0]
    limit = ConnectionLimit(Wrapped(), 1, lambda: open_now[0], clock, "a reason")  # type: ignore[arg-type]
    port = PausablePort()
    limit.attach([port])
    limit.buildProtocol("a")  # type: ignore[arg-type]
    open_now[0] = 1
    assert limit.paused and not port.reading
    limit.detach()
    open_now[0] = 0
    limit.ended()
    assert not port.reading


def test_past_the_limit_connections_are_closed_and_every_one_counted(logged) -> None:
    """Where no port can pause (or one arrives from another port), each is closed."""
    clock = Clock()
    wrapped = Wrapped()
    open_now = [0]
    limit = ConnectionLimit(wrapped, 2, lambda: open_now[0], clock, "a reason")  # type: ignore[arg-type]
    assert ILoggingContext.providedBy(limit) and limit.logPrefix() == "Wrapped"
    limit.doStart()
    assert limit.buildProtocol("a") == "protocol for a"  # type: ignore[arg-type]
    open_now[0] = 2
    assert limit.buildProtocol("b") is None and limit.buildProtocol("c") is None  # type: ignore[arg-type]
    assert wrapped.built == ["a"] and limit.refused == 2
    warnings = [line for line in logged if "clos" in line]
    assert warnings == [
        "closing a new connection from b: 2 are open, the most this daemon serves at once "
        "(a reason)"
    ]
    for peer in range(549):
        clock.advance(0.01)
        assert limit.buildProtocol(str(peer)) is None  # type: ignore[arg-type]
    clock.advance(10)
    warnings = [line for line in logged if "clos" in line]
    assert warnings[1:] == [
        "closed 550 more new connections at the limit of 2 (in all 551 since the daemon started)"
    ], "every one counted, though none came after"
    open_now[0] = 1
    assert limit.buildProtocol("e") == "protocol for e"  # type: ignore[arg-type]
    limit.doStop()
    assert (wrapped.started, wrapped.stopped) == (1, 1)
