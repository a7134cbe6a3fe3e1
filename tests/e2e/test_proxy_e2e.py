"""
The splice over real loopback sockets on the real reactor, on each data path: bytes one way,
half-close, the answer; backpressure; aborts; 200 pairs at once; and nothing left behind.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.fakes import logObserver
from virby.daemon import relay
from virby.daemon.proxy import Phase, ProxyFactory
from virby.daemon.readiness import ReadyGuest
from virby.reactors import IStreamTransport, hostReactor

pytestmark = pytest.mark.e2e

SIZE = 8 * 1024 * 1024
PATHS = ["fast", "portable", "transports"]


@implementer(IHalfCloseableProtocol)
class CountingSink(Protocol):
    """Counts what arrives; at EOF answers with the count and closes."""

    transport: IStreamTransport

    def connectionMade(self) -> None:
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(b"%d\n" % self.count)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Talker(Protocol):
    """Sends C{payload}, shuts down its write side, keeps what comes back until the close."""

    transport: IStreamTransport

    def __init__(self, payload: bytes = b"", halfClose: bool = True, onEOF=None) -> None:
        self.payload = payload
        self.halfClose = halfClose
        self.onEOF = onEOF
        self.answer = b""
        self.reason: Failure | None = None
        self.done: Deferred[bytes] = Deferred()
        self._expected: tuple[bytes, Deferred[None]] | None = None

    def expect(self, answer: bytes) -> Deferred[None]:
        """Fires once everything received so far is C{answer}."""
        d: Deferred[None] = Deferred()
        self._expected = (answer, d)
        self._check()
        return d

    def _check(self) -> None:
        if self._expected is not None and self.answer == self._expected[0]:
            d, self._expected = self._expected[1], None
            d.callback(None)

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)
        if self.halfClose:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        self._check()

    def readConnectionLost(self) -> None:
        if self.onEOF is not None:
            self.onEOF(self)
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.done.callback(self.answer)


class Echo(Protocol):
    transport: IStreamTransport

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        self.factory.closed += 1
        waiting = self.factory.waiting
        if waiting is not None and self.factory.closed >= waiting[0]:
            self.factory.waiting = None
            waiting[1].callback(None)


def echoes() -> Factory[Echo]:
    factory = Factory.forProtocol(Echo)
    factory.closed = 0  # type: ignore[attr-defined]
    factory.waiting = None  # type: ignore[attr-defined]
    return factory


def whenEchoesClosed(factory: Factory[Echo], count: int) -> Deferred:
    if factory.closed >= count:  # type: ignore[attr-defined]
        return succeed(None)
    d: Deferred = Deferred()
    factory.waiting = (count, d)  # type: ignore[attr-defined]
    return d


class Backend:
    def __init__(self, port: int) -> None:
        self.port = port
        self.open: set = set()
        self.closed = 0
        self.allClosed: Deferred | None = None
        self.expected = 0

    def connectionOpened(self, connection) -> None:
        self.open.add(connection)

    def connectionClosed(self, connection) -> None:
        self.open.discard(connection)
        self.closed += 1
        if self.allClosed is not None and self.closed >= self.expected:
            waiting, self.allClosed = self.allClosed, None
            waiting.callback(None)

    def whenClosed(self, count: int) -> Deferred:
        """Fires once C{count} connections in all have told the backend they closed."""
        if self.closed >= count:
            return succeed(None)
        self.expected = count
        self.allClosed = Deferred()
        return self.allClosed

    def whenReady(self):
        return succeed(ReadyGuest("127.0.0.1", self.port))


class Setup:
    """A guest server and the splice in front of it, on the global reactor."""

    async def start(self, path: str, guest: Factory[Any]) -> Setup:
        from twisted.internet import reactor

        self.reactor = hostReactor(reactor)
        self.guestPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(guest)
        self.backend = Backend(self.guestPort.getHost().port)
        self.factory = ProxyFactory(self.reactor, self.backend, dataPath=path, bannerTimeout=None)
        self.proxyPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.factory
        )
        return self

    async def connect(self, protocol: Protocol) -> IProtocol:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.proxyPort.getHost().port)
        return await endpoint.connect(Factory.forProtocol(lambda: protocol))

    async def stop(self) -> None:
        await self.proxyPort.stopListening()
        await self.guestPort.stopListening()


def sinkFactory() -> Factory:
    return Factory.forProtocol(CountingSink)


@pytest.fixture(params=PATHS)
def path(request) -> str:
    return request.param


@pytest_twisted.ensureDeferred
async def test_half_close_through_the_splice(path) -> None:
    setup = await Setup().start(path, sinkFactory())
    try:
        talker = Talker(b"x" * SIZE)
        await setup.connect(talker)
        answer = await talker.done.addTimeout(30, setup.reactor)
        assert answer == b"%d\n" % SIZE
        await setup.backend.whenClosed(1).addTimeout(30, setup.reactor)
        (traffic,) = [setup.factory.traffic()]
        assert traffic == (SIZE, len(answer))
    finally:
        await setup.stop()


@implementer(IHalfCloseableProtocol)
class Announcer(Protocol):
    """A guest that speaks first and shuts down its write side, then counts until EOF."""

    transport: IStreamTransport

    def connectionMade(self) -> None:
        self.count = 0
        self.transport.write(b"SSH-2.0-guest\r\n")
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.factory.counted.callback(self.count)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_the_guest_closes_its_side_first_and_the_client_still_sends(path) -> None:
    guests = Factory.forProtocol(Announcer)
    guests.counted = Deferred()  # type: ignore[attr-defined]
    setup = await Setup().start(path, guests)
    try:

        def answerAfterTheEOF(talker: Talker) -> None:
            assert talker.answer == b"SSH-2.0-guest\r\n"
            talker.transport.write(b"y" * 100_000)
            # Both directions are done on this side: close after the write is flushed.
            talker.transport.loseConnection()

        talker = Talker(halfClose=False, onEOF=answerAfterTheEOF)
        await setup.connect(talker)
        await talker.done.addTimeout(30, setup.reactor)
        await setup.backend.whenClosed(1).addTimeout(30, setup.reactor)
        counted = await guests.counted.addTimeout(30, setup.reactor)  # type: ignore[attr-defined]
        assert counted == 100_000
    finally:
        await setup.stop()


@implementer(IHalfCloseableProtocol)
class SlowSink(CountingSink):
    """Reads one chunk per reactor turn: the splice's writes keep finding a full socket."""

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.transport.pauseProducing()
        self.factory.reactor.callLater(0, self.transport.resumeProducing)


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_gets_every_byte(path) -> None:
    from twisted.internet import reactor

    guests = Factory.forProtocol(SlowSink)
    guests.reactor = reactor  # type: ignore[attr-defined]
    setup = await Setup().start(path, guests)
    try:
        talker = Talker(b"z" * (4 * SIZE))
        await setup.connect(talker)
        answer = await talker.done.addTimeout(60, setup.reactor)
        assert answer == b"%d\n" % (4 * SIZE)
    finally:
        await setup.stop()


@pytest_twisted.ensureDeferred
async def test_abort_resets_both_sides_at_once(path) -> None:
    from twisted.internet.error import ConnectionDone

    setup = await Setup().start(path, echoes())
    try:
        talkers = [Talker(b"hello", halfClose=False) for _ in range(3)]
        for talker in talkers:
            await setup.connect(talker)
            await talker.expect(b"hello").addTimeout(10, setup.reactor)
        for connection in list(setup.backend.open):
            connection.abort("the VM exited with status 1")
        await DeferredList([t.done for t in talkers]).addTimeout(10, setup.reactor)
        for talker in talkers:
            assert talker.reason is not None
            assert not talker.reason.check(ConnectionDone), "a reset, not an orderly close"
        await setup.backend.whenClosed(3).addTimeout(10, setup.reactor)
    finally:
        await setup.stop()


@pytest_twisted.ensureDeferred
async def test_two_hundred_pairs_at_once_and_nothing_left_after(path) -> None:
    guests = echoes()
    setup = await Setup().start(path, guests)
    try:
        threads = threading.active_count()
        before = set(os.listdir("/proc/self/fd"))
        talkers = [Talker(b"pair %d\n" % n, halfClose=False) for n in range(200)]
        for talker in talkers:
            await setup.connect(talker)
        await DeferredList(
            [t.expect(b"pair %d\n" % n) for n, t in enumerate(talkers)], fireOnOneErrback=True
        ).addTimeout(30, setup.reactor)
        assert len(setup.backend.open) == 200
        assert setup.factory.pipes is None or setup.factory.pipes.opened <= relay.SPARE_PIPES
        for talker in talkers:
            talker.transport.loseConnection()
        await DeferredList([t.done for t in talkers]).addTimeout(30, setup.reactor)
        await setup.backend.whenClosed(200).addTimeout(30, setup.reactor)
        await whenEchoesClosed(guests, 200).addTimeout(30, setup.reactor)
        await setup.stop()
        pipes = setup.factory.pipes
        if pipes is not None:
            # The spare pipes outlive the pairs by a few seconds, for the next ones.
            spares = set(os.listdir("/proc/self/fd")) - before
            assert len(spares) == 2 * pipes.idle <= 2 * relay.SPARE_PIPES
            pipes.closeIdle()
        left = set(os.listdir("/proc/self/fd")) - before
        assert not left, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in left}
        assert threading.active_count() == threads
        assert setup.factory.traffic()[0] == sum(len(b"pair %d\n" % n) for n in range(200))
    finally:
        if setup.proxyPort.connected:
            await setup.stop()


@pytest_twisted.ensureDeferred
async def test_a_guest_that_refuses_closes_the_client_and_says_why(path) -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        backend = Backend(unused.getsockname()[1])
        proxy = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            ProxyFactory(hostReactor(reactor), backend, dataPath=path, bannerTimeout=None)
        )
        said: list[str] = []

        def observe(event) -> None:
            if "cannot reach the guest" in event.get("log_format", ""):
                said.append(event["why"])

        globalLogPublisher.addObserver(logObserver(observe))
        try:
            talker = Talker(b"SSH-2.0-client\r\n", halfClose=False)
            await TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.getHost().port).connect(
                Factory.forProtocol(lambda: talker)
            )
            assert await talker.done.addTimeout(10, reactor) == b""
            await backend.whenClosed(1).addTimeout(10, reactor)
        finally:
            globalLogPublisher.removeObserver(logObserver(observe))
            await proxy.stopListening()
    assert len(said) == 1 and "refused" in said[0].lower(), said


class Booting(Backend):
    """A VM that becomes ready when the test says so."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.waiting: list[Deferred] = []
        self.opened: Deferred = Deferred()

    def connectionOpened(self, connection) -> None:
        super().connectionOpened(connection)
        if not self.opened.called:
            self.opened.callback(connection)

    def whenReady(self):
        waiter: Deferred = Deferred()
        self.waiting.append(waiter)
        return waiter

    def ready(self) -> None:
        for waiter in self.waiting:
            waiter.callback(ReadyGuest("127.0.0.1", self.port))


@pytest_twisted.ensureDeferred
async def test_what_a_client_sends_while_the_vm_boots_goes_first(path) -> None:
    from twisted.internet import reactor

    guests = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(echoes())
    backend = Booting(guests.getHost().port)
    proxy = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        ProxyFactory(hostReactor(reactor), backend, dataPath=path, bannerTimeout=None)
    )
    try:
        talker = Talker(b"SSH-2.0-client\r\n", halfClose=False)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.getHost().port).connect(
            Factory.forProtocol(lambda: talker)
        )
        connection = await backend.opened.addTimeout(10, reactor)
        # (This runs inside connectionMade: nothing has been read yet.)
        held: Deferred = Deferred()
        received = connection.dataReceived

        def spy(data: bytes) -> None:
            received(data)
            if not held.called:
                held.callback(None)

        connection.dataReceived = spy
        await held.addTimeout(10, reactor)
        assert connection.phase is Phase.WAITING and not connection.spliced, "read while it waits"
        backend.ready()
        await talker.expect(b"SSH-2.0-client\r\n").addTimeout(10, reactor)
        talker.transport.loseConnection()
        await backend.whenClosed(1).addTimeout(10, reactor)
    finally:
        await proxy.stopListening()
        await guests.stopListening()
