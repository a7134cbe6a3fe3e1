"""
vfkit's REST API: the C{--restful-uri} rules of vfkit v0.6.3 (C{pkg/rest/rest.go},
C{parseRestfulURI} over Go's C{url.ParseRequestURI}) and its three routes
(C{pkg/rest/vf/vm_config.go}, C{state_change.go}).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from virby.emulator.cmdline import UsageError
from virby.emulator.golang import quote
from virby.reactors import IListenReactor

if TYPE_CHECKING:
    from virby.emulator.machine import EmulatedMachine

#: C{len(syscall.RawSockaddrUnix{}.Path) - 1} on macOS: 104 bytes, less the C{NUL}.
MAX_SOCKET_PATH = 103


@dataclass(frozen=True)
class Endpoint:
    """C{rest.Endpoint}: the scheme (C{none}, C{unix} or C{tcp}), the host and the path."""

    scheme: str
    host: str
    path: str


def parseRequestUri(text: str) -> tuple[str, str, str]:
    """
    Go's C{url.ParseRequestURI}, as far as vfkit's URIs need: (scheme, host, path).  A
    scheme followed by no C{/} is an opaque URI, with neither host nor path.

    @raise UsageError: with Go's C{parse "...": ...} text.
    """

    def failure(why: str) -> UsageError:
        return UsageError(f"parse {quote(text)}: {why}")

    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise failure("net/url: invalid control character in URL")
    if not text:
        raise failure("empty url")
    if text.startswith(":"):
        raise failure("missing protocol scheme")
    match = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*):", text)
    scheme, rest = (match.group(1).lower(), text[match.end() :]) if match else ("", text)
    rest = rest[:-1] if rest.endswith("?") and rest.count("?") == 1 else rest.partition("?")[0]
    if not rest.startswith("/"):
        if scheme:
            return scheme, "", ""
        raise failure("invalid URI for request")
    host = ""
    if scheme and rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        rest = slash + path
        host = authority.rpartition("@")[2]
        port = _port(host)
        if port and not port.isdigit():
            raise failure(f"invalid port {quote(':' + port)} after host")
    bad = re.search(r"%(?![0-9A-Fa-f]{2})", rest)
    if bad:
        raise failure(f"invalid URL escape {quote(rest[bad.start() : bad.start() + 3])}")
    return scheme, host, unquote_to_bytes(rest).decode("utf-8", "surrogateescape")


def _port(host: str) -> str:
    """Go's C{url.URL.Port}: what follows the last colon, outside IPv6 brackets."""
    if host.startswith("["):
        host = host.partition("]")[2]
    return host.rpartition(":")[2] if ":" in host else ""


def parseRestfulUri(text: str) -> Endpoint:
    """
    C{parseRestfulURI}: tcp needs a host and a port and no path; unix needs a path, no
    host, and a path that fits macOS's C{sun_path}.  Checked when vfkit starts its server,
    after the VM's devices are set up.
    """
    scheme, host, path = parseRequestUri(text)
    if scheme not in ("none", "unix", "tcp", "http"):
        raise UsageError(f"invalid scheme {scheme}")
    if scheme in ("tcp", "http"):
        if not host:
            raise UsageError("invalid TCP uri: missing host")
        if path:
            raise UsageError("invalid TCP uri: path is forbidden")
        if not _port(host):
            raise UsageError("invalid TCP uri: missing port")
        return Endpoint("tcp", host, "")
    if scheme == "unix":
        if not path:
            raise UsageError("invalid unix uri: missing path")
        if host:
            raise UsageError("invalid unix uri: host is forbidden")
        if len(path.encode("utf-8", "surrogateescape")) > MAX_SOCKET_PATH:
            raise UsageError("invalid unix uri: socket path length exceeds macOS limits")
        return Endpoint("unix", "", path)
    return Endpoint("none", "", "")


def listen(reactor: IListenReactor, endpoint: Endpoint, site: Site) -> IListeningPort:
    """
    Serve the API as gin does: a unix socket made with the process's umask (vfkit does not
    chmod it), not removed first when a stale one is in the way, or a TCP address.
    """
    if endpoint.scheme == "unix":
        umask = os.umask(0)
        os.umask(umask)
        # Twisted annotates the factory as the bare generic Factory, which no factory of a
        # particular protocol (a Site makes HTTPChannels) matches: its type is invariant.
        return reactor.listenUNIX(endpoint.path, site, mode=0o777 & ~umask)  # type: ignore[arg-type]
    host, _, port = endpoint.host.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    return reactor.listenTCP(int(port), site, interface=host)  # type: ignore[arg-type]  # as above


class StateResource(Resource):
    """C{GET /vm/state}, C{POST /vm/state}, C{GET /vm/inspect}; gin's 404 for the rest."""

    isLeaf = True

    def __init__(self, machine: EmulatedMachine) -> None:
        super().__init__()
        self.machine = machine

    def render(self, request: Request) -> bytes:
        path = request.path
        if path == b"/vm/state" and request.method == b"GET":
            return _json(request, 200, self.machine.stateDocument())
        if path == b"/vm/inspect" and request.method == b"GET":
            return _json(request, 200, self.machine.inspectDocument())
        if path == b"/vm/state" and request.method == b"POST":
            return self._change(request)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"404 page not found"

    def _change(self, request: Request) -> bytes:
        try:
            body = request.content.read() if request.content is not None else b""
            wanted = json.loads(body)["state"]
        except (ValueError, KeyError, TypeError) as e:
            return _json(request, 400, {"error": str(e)})
        actions = {
            "Stop": self.machine.requestStop,
            "HardStop": self.machine.hardStop,
            "Pause": self.machine.pause,
            "Resume": self.machine.resume,
        }
        if wanted not in actions:
            return _json(request, 500, {"error": f"invalid new VMState: {wanted}"})
        try:
            actions[wanted]()
        except ValueError as e:
            return _json(request, 500, {"error": str(e)})
        request.setResponseCode(202)
        return b""


def _json(request: Request, code: int, document: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
