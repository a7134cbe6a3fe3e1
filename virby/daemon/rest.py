"""
vfkit's REST API over its unix socket: the daemon only asks for state changes
(C{POST /vm/state}); vfkit's C{GET /vm/state} and C{GET /vm/inspect} it has no use for.

The socket lives in the owner-only working directory: upstream served the API on a TCP
port where any local user could stop the VM.

Every failure says which of four things happened, because the caller acts on each
differently: vfkit refused (L{RestRefused}), nothing listens (L{RestUnreachable}: vfkit
has not started its API yet, or is gone), vfkit closed the connection before answering
(L{RestDropped}: after HardStop vfkit exits the instant the VM is off, often before its
reply, vfkit pkg/rest/vf/state_change.go), or nothing answered in time (L{RestTimeout}:
a hung vfkit).  None of them means "stopped": only the process's exit says that.

Twisted's HTTP client (C{twisted.web.client}) is imported at the first request, not with
this module: a daemon whose VM is not running never talks to vfkit, and the import costs
about 1 MiB of resident memory for its whole life (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IReactorUNIX,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from virby.errors import VirbyError
from virby.reactors import IRestReactor

if TYPE_CHECKING:
    from twisted.web.client import URI, Agent


class RestError(VirbyError):
    """vfkit's API refused a request or did not answer."""


class RestRefused(RestError):
    """vfkit answered with an error status."""


class RestUnreachable(RestError):
    """Nothing accepted the connection: no socket, or nobody listening on it."""


class RestDropped(RestError):
    """vfkit accepted the request and closed the connection without an answer."""


class RestTimeout(RestError):
    """vfkit did not answer within the timeout: it is hung, or too busy to serve."""


_TIMEOUTS = (defer.TimeoutError, defer.CancelledError, neterror.TimeoutError)


def _classify(e: Exception, what: str, socketPath: str, timeout: float) -> RestError:
    """The L{RestError} that says what happened to a request that got no answer."""
    from twisted.web.client import ResponseFailed  # ResponseNeverReceived is one too

    if isinstance(e, _TIMEOUTS):
        return RestTimeout(f"vfkit did not answer {what} within {timeout:g}s")
    if isinstance(e, ResponseFailed):
        reasons = getattr(e, "reasons", [])
        if any(reason.check(*_TIMEOUTS) for reason in reasons):
            return RestTimeout(f"vfkit did not answer {what} within {timeout:g}s")
        return RestDropped(f"vfkit closed the connection without answering {what}")
    if isinstance(e, neterror.ConnectionDone | neterror.ConnectionLost):
        return RestDropped(f"vfkit closed the connection without answering {what}")
    if isinstance(e, neterror.ConnectError):
        why = str(e).rstrip(".").split(": ")[-1]
        return RestUnreachable(f"vfkit's API at {socketPath} is unreachable ({why})")
    if isinstance(e, OSError):
        why = e.strerror or str(e)
        return RestUnreachable(f"vfkit's API at {socketPath} is unreachable ({why})")
    return RestError(f"vfkit did not answer {what}: {e!r}")


@implementer(IAgentEndpointFactory)
class _UNIXSocket:
    """The agent's endpoint factory: every URI is the socket."""

    def __init__(self, reactor: IReactorUNIX, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _Quiet(UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout))


@implementer(IStreamClientEndpoint)
class _Quiet:
    """
    An endpoint whose factories log nothing of their own: the HTTP pool makes one factory
    per request, and each would log "Starting factory ..." and "Stopping factory ..." lines
    into the daemon's log, which say nothing the stop sequence does not say better.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)


@implementer(IBodyProducer)
class _Body:
    """A tiny IBodyProducer for a JSON request body."""

    def __init__(self, data: bytes) -> None:
        self.body = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class VfkitRestClient:
    """Talks to one vfkit; every call is bounded by C{timeout} seconds."""

    def __init__(self, reactor: IRestReactor, socketPath: str, timeout: float = 5.0) -> None:
        self._reactor = reactor
        self.socketPath = socketPath
        self._timeout = timeout
        self._agent: Agent | None = None

    def _client(self) -> Agent:
        """The HTTP agent, made (and Twisted's HTTP client imported) at the first request."""
        if self._agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool

            self._agent = Agent.usingEndpointFactory(
                self._reactor,
                _UNIXSocket(self._reactor, self.socketPath, self._timeout),
                pool=HTTPConnectionPool(self._reactor, persistent=False),
            )
        return self._agent

    async def _call(
        self, method: bytes, path: bytes, body: bytes | None = None
    ) -> tuple[int, bytes]:
        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        headers = Headers({b"Content-Type": [b"application/json"]}) if body else None
        requesting = self._client().request(
            method, b"http://vfkit" + path, headers, _Body(body) if body else None
        )
        response = await requesting.addTimeout(self._timeout, self._reactor)
        content = await readBody(response).addTimeout(self._timeout, self._reactor)
        return response.code, content

    async def request(self, state: str) -> None:
        """
        C{POST /vm/state} with C{{"state": state}}; vfkit answers 202 once it has made the
        request (for C{Stop}: once the guest was asked, not once it is off).

        @raise RestError: one of its subclasses, saying what happened.
        """
        body = json.dumps({"state": state}).encode()
        try:
            code, content = await self._call(b"POST", b"/vm/state", body)
        except Exception as e:
            raise _classify(e, state, self.socketPath, self._timeout) from None
        if code not in (200, 202):
            raise RestRefused(f"vfkit refused {state} ({code}): {_error(content)}")


def _error(content: bytes) -> str:
    try:
        return str(json.loads(content).get("error", content.decode(errors="replace")))
    except (ValueError, AttributeError):
        return content.decode(errors="replace").strip()[:200]
