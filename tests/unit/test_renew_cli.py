"""
prepare's last step: asking the daemon to renew, and what the person at the switch is told.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from tests.fakes import FakeCommands
from virby.cli.renew import askToRenew, describeRenewal
from virby.config import Config, fromMapping
from virby.daemon.control import ControlFactory, controlEndpoint
from virby.installed import packageDirectory
from virby.layout import CONTROL_SOCKET
from virby.reactors import hostReactor


def _config(wd: Path) -> Config:
    return fromMapping({"working-directory": str(wd)})


def _answerOnce(wd: Path, reply: dict) -> int:
    """A daemon played by a child process: it reads one request and answers C{reply}."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(wd / CONTROL_SOCKET))
    server.listen(1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        connection, _ = server.accept()
        request = connection.makefile("rb").readline()
        assert json.loads(request)["command"] == "renew"
        connection.sendall(json.dumps({"version": 1, **reply}).encode() + b"\n")
        connection.close()
        os._exit(0)
    server.close()
    return pid


def _ask(wd: Path, reply: dict) -> str | None:
    pid = _answerOnce(wd, reply)
    try:
        return askToRenew(_config(wd))
    finally:
        os.waitpid(pid, 0)


def test_no_daemon_running_is_nothing_to_say(short_tmp: Path) -> None:
    assert askToRenew(_config(short_tmp)) is None


def test_a_daemon_that_runs_what_is_installed_says_nothing(short_tmp: Path) -> None:
    assert _ask(short_tmp, {"ok": True, "renewing": False, "changed": []}) is None


def test_an_idle_daemon_moves_now(short_tmp: Path) -> None:
    reply = {"ok": True, "renewing": True, "changed": ["image", "SSH keys"], "now": True}
    assert _ask(short_tmp, {**reply, "open_connections": 0}) == (
        "the daemon moves to its new image and SSH keys now: no connection is open"
    )


def test_a_busy_daemon_moves_once_its_builds_end(short_tmp: Path) -> None:
    reply = {"ok": True, "renewing": True, "changed": ["image"], "now": False}
    assert _ask(short_tmp, {**reply, "open_connections": 2}) == (
        "the daemon moves to its new image once its 2 open connections end (no build is "
        "cut; new builds use the running VM meanwhile)"
    )


def test_a_daemon_too_old_to_renew_is_told_with_the_restart_and_its_cost(short_tmp: Path) -> None:
    error = "unknown command 'renew': the commands are status, start, stop"
    line = _ask(short_tmp, {"ok": False, "error": error})
    assert line is not None
    assert "too old to move to the new image by itself" in line
    assert "launchctl kickstart -k system/org.nixos.virbyd" in line and "cutting" in line


def test_a_refusal_is_passed_on_in_one_line(short_tmp: Path) -> None:
    error = "this daemon listens on tcp:31222 itself, so nothing would start it again"
    assert _ask(short_tmp, {"ok": False, "error": error}) == f"the daemon did not renew: {error}"


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        ({"renewing": False}, None),
        (
            {"renewing": True, "changed": ["config"], "now": False, "open_connections": 0},
            "the daemon moves to its new config once the VM's boot or stop under way is done",
        ),
        (
            {"renewing": True, "changed": ["image"], "now": False, "open_connections": 1},
            "the daemon moves to its new image once its 1 open connection end (no build is "
            "cut; new builds use the running VM meanwhile)",
        ),
    ],
)
def test_replies_read_as_one_line(reply: dict, line: str | None) -> None:
    assert describeRenewal(reply) == line


class RenewingCommands(FakeCommands):
    """A daemon whose renewal finds a new image and nothing open."""

    def renew(self, package: str | None) -> Deferred[dict[str, Any]]:
        self.renewals.append(Deferred())
        self.renewedFrom.append(package)
        return succeed({"renewing": True, "changed": ["image"], "now": True, "open_connections": 0})


@pytest_twisted.ensureDeferred
async def test_the_request_goes_through_the_daemons_control_socket(short_tmp: Path) -> None:
    from twisted.internet import reactor as globalReactor
    from twisted.internet.threads import deferToThread

    reactor = hostReactor(globalReactor)
    commands = RenewingCommands()
    port = await controlEndpoint(reactor, str(short_tmp / CONTROL_SOCKET)).listen(
        ControlFactory(commands, reactor)
    )
    try:
        line = await deferToThread(askToRenew, _config(short_tmp))
        assert line == "the daemon moves to its new image now: no connection is open"
        assert commands.renewedFrom == [packageDirectory()], "it names its own package"
    finally:
        await port.stopListening()
