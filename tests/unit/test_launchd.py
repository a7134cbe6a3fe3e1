"""launchd: sockets handed through the activation seam are adopted and served."""

from __future__ import annotations

import errno
import socket

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol

import virby.daemon.launchd
from virby.daemon.launchd import LaunchdError, LaunchdServerEndpoint


class Hello(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello\n")
        self.transport.loseConnection()


class Reader(Protocol):
    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.data)


def listening(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(5)
    return s


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ESRCH, "not started by launchd"),
        (errno.ENOENT, "no socket named 'Listener'"),
        (errno.EALREADY, "already activated"),
        (errno.EPERM, "cannot activate"),
    ],
)
def test_errors_are_one_line(code, words) -> None:
    def activate(name: str) -> list[int]:
        raise OSError(code, "x")

    failures: list = []
    # No reactor: activation fails before one would be used.
    endpoint = LaunchdServerEndpoint(None, "Listener", activate)  # type: ignore[arg-type]
    endpoint.listen(Factory()).addErrback(failures.append)
    error = failures[0].value
    assert isinstance(error, LaunchdError) and words in str(error) and "\n" not in str(error)


def test_the_string_parser_is_found(monkeypatch) -> None:
    from twisted.internet import reactor

    endpoint = serverFromString(reactor, "launchd:name=Other")
    assert isinstance(endpoint, LaunchdServerEndpoint)
    assert endpoint._name == "Other"
    assert serverFromString(reactor, "launchd")._name == "Listener"
    assert serverFromString(reactor, "launchd:Other")._name == "Other"


@pytest.mark.parametrize("description", ["launchd:nmae=Listener", "launchd:Listener:extra"])
def test_a_misspelt_endpoint_fails_at_start_with_one_line(short_tmp, capsys, description) -> None:
    from tests.fakes import FakeReactor
    from tests.unit.test_daemon import fake_vfkit
    from virby.config import fromMapping
    from virby.daemon.service import makeDaemonService

    (short_tmp / "wd").mkdir()
    config = fromMapping(
        {"working-directory": str(short_tmp / "wd"), "vfkit": fake_vfkit(short_tmp),
         "listen": description}
    )  # fmt: skip
    with pytest.raises(SystemExit) as caught:
        makeDaemonService(config, FakeReactor())
    assert caught.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"twistd virby: error: listen endpoint {description!r} is not valid")


@pytest_twisted.ensureDeferred
async def test_every_socket_is_adopted_and_served(monkeypatch) -> None:
    from twisted.internet import reactor

    v4 = listening(socket.AF_INET, "127.0.0.1")
    v6 = listening(socket.AF_INET6, "::1")
    v4port, v6port = v4.getsockname()[1], v6.getsockname()[1]
    ports = {v4port, v6port}
    fds = [v4.detach(), v6.detach()]
    asked: list[str] = []
    monkeypatch.setattr(
        virby.daemon.launchd, "activateSocket", lambda name: asked.append(name) or fds
    )
    endpoint = serverFromString(reactor, "launchd:name=Listener")
    port = await endpoint.listen(Factory.forProtocol(Hello))
    try:
        assert asked == ["Listener"]
        assert {p.getHost().port for p in port.ports} == ports
        for client, host, number in (
            (TCP4ClientEndpoint, "127.0.0.1", v4port),
            (TCP6ClientEndpoint, "::1", v6port),
        ):
            reader = Reader()
            # The default binds this reader; mypy cannot infer a lambda's defaults.
            factory = Factory.forProtocol(lambda r=reader: r)  # type: ignore[misc]
            await client(reactor, host, number).connect(factory)
            assert await reader.done == b"hello\n"
    finally:
        await port.stopListening()
