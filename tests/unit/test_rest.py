"""The REST client against a real twisted.web server on a unix socket."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.fakes import logObserver
from virby.daemon.rest import (
    RestDropped,
    RestError,
    RestRefused,
    RestTimeout,
    RestUnreachable,
    VfkitRestClient,
)
from virby.reactors import hostReactor


class VMState(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posted: list = []
        self.hang = False
        self.refuse = False
        self.drop = False

    def render_POST(self, request):
        body = json.loads(request.content.read())
        self.posted.append(body["state"])
        if self.hang:
            return NOT_DONE_YET
        if self.drop:
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        if self.refuse:
            request.setResponseCode(500)
            return json.dumps({"error": f"invalid new VMState: {body['state']}"}).encode()
        request.setResponseCode(202)
        return b""


@pytest.fixture
def server(short_tmp):
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    resource = VMState()
    path = str(short_tmp / "vfkit.sock")
    # Twisted annotates the factory as the bare generic Factory, which no factory of a
    # particular protocol (a Site makes HTTPChannels) matches: its type is invariant.
    port = reactor.listenUNIX(path, Site(resource))  # type: ignore[arg-type]
    yield resource, path
    pytest_twisted.blockon(port.stopListening())  # before short_tmp goes


@pytest_twisted.ensureDeferred
async def test_a_request_is_posted(server) -> None:
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    resource, path = server
    await VfkitRestClient(reactor, path).request("Stop")
    assert resource.posted == ["Stop"]


@pytest_twisted.ensureDeferred
async def test_refusal_carries_vfkits_error(server) -> None:
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    resource, path = server
    resource.refuse = True
    with pytest.raises(RestRefused, match="invalid new VMState: Pause"):
        await VfkitRestClient(reactor, path).request("Pause")


@pytest_twisted.ensureDeferred
async def test_no_socket_is_unreachable_even_for_stop(short_tmp) -> None:
    """A vfkit whose API is not up yet has not stopped: only its exit says that."""
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    client = VfkitRestClient(reactor, str(short_tmp / "gone.sock"))
    for state in ("Stop", "HardStop", "Pause"):
        with pytest.raises(RestUnreachable, match="unreachable"):
            await client.request(state)


@pytest_twisted.ensureDeferred
async def test_a_socket_nobody_listens_on_is_unreachable(short_tmp) -> None:
    import socket

    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    path = str(short_tmp / "stale.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
        with pytest.raises(RestUnreachable):
            await VfkitRestClient(reactor, path).request("Stop")


@pytest_twisted.ensureDeferred
async def test_a_hung_vfkit_is_a_timeout_not_a_stop(server) -> None:
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    resource, path = server
    resource.hang = True
    for state in ("Stop", "HardStop", "Pause"):
        with pytest.raises(RestTimeout, match=f"did not answer {state} within 0.2s"):
            await VfkitRestClient(reactor, path, timeout=0.2).request(state)
    assert issubclass(RestTimeout, RestError)


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_without_an_answer_is_dropped(server) -> None:
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    resource, path = server
    resource.drop = True
    with pytest.raises(RestDropped, match="without answering HardStop"):
        await VfkitRestClient(reactor, path).request("HardStop")


def test_an_idle_daemon_has_not_imported_the_http_client() -> None:
    """twisted.web.client costs about 1 MiB for the daemon's life: it comes with a request."""
    program = (
        "import sys, virby.daemon.tap, virby.daemon.service; "
        "print('twisted.web.client' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "False\n"


@pytest_twisted.ensureDeferred
async def test_a_request_leaves_no_factory_lines_in_the_log(server) -> None:
    """Twisted's HTTP pool makes a factory per request, each noisy by default."""
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)
    from twisted.logger import globalLogPublisher

    resource, path = server
    seen: list[dict] = []
    globalLogPublisher.addObserver(logObserver(seen.append))
    try:
        await VfkitRestClient(reactor, path).request("Stop")
        await VfkitRestClient(reactor, path).request("HardStop")
    finally:
        globalLogPublisher.removeObserver(logObserver(seen.append))
    factoryLines = [e for e in seen if "factory" in str(e.get("log_format", "")).lower()]
    assert factoryLines == []
    assert resource.posted == ["Stop", "HardStop"]
