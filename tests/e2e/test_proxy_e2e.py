"""The splice over real loopback sockets: bytes one way, then half-close, then the answer."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from virby.proxy import ProxyFactory

pytestmark = pytest.mark.e2e

SIZE = 8 * 1024 * 1024


@implementer(IHalfCloseableProtocol)
class CountingSink(Protocol):
    """Counts what arrives; at EOF answers with the count and closes."""

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
class Sender(Protocol):
    def __init__(self) -> None:
        self.answer = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"x" * SIZE)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.answer += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.answer)


class Backend:
    def __init__(self, port: int) -> None:
        self.port = port
        self.open: set = set()
        self.closed = 0

    def connectionOpened(self, connection) -> None:
        self.open.add(connection)

    def connectionClosed(self, connection) -> None:
        self.open.discard(connection)
        self.closed += 1

    def whenReady(self):
        return succeed(("127.0.0.1", self.port))


@pytest_twisted.ensureDeferred
async def test_half_close_through_the_splice() -> None:
    from twisted.internet import reactor

    sink = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(CountingSink)
    )
    backend = Backend(sink.getHost().port)
    proxy = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        ProxyFactory(reactor, backend)
    )
    try:
        sender = Sender()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.getHost().port).connect(
            Factory.forProtocol(lambda: sender)
        )
        answer = await sender.done.addTimeout(30, reactor)
        assert answer == b"%d\n" % SIZE
    finally:
        await proxy.stopListening()
        await sink.stopListening()
