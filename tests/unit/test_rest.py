"""The REST client against a real twisted.web server on a unix socket."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from virby.rest import RestError, VfkitRestClient


class VMState(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posted: list = []
        self.hang = False
        self.refuse = False

    def render_GET(self, request):
        if self.hang:
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/vm/inspect":
            return json.dumps({"vcpus": 2}).encode()
        return json.dumps({"canStop": True, "state": "VirtualMachineStateRunning"}).encode()

    def render_POST(self, request):
        body = json.loads(request.content.read())
        self.posted.append(body["state"])
        if self.refuse:
            request.setResponseCode(500)
            return json.dumps({"error": f"invalid new VMState: {body['state']}"}).encode()
        request.setResponseCode(202)
        return b""


@pytest.fixture
def server(short_tmp):
    from twisted.internet import reactor

    resource = VMState()
    path = str(short_tmp / "vfkit.sock")
    port = reactor.listenUNIX(path, Site(resource))
    yield resource, path
    pytest_twisted.blockon(port.stopListening())  # before short_tmp goes


@pytest_twisted.ensureDeferred
async def test_state_inspect_and_post(server) -> None:
    from twisted.internet import reactor

    resource, path = server
    client = VfkitRestClient(reactor, path)
    assert (await client.state())["state"] == "VirtualMachineStateRunning"
    assert (await client.inspect()) == {"vcpus": 2}
    await client.request("Stop")
    assert resource.posted == ["Stop"]


@pytest_twisted.ensureDeferred
async def test_refusal_carries_vfkits_error(server) -> None:
    from twisted.internet import reactor

    resource, path = server
    resource.refuse = True
    with pytest.raises(RestError, match="invalid new VMState: Pause"):
        await VfkitRestClient(reactor, path).request("Pause")


@pytest_twisted.ensureDeferred
async def test_a_vanished_vfkit_has_stopped(tmp_path) -> None:
    from twisted.internet import reactor

    client = VfkitRestClient(reactor, str(tmp_path / "gone.sock"))
    await client.request("Stop")
    await client.request("HardStop")
    with pytest.raises(RestError, match="unreachable"):
        await client.state()
    with pytest.raises(RestError):
        await client.request("Pause")


@pytest_twisted.ensureDeferred
async def test_no_answer_times_out(server) -> None:
    from twisted.internet import reactor

    resource, path = server
    resource.hang = True
    with pytest.raises(RestError):
        await VfkitRestClient(reactor, path, timeout=0.2).state()
