"""
vfkit's REST API (C{GET/POST /vm/state}, C{GET /vm/inspect}) over its unix socket.

The socket lives in the owner-only working directory: upstream served the API on a TCP
port where any local user could stop the VM.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from virby.errors import VirbyError

try:
    from twisted.web._newclient import ResponseNeverReceived
except ImportError:  # pragma: no cover - older Twisted
    ResponseNeverReceived = ResponseFailed  # type: ignore[misc,assignment]

#: Errors that mean "vfkit went away": after Stop or HardStop that is the goal, since vfkit
#: exits the instant the guest is off, often before it has written its reply.
TRANSPORT_ERRORS = (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    ResponseFailed,
    ResponseNeverReceived,
    OSError,
)


class RestError(VirbyError):
    """vfkit's API refused a request or did not answer."""


@implementer(IAgentEndpointFactory)
class _UNIXSocket:
    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


class _Body:
    """A tiny IBodyProducer for a JSON request body."""

    def __init__(self, data: bytes) -> None:
        self.body = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Any:
        from twisted.internet.defer import succeed

        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class VfkitRestClient:
    """Talks to one vfkit; every call is bounded by C{timeout} seconds."""

    def __init__(self, reactor: Any, socket_path: str, timeout: float = 5.0) -> None:
        self._reactor = reactor
        self.socket_path = socket_path
        self._timeout = timeout
        self._agent = Agent.usingEndpointFactory(
            reactor,
            _UNIXSocket(reactor, socket_path, timeout),
            pool=HTTPConnectionPool(reactor, persistent=False),
        )

    async def _call(
        self, method: bytes, path: bytes, body: bytes | None = None
    ) -> tuple[int, bytes]:
        headers = Headers({b"Content-Type": [b"application/json"]}) if body else None
        requesting = self._agent.request(
            method, b"http://vfkit" + path, headers, _Body(body) if body else None
        )
        response = await requesting.addTimeout(self._timeout, self._reactor)
        content = await readBody(response).addTimeout(self._timeout, self._reactor)
        return response.code, content

    async def _json(self, path: bytes) -> dict[str, Any]:
        try:
            code, content = await self._call(b"GET", path)
        except TRANSPORT_ERRORS as e:
            raise RestError(f"vfkit's API at {self.socket_path} is unreachable: {e}") from None
        except Exception as e:
            raise RestError(f"vfkit's API at {self.socket_path} did not answer: {e!r}") from None
        if code != 200:
            raise RestError(f"vfkit answered {code} to GET {path.decode()}: {_error(content)}")
        try:
            document = json.loads(content)
        except ValueError:
            raise RestError(f"vfkit answered GET {path.decode()} with non-JSON") from None
        return document

    async def state(self) -> dict[str, Any]:
        """C{GET /vm/state}: C{{"state": "VirtualMachineStateRunning", "canStop": ...}}."""
        return await self._json(b"/vm/state")

    async def inspect(self) -> dict[str, Any]:
        """C{GET /vm/inspect}: the VM's configuration as vfkit sees it."""
        return await self._json(b"/vm/inspect")

    async def request(self, state: str) -> None:
        """
        C{POST /vm/state}.  For C{Stop} and C{HardStop} a vanished vfkit is success.

        @raise RestError: when vfkit refuses, or does not answer in time.
        """
        body = json.dumps({"state": state}).encode()
        try:
            code, content = await self._call(b"POST", b"/vm/state", body)
        except TRANSPORT_ERRORS as e:
            if state in ("Stop", "HardStop"):
                return
            raise RestError(f"vfkit's API at {self.socket_path} is unreachable: {e}") from None
        except Exception as e:
            raise RestError(f"vfkit did not answer POST {state}: {e!r}") from None
        if code not in (200, 202):
            raise RestError(f"vfkit refused {state} ({code}): {_error(content)}")


def _error(content: bytes) -> str:
    try:
        return str(json.loads(content).get("error", content.decode(errors="replace")))
    except (ValueError, AttributeError):
        return content.decode(errors="replace").strip()[:200]
