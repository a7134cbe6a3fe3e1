"""
The relay on real loopback sockets, driven by a memory reactor: the test dispatches the
readiness events itself (a C{select} on the descriptors the relay registered), so every
step is an event the kernel reported, in an order the test controls.
"""

from __future__ import annotations

import fcntl
import os
import resource
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fakes import FakeReactor
from virby.daemon import relay
from virby.daemon.relay import CHUNK, PIPE_SIZE, BufferPool, PipePool, Relay

#: splice(2) is Linux's: its tests are deselected where the package is checked on a Mac.
PATHS = [pytest.param("splice", marks=pytest.mark.linux), "portable"]


def open_fds() -> set[int]:
    """
    The descriptors open in this process, asked of each one (C{F_GETFD}): no C{/proc} (a Mac
    has none) and no C{/dev/fd} (Linux's is a link into C{/proc}).
    """
    limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)
    found = set()
    for fd in range(limit):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        found.add(fd)
    return found


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """(the outside peer, the daemon's side) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        side, _ = server.accept()
    for s in (peer, side):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return peer, side


class Bench:
    """A relay between two loopback connections, and the two outside peers."""

    def __init__(
        self,
        path: str,
        toGuest: bytes = b"",
        toClient: bytes = b"",
        pipes=None,
        reactor=None,
        buffers=None,
    ):
        self.reactor = reactor or FakeReactor()
        self.client, clientSide = connected_pair()
        self.guest, guestSide = connected_pair()
        self.sides = (clientSide, guestSide)
        self.outcome: list = []
        if pipes is None and path == "splice":
            pipes = PipePool(self.reactor)
        self.pipes = pipes
        self.relay = Relay(
            self.reactor,
            clientSide,
            guestSide,
            done=self.outcome.append,
            toGuest=toGuest,
            toClient=toClient,
            pipes=pipes,
            buffers=buffers,
        )

    def registered(self) -> Iterator:
        yield from self.reactor.readers
        yield from self.reactor.writers

    def step(self, timeout: float) -> bool:
        """Dispatch the events the kernel reports within C{timeout}; False if none came."""
        readers, writers = list(self.reactor.readers), list(self.reactor.writers)
        if not readers and not writers:
            self.reactor.advance(0)
            return False
        readable, writable, _ = select.select(readers, writers, [], timeout)
        for end in readable:
            if end in self.reactor.readers:
                end.doRead()
        for end in writable:
            if end in self.reactor.writers:
                end.doWrite()
        self.reactor.advance(0)
        return bool(readable or writable)

    def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Dispatch events until C{condition} holds; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            assert left > 0, "the condition did not hold in time"
            self.step(min(left, 0.5))

    def receive(self, peer: socket.socket, size: int) -> bytes:
        """Read exactly C{size} bytes at C{peer}, moving the relay meanwhile."""
        got = bytearray()

        def enough() -> bool:
            while len(got) < size:
                try:
                    chunk = peer.recv(size - len(got))
                except BlockingIOError:
                    return False
                if not chunk:
                    raise AssertionError(f"EOF after {len(got)} of {size} bytes")
                got.extend(chunk)
            return True

        self.until(enough)
        return bytes(got)

    def sendAll(self, peer: socket.socket, data: bytes) -> None:
        view = memoryview(data)

        def sent() -> bool:
            nonlocal view
            while view:
                try:
                    view = view[peer.send(view) :]
                except BlockingIOError:
                    return False
            return True

        self.until(sent)

    def eof(self, peer: socket.socket) -> bool:
        try:
            return peer.recv(1) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        for s in (self.client, self.guest, *self.sides):
            s.close()


@pytest.fixture(params=PATHS)
def path(request) -> str:
    return request.param


def test_bytes_both_ways_with_what_came_before_first(path) -> None:
    bench = Bench(path, toGuest=b"SSH-2.0-client\r\n", toClient=b"SSH-2.0-guest\r\n")
    bench.relay.start()
    bench.client.send(b"kexinit")
    assert bench.receive(bench.guest, 23) == b"SSH-2.0-client\r\nkexinit"
    assert bench.receive(bench.client, 15) == b"SSH-2.0-guest\r\n"
    bench.guest.send(b"answer")
    assert bench.receive(bench.client, 6) == b"answer"
    assert (bench.relay.bytesToGuest, bench.relay.bytesToClient) == (23, 21)
    bench.close()


def test_many_megabytes_arrive_whole_and_in_order(path) -> None:
    bench = Bench(path)
    bench.relay.start()
    data = os.urandom(3 * PIPE_SIZE + 12345)
    received = bytearray()
    view = memoryview(data)

    def moved() -> bool:
        nonlocal view
        while view:
            try:
                view = view[bench.client.send(view) :]
            except BlockingIOError:
                break
        while True:
            try:
                chunk = bench.guest.recv(1 << 20)
            except BlockingIOError:
                break
            received.extend(chunk)
        return len(received) == len(data)

    bench.until(moved, timeout=30)
    assert bytes(received) == data
    assert bench.relay.bytesToGuest == len(data)
    bench.close()


def test_half_close_client_first(path) -> None:
    bench = Bench(path)
    bench.relay.start()
    bench.client.send(b"request")
    bench.client.shutdown(socket.SHUT_WR)
    assert bench.receive(bench.guest, 7) == b"request"
    bench.until(lambda: bench.eof(bench.guest))
    assert bench.outcome == [], "the guest's answer may still come"
    bench.guest.send(b"answer")
    assert bench.receive(bench.client, 6) == b"answer"
    bench.guest.shutdown(socket.SHUT_WR)
    bench.until(lambda: bench.outcome == [None])
    assert bench.eof(bench.client)
    assert list(bench.registered()) == []
    bench.close()


def test_half_close_guest_first(path) -> None:
    bench = Bench(path, toClient=b"banner\n")
    bench.relay.start()
    bench.guest.shutdown(socket.SHUT_WR)
    assert bench.receive(bench.client, 7) == b"banner\n"
    bench.until(lambda: bench.eof(bench.client))
    bench.client.send(b"late")
    assert bench.receive(bench.guest, 4) == b"late"
    assert bench.outcome == []
    bench.client.shutdown(socket.SHUT_WR)
    bench.until(lambda: bench.outcome == [None])
    bench.close()


@pytest.mark.parametrize("slow", ["guest", "client"])
def test_a_slow_reader_bounds_what_the_relay_holds(path, slow) -> None:
    """
    The reader stops reading: the relay stops reading the writer once it holds one pipe
    (or one chunk), and from then on only the kernel's socket buffers fill, until the writer
    cannot send any more.  Nothing grows in the daemon.
    """
    bench = Bench(path)
    bench.relay.start()
    writer, reader = (bench.client, bench.guest) if slow == "guest" else (bench.guest, bench.client)
    writerSide = bench.sides[0] if slow == "guest" else bench.sides[1]
    block = b"x" * (1 << 20)
    sent = 0

    def writerBlocked() -> bool:
        nonlocal sent
        while True:
            try:
                sent += writer.send(block)
            except BlockingIOError:
                break
        reading = any(end.fileno() == writerSide.fileno() for end in bench.reactor.readers)
        return not reading

    bench.until(writerBlocked, timeout=30)
    bound = PIPE_SIZE if path == "splice" else CHUNK
    assert 0 < bench.relay.held <= bound
    received = 0

    def drained() -> bool:
        nonlocal received
        while True:
            try:
                chunk = reader.recv(1 << 20)
            except BlockingIOError:
                break
            received += len(chunk)
        return received == sent

    bench.until(drained, timeout=30)
    assert bench.relay.held == 0
    bench.close()


def test_a_reset_ends_the_relay_with_the_error(path) -> None:
    bench = Bench(path)
    bench.relay.start()
    bench.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    bench.client.close()
    bench.until(lambda: bench.outcome != [])
    (failure,) = bench.outcome
    assert failure is not None and failure.check(ConnectionResetError, BrokenPipeError, OSError)
    assert list(bench.registered()) == []
    bench.guest.close()
    for s in bench.sides:
        s.close()


def test_stop_hands_the_sockets_back_at_once(path) -> None:
    bench = Bench(path)
    bench.relay.start()
    assert list(bench.registered())
    bench.relay.stop()
    assert list(bench.registered()) == []
    bench.client.send(b"x")
    bench.reactor.advance(1)
    assert bench.outcome == [], "stop reports nothing: the caller closes"
    bench.close()


def test_no_descriptor_is_left_after_the_pairs_end(path: str) -> None:
    """The pairs' sockets are the caller's; the pipes go back, and the spares soon close."""
    before = open_fds()
    reactor = FakeReactor()
    pipes = PipePool(reactor) if path == "splice" else None
    benches = [Bench(path, pipes=pipes, reactor=reactor) for _ in range(5)]
    for bench in benches:
        bench.relay.start()
    for bench in benches:
        bench.client.send(b"x" * 100_000)
        bench.receive(bench.guest, 100_000)
    for bench in benches:
        bench.client.shutdown(socket.SHUT_WR)
        bench.guest.shutdown(socket.SHUT_WR)
        # The default binds this bench; mypy cannot infer a lambda's defaults.
        bench.until(lambda bench=bench: bench.outcome == [None])  # type: ignore[misc]
        bench.close()
    if pipes is not None:
        assert 0 < pipes.idle <= relay.SPARE_PIPES, "kept for the next pair, a while"
        reactor.advance(relay.IDLE_PIPE_SECONDS)
        assert pipes.idle == 0 and pipes.opened == 0
    assert open_fds() == before


@pytest.mark.linux
def test_spare_pipes_stay_while_pairs_come_and_go() -> None:
    reactor = FakeReactor()
    pipes = PipePool(reactor, spare=2)
    pipes.hold()
    taken = [pipes.take() for _ in range(3)]
    for pipe in taken:
        assert pipe is not None
        pipes.give(pipe)
    assert pipes.idle == 2 and pipes.opened == 2, "beyond the spares, pipes close"
    pipes.release()
    reactor.advance(relay.IDLE_PIPE_SECONDS / 2)
    pipes.hold()
    reactor.advance(relay.IDLE_PIPE_SECONDS)
    assert pipes.idle == 2, "a new relay came in time"
    pipes.release()
    reactor.advance(relay.IDLE_PIPE_SECONDS)
    assert pipes.idle == 0 and pipes.opened == 0


@pytest.mark.linux
def test_without_a_descriptor_for_a_pipe_the_bytes_are_copied() -> None:
    class Exhausted(PipePool):
        def take(self):
            return None

    bench = Bench("splice", pipes=Exhausted(FakeReactor()))
    bench.relay.start()
    bench.client.send(b"still here")
    assert bench.receive(bench.guest, 10) == b"still here"
    bench.close()


@pytest.mark.linux
def test_idle_pairs_hold_no_pipe() -> None:
    reactor = FakeReactor()
    pipes = PipePool(reactor)
    benches = [Bench("splice", pipes=pipes, reactor=reactor) for _ in range(20)]
    for bench in benches:
        bench.relay.start()
        bench.client.send(b"hello")
        assert bench.receive(bench.guest, 5) == b"hello"
    assert pipes.opened <= relay.SPARE_PIPES, "pipes are lent per chunk, not per pair"
    for bench in benches:
        bench.relay.stop()
        bench.close()
    reactor.advance(relay.IDLE_PIPE_SECONDS)
    assert pipes.opened == 0


# -- connecting without a transport


def dispatch_writers(reactor: FakeReactor, timeout: float = 10.0) -> None:
    """Deliver the writability events the kernel reports, until none is registered."""
    deadline = time.monotonic() + timeout
    while reactor.writers:
        assert time.monotonic() < deadline, "the connect did not finish in time"
        writers = list(reactor.writers)
        _, writable, _ = select.select([], writers, [], 0.5)
        for writer in writable:
            writer.doWrite()


def outcome_of(d) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


def test_connect_gives_a_connected_non_blocking_socket() -> None:
    reactor = FakeReactor()
    with socket.create_server(("127.0.0.1", 0)) as server:
        got = outcome_of(relay.connect(reactor, "127.0.0.1", server.getsockname()[1], 10))
        dispatch_writers(reactor)
        (sock,) = got
        assert sock.getpeername() == server.getsockname()
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert not reactor.getDelayedCalls() or not any(
            c.active() for c in reactor.getDelayedCalls()
        )
        sock.close()


def test_connect_refused_says_so_and_leaves_nothing() -> None:
    from twisted.internet.error import ConnectionRefusedError

    before = open_fds()
    reactor = FakeReactor()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        got = outcome_of(relay.connect(reactor, "127.0.0.1", unused.getsockname()[1], 10))
        dispatch_writers(reactor)
    (failure,) = got
    assert failure.check(ConnectionRefusedError), failure
    assert "refused" in failure.getErrorMessage()
    assert not reactor.writers and open_fds() == before


def test_connect_times_out_and_can_be_cancelled() -> None:
    from twisted.internet.defer import CancelledError
    from twisted.internet.error import TimeoutError

    before = open_fds()
    reactor = FakeReactor()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        late = outcome_of(relay.connect(reactor, "127.0.0.1", port, 3))
        reactor.advance(3)
        assert late[0].check(TimeoutError)
        waiting = relay.connect(reactor, "127.0.0.1", port, 3)
        cancelled = outcome_of(waiting)
        waiting.cancel()
        assert cancelled[0].check(CancelledError)
        assert not reactor.writers
    assert open_fds() == before


def test_only_addresses_are_connected_here() -> None:
    assert relay.addressFamily("127.0.0.1") == socket.AF_INET
    assert relay.addressFamily("::1") == socket.AF_INET6
    assert relay.addressFamily("virby-vm") is None


@pytest.mark.parametrize(("soft", "pipes"), [(256, 16), (1024, 64), (20000, 256), (32, 4)])
def test_the_pipes_take_an_eighth_of_the_open_files_at_most(monkeypatch, soft, pipes) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, soft * 4))
    assert relay.pipeLimit() == pipes


@pytest.mark.linux
def test_a_pool_at_its_limit_lends_nothing_and_the_flow_copies() -> None:
    reactor = FakeReactor()
    pipes = PipePool(reactor, limit=2)
    taken = [pipes.take(), pipes.take()]
    assert None not in taken and pipes.take() is None
    bench = Bench("splice", pipes=pipes, reactor=reactor)
    bench.relay.start()
    bench.client.send(b"copied")
    assert bench.receive(bench.guest, 6) == b"copied"
    for pipe in taken:
        assert pipe is not None
        pipes.discard(pipe)
    bench.relay.stop()
    bench.close()


def test_connect_without_a_descriptor_fails_like_a_refusal(monkeypatch) -> None:
    import errno as errnos

    from twisted.internet.error import ConnectError

    def exhausted(*args, **kwargs):
        raise OSError(errnos.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socket", exhausted)
    got = outcome_of(relay.connect(FakeReactor(), "127.0.0.1", 22, 10))
    assert got[0].check(ConnectError) and "Too many open files" in got[0].getErrorMessage()


def test_the_copy_buffers_come_from_the_pool_the_relay_is_given() -> None:
    """The portable path's buffers have an owner: its pool keeps one spare, and only one."""
    buffers = BufferPool(size=4096)
    bench = Bench("copy", buffers=buffers)
    bench.relay.start()
    bench.client.send(b"through the pool")
    assert bench.receive(bench.guest, 16) == b"through the pool"
    assert buffers.idle == 1, "the buffer read into went back"
    buffers.give(bytearray(4096))
    buffers.give(bytearray(10))
    assert buffers.idle == 1
    bench.relay.stop()
    bench.close()


def test_close_stops_and_closes_the_guests_socket_once() -> None:
    bench = Bench("copy")
    bench.relay.start()
    guestSide = bench.sides[1]
    bench.relay.close()
    bench.relay.close(abort=True)
    assert guestSide.fileno() == -1 and not list(bench.registered())
    assert bench.guest.recv(10) == b"", "an orderly EOF"
    bench.reactor.advance(0)
    assert bench.outcome == []
    bench.close()


def test_a_relay_refuses_bytes_from_the_clients_transport() -> None:
    bench = Bench("copy")
    with pytest.raises(RuntimeError, match="pause its transport first"):
        bench.relay.clientData(b"lost")
    bench.close()


def test_first_bytes_waits_for_the_peer_to_speak() -> None:
    reactor = FakeReactor()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    spoken = relay.firstBytes(reactor, ours)
    (reader,) = reactor.readers
    reader.doRead()
    assert not spoken.called, "nothing yet"
    theirs.send(b"SSH-2.0-guest\r\n")
    reader.doRead()
    assert outcome_of(spoken) == [b"SSH-2.0-guest\r\n"] and not reactor.readers
    assert ours.fileno() != -1, "the socket is the caller's"
    ours.close()
    theirs.close()


@pytest.mark.parametrize("how", ["eof", "cancel"])
def test_first_bytes_never_spoken_closes_the_socket(how) -> None:
    from twisted.internet.defer import CancelledError
    from twisted.internet.error import ConnectionDone

    reactor = FakeReactor()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    spoken = relay.firstBytes(reactor, ours)
    if how == "eof":
        theirs.shutdown(socket.SHUT_WR)
        next(iter(reactor.readers)).doRead()
    else:
        spoken.cancel()
    [failure] = outcome_of(spoken)
    assert failure.check(ConnectionDone if how == "eof" else CancelledError)
    assert ours.fileno() == -1 and not reactor.readers
    theirs.close()
