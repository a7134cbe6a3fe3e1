"""
The control protocol's wire format, shared by the daemon's control socket
(L{virby.daemon.service.control}) and the commands that ask it (L{virby.cli.client}): what a request
and a reply look like, written once for both sides.  Pure: no reactor, no socket.

The protocol (version 1), documented in C{docs/control.md}:

    request, one line:  {"version": 1, "command": "status" | "start" | "stop" | "renew",
                         "force": bool, "package": "<dir>"}
    reply, one line:    {"version": 1, "ok": true, ...}  or  {"version": 1, "ok": false,
                                                              "error": "<one line>"}

then the daemon closes the connection.  C{status} replies C{"status": <document>};
C{start} boots the VM (a no-op when it runs) and replies once it is ready
(C{"booted"}, C{"vm_ip"}, C{"vm_port"}, C{"boot_seconds"}); C{stop} stops it (refused while
connections are open unless C{force}) and replies once it has stopped (C{"stopped"},
C{"closed_connections"}); C{renew} (sent by C{virby prepare}) has the daemon move to what is
installed now once no connection is open, and replies at once (C{"renewing"}, C{"changed"},
and while renewing C{"now"} and C{"open_connections"}).  C{force} is optional, and
meaningful for C{stop} only; C{package}, optional too, is for C{renew}: the directory of the
asking command's Virby package, which the daemon compares with its own.

Version rules: a request names the version it speaks, and the daemon replies in it; a
version the daemon does not speak, an unknown command or key, a value of the wrong type,
anything that is not one JSON object on one line gets an error reply.  Daemons before
version 1 wrote the status document at once to every connection, without reading: their
reply has no C{"version"}, and L{parseReply} takes it as the status (what C{virby status}
asked) or refuses it with the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from virby.errors import VirbyError, oneLine

#: The protocol version spoken here; the daemon replies in the request's.
PROTOCOL_VERSION = 1
COMMANDS = ("status", "start", "stop", "renew")
#: The longest request line, newline included: a request is a few dozen bytes.
MAX_REQUEST = 4096
#: The longest reply read: a status document is a few kilobytes.
MAX_REPLY = 1024 * 1024
#: The daemon's launchd job, as C{nix/module.nix} names it.
LAUNCHD_LABEL = "org.nixos.virbyd"


class RequestError(VirbyError):
    """A request the daemon cannot take; the message is the reply's error line."""


class Refused(VirbyError):
    """The daemon answered, and said no; the message is its one line."""


@dataclass(frozen=True)
class Request:
    """One request, as the daemon takes it."""

    command: str
    force: bool = False
    package: str | None = None


def encodeRequest(command: str, force: bool = False, package: str | None = None) -> bytes:
    """One request line, as L{parseRequest} reads it."""
    request: dict[str, Any] = {"version": PROTOCOL_VERSION, "command": command}
    if force:
        request["force"] = True
    if package is not None:
        request["package"] = package
    return json.dumps(request).encode() + b"\n"


def parseRequest(line: bytes) -> Request:
    """
    One request line into a L{Request}.

    @raise RequestError: with the reason, fit to send back.
    """
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("the request is not JSON: send one JSON object on one line") from None
    if not isinstance(request, dict):
        raise RequestError("the request must be a JSON object")
    version = request.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RequestError('the request has no "version" (an integer; this daemon speaks 1)')
    if version != PROTOCOL_VERSION:
        raise RequestError(
            f"protocol version {version} is not spoken here: this daemon speaks "
            f"{PROTOCOL_VERSION}; use the virby command of the same package"
        )
    unknown = sorted(set(request) - {"version", "command", "force", "package"})
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r} in the request")
    command = request.get("command")
    if command not in COMMANDS:
        raise RequestError(f"unknown command {command!r}: the commands are {', '.join(COMMANDS)}")
    force = request.get("force", False)
    if not isinstance(force, bool):
        raise RequestError('"force" must be true or false')
    package = request.get("package")
    if package is not None and not isinstance(package, str):
        raise RequestError('"package" must be a string, the directory of a Virby package')
    return Request(command, force, package)


def encodeReply(reply: dict[str, Any]) -> bytes:
    """One reply line: the reply's fields, in the protocol's version."""
    return json.dumps({"version": PROTOCOL_VERSION, **reply}, sort_keys=True).encode() + b"\n"


def errorReply(message: str) -> dict[str, Any]:
    """The reply that refuses, with its one line."""
    return {"ok": False, "error": oneLine(message)}


def parseReply(raw: bytes, command: str, where: str) -> dict[str, Any]:
    """
    The daemon's reply to C{command} (its C{"ok": true} document).

    @param where: names the daemon in the messages (its control socket's path).
    @raise Refused: when the daemon answered with an error, or is too old for C{command}.
    @raise VirbyError: when the reply is not one.
    """
    try:
        reply = json.loads(raw)
    except ValueError:
        raise VirbyError(f"the daemon at {where} answered something that is not JSON") from None
    if not isinstance(reply, dict):
        raise VirbyError(f"the daemon at {where} answered something that is not a reply")
    if "version" not in reply:
        if command == "status" and "state" in reply:
            return {"ok": True, "status": reply}  # a daemon from before the protocol
        raise Refused(
            f"the daemon running now predates `virby {command}`: restart it (sudo launchctl "
            f"kickstart -k system/{LAUNCHD_LABEL}) and try again"
        )
    if reply.get("ok") is not True:
        raise Refused(str(reply.get("error") or "the daemon refused without saying why"))
    return reply
