"""
``virby start`` and ``virby stop`` end to end: the real command, the real daemon's control
socket, the emulated VM.  And the control socket itself against clients that misbehave.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess

import pytest

from testbed.builder import Builder, tool

pytestmark = pytest.mark.e2e


def virby(builder: Builder, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("virby"), *args, "--config", str(builder.config)],
        capture_output=True, text=True, timeout=timeout, env=builder.env,
    )  # fmt: skip


def test_start_boots_with_no_connection_and_status_shows_it_running(make_builder) -> None:
    builder = make_builder(ttl=600)
    daemon = builder.start()
    started = virby(builder, "start")
    assert started.returncode == 0, started.stderr + daemon.text()
    *phases, last = started.stdout.splitlines()
    assert last.startswith("VM running at 127.0.") and "booted in" in last
    assert all(line.startswith("Boot: ") and " of 30s" in line for line in phases), phases
    status = builder.status()
    assert status["state"] == "running" and status["active_connections"] == 0
    assert status["waiting_connections"] == 0
    assert status["idle_stop_in"] is not None, "a warmed-up VM still stops after the ttl"
    assert len(builder.emulators()) == 1
    again = virby(builder, "start")
    assert again.returncode == 0 and again.stdout.startswith("VM already running at 127.0.")
    assert daemon.text().count("booting the VM") == 1
    result = builder.ssh("true")
    assert result.returncode == 0, "the started VM serves builds"


def test_start_starts_an_on_demand_daemon_launchd_has_not_started(make_builder) -> None:
    """
    After a reboot or a switch an on-demand daemon runs only once a connection reaches the
    port launchd holds: status and stop say so, and start has it started, then boots.
    """
    builder = make_builder(ttl=2)
    activator = builder.socket_activated()
    status = virby(builder, "status")
    assert status.returncode == 3, status.stdout + status.stderr
    assert status.stdout.startswith("Virby: the daemon is not started yet (on-demand)")
    stopped = virby(builder, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout == "Virby: nothing to stop: the daemon is not started yet (on-demand)\n"
    assert "serving the builder" not in activator.text(), "neither of them started it"
    started = virby(builder, "start")
    assert started.returncode == 0, started.stdout + started.stderr + activator.text()
    *phases, last = started.stdout.splitlines()
    assert last.startswith("VM running at 127.0.") and "booted in" in last
    assert all(line.startswith("Boot: ") for line in phases), phases
    assert activator.text().count("booting the VM") == 1
    assert len(builder.emulators()) == 1
    status = builder.status()
    assert status["state"] == "running" and status["active_connections"] == 0
    activator.wait_for_line(r"no connection for 2s: stopping the VM", timeout=30)
    activator.wait_for_line(r"VM stopped", timeout=30)
    assert builder.emulators() == [], "the connection that started the daemon holds nothing up"


def test_start_with_nothing_on_the_port_says_how_to_load_the_job(make_builder) -> None:
    builder = make_builder()
    started = virby(builder, "start")
    assert started.returncode == 3
    assert started.stdout.endswith(
        f"and nothing listens on 127.0.0.1:{builder.port} to start it: load its launchd job: "
        "sudo launchctl bootstrap system /Library/LaunchDaemons/org.nixos.virbyd.plist "
        "(or darwin-rebuild switch)\n"
    )
    assert started.stdout.count("\n") == 1 and started.stderr == ""


def test_stop_without_a_session_frees_the_vm(make_builder) -> None:
    builder = make_builder()
    daemon = builder.start()
    assert builder.ssh("true").returncode == 0
    daemon.wait_for_line(r"VM ready at")
    stopped = virby(builder, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == "VM stopped\n"
    assert builder.emulators() == [] and builder.status()["state"] == "stopped"
    assert builder.status()["last_error"] is None
    assert virby(builder, "stop").stdout == "VM was not running\n"
    assert builder.ssh("true").returncode == 0, "the next build boots it again"


def test_stop_is_refused_during_a_session_and_force_closes_it(make_builder) -> None:
    builder = make_builder()
    daemon = builder.start()
    session = builder.ssh_background("echo", "in", "&&", "sleep", "60")
    try:
        session.wait_for_line(r"in", timeout=60)
        refused = virby(builder, "stop")
        assert refused.returncode == 1
        assert refused.stderr == (
            "virby stop: error: 1 connection is open (a build may be running): "
            "`virby stop --force` closes them\n"
        )
        assert builder.status()["state"] == "running" and session.process.poll() is None
        forced = virby(builder, "stop", "--force")
        assert forced.returncode == 0, forced.stderr + daemon.text()
        assert forced.stdout == "VM stopped; closed 1 connection\n"
        assert session.wait_exit(30) != 0, "the session was closed"
    finally:
        session.kill_all()
    assert builder.emulators() == []
    status = builder.status()
    assert status["state"] == "stopped" and status["active_connections"] == 0


def raw_exchange(path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        # Cut off mid-flood: what it answered is still to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def test_clients_that_misbehave_get_an_error_and_the_daemon_goes_on(make_builder) -> None:
    builder = make_builder()
    daemon = builder.start()
    path = str(builder.wd / "control.sock")
    garbage = json.loads(raw_exchange(path, b"please stop\n"))
    assert garbage == {
        "version": 1,
        "ok": False,
        "error": "the request is not JSON: send one JSON object on one line",
    }
    future = json.loads(raw_exchange(path, b'{"version": 9, "command": "status"}\n'))
    assert future["ok"] is False and "protocol version 9" in future["error"]
    flood = raw_exchange(path, b"x" * (8 * 1024 * 1024))
    assert json.loads(flood)["error"] == "the request is longer than 4096 bytes"
    assert builder.status()["state"] == "stopped", "the daemon still answers"
    assert "Traceback" not in daemon.text()


def test_someone_else_is_refused_by_their_credentials(make_builder) -> None:
    """Even with the socket opened to all, another user gets one line, not the VM."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to ask as another user")
    builder = make_builder()
    builder.start()
    # Open the way to the socket for everyone (the daemon would never), then restore it.
    opened = {}
    directory = builder.wd
    while str(directory) not in ("/", "/tmp"):
        opened[directory] = os.stat(directory).st_mode & 0o7777
        os.chmod(directory, opened[directory] | 0o011)
        directory = directory.parent
    os.chmod(builder.wd / "control.sock", 0o666)
    try:
        asked = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             tool("virby"), "stop", "--force", "--working-directory", str(builder.wd)],
            capture_output=True, text=True, timeout=60, env=builder.env,
        )  # fmt: skip
    finally:
        for directory, mode in opened.items():
            os.chmod(directory, mode)
    assert asked.returncode == 1
    assert asked.stderr == (
        "virby stop: error: only root and the daemon's user (root) may ask the daemon: "
        "run the command with sudo\n"
    )


def test_a_request_ended_by_a_half_close_is_answered(make_builder) -> None:
    """As C{nc -N} and C{socat} send it: no newline, then the end of input."""
    builder = make_builder()
    builder.start()
    path = str(builder.wd / "control.sock")
    status = b'{"version": 1, "command": "status"}'
    for request in (status + b"\n", status):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert json.loads(data)["status"]["state"] == "stopped"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.shutdown(socket.SHUT_WR)
        assert json.loads(s.recv(65536))["error"].startswith("the input ended before a request")


def test_a_crowd_of_status_calls_all_get_their_answer(make_builder) -> None:
    """
    Many commands at once (a monitor, a loop in a script) queue on the control socket and
    each gets its answer: none is refused for a full queue.
    """
    from virby.cli.client import ask

    builder = make_builder()
    builder.start()
    path = str(builder.wd / "control.sock")
    crowd, rounds = 120, 10
    go_read, go_write = os.pipe()
    children = []
    for _ in range(crowd):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.close(go_write)
                os.read(go_read, 1)  # all of them at once
                for _ in range(rounds):
                    assert ask(path, "status", timeout=60)["status"]["state"] == "stopped"
                code = 0
            except BaseException as e:
                os.write(2, f"{e}\n".encode())
            finally:
                os._exit(code)
        children.append(pid)
    os.close(go_read)
    os.close(go_write)  # the end of input wakes every child at once
    failed = [pid for pid in children if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
    assert failed == [], f"{len(failed)} of {crowd} clients had a status call fail"


def test_reset_stops_the_vm_and_gives_it_a_new_disk(make_builder) -> None:
    """The guest's state lives on diff.img: after a reset it is gone, and the VM boots anew."""
    from virby.emulator.guest import readState

    builder = make_builder()
    daemon = builder.start()
    diff = str(builder.wd / "diff.img")
    session = builder.ssh_background("echo", "in", "&&", "sleep", "60")
    try:
        session.wait_for_line(r"in", timeout=60)
        assert readState(diff).boots == 1
        refused = virby(builder, "reset")
        assert refused.returncode == 1
        assert refused.stderr == (
            "virby reset: error: the VM was not stopped, so its disk is kept: 1 connection is "
            "open (a build may be running): `virby reset --force` closes them\n"
        )
        assert builder.status()["state"] == "running" and readState(diff).boots == 1
        forced = virby(builder, "reset", "--force")
        assert forced.returncode == 0, forced.stderr + daemon.text()
        assert forced.stdout.startswith(
            "Virby: stopped the VM and closed 1 connection; made diff.img anew from base.img ("
        )
        assert session.wait_exit(30) != 0, "the session was closed"
    finally:
        session.kill_all()
    assert builder.emulators() == [] and builder.status()["state"] == "stopped"
    assert readState(diff).boots == 0, "the guest's state went with the old disk"
    assert os.path.getsize(diff) == 1024**3
    assert builder.ssh("true").returncode == 0, "the next build boots on the new disk"
    assert readState(diff).boots == 1
    daemon.signal(signal.SIGTERM)
    daemon.wait_exit(60)
    again = virby(builder, "reset")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("Virby: no daemon is running; made diff.img anew")
