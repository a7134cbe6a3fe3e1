"""``virby status`` and the control socket it reads."""

from __future__ import annotations

import io
import json
import os
import socket

import pytest
import pytest_twisted

from tests.fakes import FakeCommands
from virby.cli import status
from virby.cli.status import EXIT_DOWN, duration, query, render, run, size
from virby.config import fromMapping
from virby.daemon.control import ControlFactory, controlEndpoint
from virby.errors import VirbyError
from virby.layout import CONTROL_SOCKET, IMAGE_FAILURE, NO_IMAGE_FIX
from virby.reactors import hostReactor

RUNNING = {
    "state": "running",
    "on_demand": True,
    "vm_ip": "192.168.64.7",
    "vm_port": 22,
    "vfkit_pid": 4242,
    "uptime": 125.0,
    "active_connections": 2,
    "waiting_connections": 0,
    "idle_stop_in": None,
    "restart_in": None,
    "last_boot_seconds": 8.44,
    "last_error": None,
    "boots": 1,
    "daemon_pid": 99,
    "daemon_uptime": 7300.0,
    "listening": ["127.0.0.1:31222"],
    "ttl": 10800,
    "version": "0.1.0",
}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0s"), (59.6, "1m 00s"), (125, "2m 05s"), (7300, "2h 01m")],
)
def test_duration(seconds, text) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_size(count, text) -> None:
    assert size(count) == text


def test_render_shows_the_bytes_spliced() -> None:
    text = render({**RUNNING, "bytes_to_guest": 3 * 1024**2, "bytes_from_guest": 2048})
    assert "Traffic:" in text and "3.0 MiB to the guest, 2.0 KiB back" in text
    assert "Traffic" not in render(RUNNING), "an older daemon does not say"


def test_render_running() -> None:
    text = render(RUNNING)
    assert "running at 192.168.64.7:22 (vfkit pid 4242), up 2m 05s" in text
    assert "2 active" in text
    assert "after 3h 00m without connections" in text
    assert "Last error:  none" in text
    assert "8.4s" in text


def test_render_a_boot_as_it_happens() -> None:
    booting = {
        **RUNNING,
        "state": "booting",
        "vm_ip": None,
        "boot_phase": "sshd",
        "boot_waiting_for": "waiting for the guest's sshd to answer",
        "boot_last_step": "the guest leased 192.168.64.7",
        "boot_elapsed": 12.4,
        "start_timeout": 180,
        "active_connections": 0,
        "waiting_connections": 1,
    }
    text = render(booting)
    assert (
        "Boot:        waiting for the guest's sshd to answer, 12s of 3m 00s "
        "(last: the guest leased 192.168.64.7)"
    ) in text
    assert "0 active, 1 waiting for the VM" in text
    assert "Boot:" not in render(RUNNING)


def test_render_the_last_boots() -> None:
    assert "Last boot:   8.4s\n" in render({**RUNNING, "recent_boots": 1})
    text = render({**RUNNING, "recent_boots": 4, "recent_boot_median_seconds": 9.05})
    assert "Last boot:   8.4s (median 9.1s of the last 4)" in text


def test_render_idle_countdown_and_error() -> None:
    text = render({**RUNNING, "active_connections": 0, "idle_stop_in": 61.0, "last_error": "boom"})
    assert "in 1m 01s (ttl 3h 00m)" in text
    assert "Last error:  boom" in text
    always_on = render({**RUNNING, "on_demand": False})
    assert "never (always-on)" in always_on


def _config(short_tmp):
    return fromMapping({"working-directory": str(short_tmp)})


def test_status_when_the_daemon_is_down(short_tmp) -> None:
    out = io.StringIO()
    assert run(_config(short_tmp), asJson=False, out=out) == EXIT_DOWN
    assert "not running" in out.getvalue()
    out = io.StringIO()
    assert run(_config(short_tmp), asJson=True, out=out) == EXIT_DOWN
    assert json.loads(out.getvalue())["state"] == "down"


def test_an_on_demand_daemon_not_started_yet_is_said_so_with_what_starts_it(short_tmp) -> None:
    config = fromMapping({"working-directory": str(short_tmp), "on-demand": True})
    out = io.StringIO()
    assert run(config, asJson=False, out=out) == EXIT_DOWN
    line = (
        "the daemon is not started yet (on-demand): the first connection to the builder's "
        "port (a build, `ssh virby-vm`, or `sudo virby start`) starts it"
    )
    assert out.getvalue() == f"Virby: {line}\n"
    out = io.StringIO()
    assert run(config, asJson=True, out=out) == EXIT_DOWN
    assert json.loads(out.getvalue()) == {"state": "down", "on_demand": True, "reason": line}


def test_an_always_on_daemon_not_running_is_said_so_with_the_fix(short_tmp) -> None:
    out = io.StringIO()
    assert run(_config(short_tmp), asJson=False, out=out) == EXIT_DOWN
    assert out.getvalue() == (
        f"Virby: the daemon is not running (no control socket at {short_tmp}/control.sock): "
        "start it with sudo launchctl kickstart -k system/org.nixos.virbyd, and read "
        "/var/log/virbyd.log\n"
    )
    out = io.StringIO()
    run(_config(short_tmp), asJson=True, out=out)
    assert json.loads(out.getvalue())["on_demand"] is False


def test_status_with_a_stale_socket_file(short_tmp) -> None:
    import socket

    path = str(short_tmp / CONTROL_SOCKET)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
    out = io.StringIO()
    assert run(_config(short_tmp), asJson=False, out=out) == EXIT_DOWN
    assert "stale" in out.getvalue()


def test_garbage_from_the_socket_is_one_line(short_tmp) -> None:
    with pytest.raises(VirbyError, match="not JSON"):
        _serve_once_and_query(short_tmp, b"nonsense")


def _serve_once_and_query(short_tmp, payload: bytes) -> dict:
    """A throwaway unix server in a child process would be overkill: use a socketpair."""
    import socket

    path = str(short_tmp / "fake.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        connection, _ = server.accept()
        connection.sendall(payload)
        connection.close()
        os._exit(0)
    server.close()
    try:
        return query(path)
    finally:
        os.waitpid(pid, 0)


@pytest_twisted.ensureDeferred
async def test_status_reads_the_daemons_control_socket(short_tmp) -> None:
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    port = await controlEndpoint(reactor, str(short_tmp / CONTROL_SOCKET)).listen(
        ControlFactory(FakeCommands(RUNNING), reactor)
    )
    try:
        assert os.stat(short_tmp / CONTROL_SOCKET).st_mode & 0o777 == 0o600
        out = io.StringIO()
        from twisted.internet.threads import deferToThread

        code = await deferToThread(run, _config(short_tmp), True, out)
        assert code == 0
        assert json.loads(out.getvalue()) == RUNNING
    finally:
        await port.stopListening()
    assert not (short_tmp / CONTROL_SOCKET).exists()


def test_warnings_are_shown() -> None:
    text = render({**RUNNING, "warnings": ["nested-virtualization is on, but this Mac cannot"]})
    assert "Warning:     nested-virtualization is on, but this Mac cannot" in text
    assert "Warning" not in render(RUNNING)


def test_a_user_who_may_not_ask_is_told_to_use_sudo(short_tmp, monkeypatch) -> None:
    def refused(self, address) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refused)
    with pytest.raises(VirbyError) as caught:
        run(_config(short_tmp), asJson=False, out=io.StringIO())
    assert str(caught.value) == (
        f"only root may ask the daemon (its control socket {short_tmp}/control.sock is "
        "owner-only): run `sudo virby status`"
    )
    out = io.StringIO()
    assert run(_config(short_tmp), asJson=True, out=out) == 1
    assert json.loads(out.getvalue()) == {"state": "unknown", "reason": str(caught.value)}


def test_no_image_yet_is_said_with_its_cause(short_tmp, monkeypatch) -> None:
    monkeypatch.setattr(status, "query", lambda path: RUNNING)
    (short_tmp / IMAGE_FAILURE).write_text("no builder for aarch64-linux\n")
    out = io.StringIO()
    assert run(_config(short_tmp), asJson=False, out=out) == 0
    assert out.getvalue().splitlines()[-1].split(None, 1) == [
        "Image:",
        f"no image yet: no builder for aarch64-linux; {NO_IMAGE_FIX}",
    ]
    (short_tmp / "base.img").write_bytes(b"")
    out = io.StringIO()
    run(_config(short_tmp), asJson=False, out=out)
    assert "Image:" not in out.getvalue()


def test_a_renewal_under_way_is_said() -> None:
    assert "Renewing:" not in render(RUNNING)
    text = render({**RUNNING, "renewing": True, "renewing_for": ["image", "SSH keys"]})
    assert (
        "Renewing:    to its new image and SSH keys: the daemon restarts once no connection is open"
    ) in text
    older = render({**RUNNING, "renewing": True})
    assert "Renewing:    to its what is installed:" in older
