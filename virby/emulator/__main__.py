"""
``vfkit-emulator`` / ``python -m virby.emulator``: a vfkit stand-in for Linux.

    vfkit-emulator [--leases-file F] [--guest-port N] [--boot-delay S] [--fault KIND]
                   VFKIT-OPTIONS...

Its own options may also come from the environment (C{VIRBY_EMULATOR_LEASES_FILE},
C{..._GUEST_PORT}, C{..._BOOT_DELAY}, C{..._FAULT}), so the plain name can stand where the
``vfkit`` command is expected.  Faults: C{no-lease}, C{duid-lease}, C{no-sshd},
C{crash-after=N}.

What it emulates: vfkit's command line and refusals, its REST API (state, Stop, HardStop,
Pause, Resume, inspect) on unix:// or tcp://, the serial console, the pidfile, exit 0 after
a guest power-off (Stop, HardStop, SIGTERM, SIGINT), and a guest that "boots" by taking the
keys from the sshd-keys share and starting a real OpenSSH sshd on a fresh loopback address,
recorded in a bootpd-format lease.  What it does not: disks, firmware, Rosetta, networking
beyond that loopback address (the image is never read).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

from virby.emulator.cmdline import UsageError, parse
from virby.emulator.machine import EmulatedMachine, vfkit_log


class StateResource(Resource):
    isLeaf = True

    def __init__(self, machine: EmulatedMachine) -> None:
        super().__init__()
        self.machine = machine

    def render(self, request: Any) -> bytes:
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

    def _change(self, request: Any) -> bytes:
        try:
            wanted = json.loads(request.content.read())["state"]
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


def _json(request: Any, code: int, document: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _listen(reactor: Any, uri: str, site: Site) -> str | None:
    scheme, _, rest = uri.partition("://")
    if scheme == "unix":
        reactor.listenUNIX(rest, site, mode=0o600)
        return rest
    if scheme in ("tcp", "http"):
        host, _, port = rest.rpartition(":")
        reactor.listenTCP(int(port), site, interface=host.strip("[]"))
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        settings, vm = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        sys.stderr.write(f"Error: {e}\n")
        return 1
    from twisted.internet import reactor

    machine = EmulatedMachine(reactor, settings, vm)
    if vm.pidfile:
        fd = os.open(vm.pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    store = vm.bootloader.get("variable-store")
    if vm.bootloader.get("create") and isinstance(store, str):
        open(store, "wb").close()
    try:
        socket_path = _listen(reactor, vm.restful_uri, Site(StateResource(machine)))
    except Exception as e:
        sys.stderr.write(f"Error: cannot serve the REST API on {vm.restful_uri}: {e}\n")
        return 1

    def on_signal(signum: int, frame: object) -> None:
        # vfkit >= 0.6.2: ask the guest to power off, hard-stop it if it does not.
        reactor.callFromThread(machine.requestStop)
        reactor.callFromThread(reactor.callLater, 5, machine.hardStop)

    def install() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    reactor.callWhenRunning(install)
    reactor.callWhenRunning(machine.start)
    vfkit_log("info", "emulating vfkit for a Linux host")
    reactor.run(installSignalHandlers=True)
    if socket_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    return machine.exitCode


if __name__ == "__main__":
    sys.exit(main())
