"""
The daemon after crashes and against a hostile setup, end to end: real twistd, the vfkit
emulator (or stand-ins for a hung or foreign vfkit), sshd, ssh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from testbed.builder import Builder, tool
from testbed.processes import pids_of, wait_gone

pytestmark = pytest.mark.e2e


def status_of(builder: Builder, timeout: float = 30) -> dict:
    result = subprocess.run(
        [tool("virby"), "status", "--json", "--config", str(builder.config)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_fifo_as_lease_file_never_freezes_the_daemon(make_builder) -> None:
    builder = make_builder(**{"start-timeout": 20})
    fifo = builder.root / "fifo_leases"
    os.mkfifo(fifo)
    builder.config.write_text(json.dumps({**builder.settings, "leases-file": str(fifo)}))
    daemon = builder.start()
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed: cannot read the lease file .*a FIFO, not a regular file")
    assert status_of(builder)["state"] in ("stopping", "stopped")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert "Traceback" not in daemon.text()
    assert builder.emulators() == []


def test_a_duid_lease_is_named_in_the_error(make_builder) -> None:
    builder = make_builder(**{"start-timeout": 3})
    builder.env["VIRBY_EMULATOR_FAULT"] = "duid-lease"
    daemon = builder.start()
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed: no DHCP lease for MAC .*DUID client id")
    last_error = status_of(builder)["last_error"]
    assert "DUID client id" in last_error and 'clientid ""' in last_error


HUNG_VFKIT = """#!{python}
# A vfkit whose REST API accepts requests and never answers them, and which ignores
# SIGTERM: the hung hypervisor a stop must get through within launchd's 20 s.
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
path = sys.argv[sys.argv.index("--restful-uri") + 1].removeprefix("unix://")
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(16)
print('time="now" level=info msg="REST API listening"', file=sys.stderr, flush=True)
held = []
while True:
    connection, _ = server.accept()
    held.append(connection)
"""

SILENT_VFKIT = """#!/bin/sh
# A vfkit that never brings its REST API up (it fails before the socket exists).
exec sleep 600
"""


def fake_vfkit(builder: Builder, name: str, text: str) -> str:
    program = builder.root / name
    program.write_text(text.format(python=sys.executable))
    program.chmod(0o755)
    return str(program)


def test_a_boot_that_fails_before_vfkits_api_exists_stops_it_at_once(make_builder) -> None:
    builder = make_builder(**{"start-timeout": 2})
    vfkit = fake_vfkit(builder, "silent-vfkit", SILENT_VFKIT)
    builder.config.write_text(json.dumps({**builder.settings, "vfkit": vfkit}))
    daemon = builder.start()
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed: no DHCP lease")
    daemon.wait_for_line(r"did not take Stop: vfkit's API at \S+vfkit\.sock is unreachable")
    daemon.wait_for_line(r"did not take HardStop")
    daemon.wait_for_line(r"sending SIGTERM")
    daemon.wait_for_line(r"VM stopped")
    assert "took Stop" not in daemon.text()


def test_sigterm_gets_through_a_hung_vfkit(make_builder) -> None:
    builder = make_builder(**{"on-demand": False})
    vfkit = fake_vfkit(builder, "hung-vfkit", HUNG_VFKIT)
    builder.config.write_text(json.dumps({**builder.settings, "vfkit": vfkit}))
    daemon = builder.start()
    daemon.wait_for_line(r"starting .*hung-vfkit")
    daemon.wait_for_line(r"vfkit: .*msg=\"REST API listening\"")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    output = daemon.text()
    assert "did not take Stop: vfkit did not answer Stop within 1.5s" in output, output
    assert "did not take HardStop: vfkit did not answer HardStop within 1.5s" in output
    assert "sending SIGKILL" in output and "Traceback" not in output


def test_last_error_carries_vfkits_own_words(make_builder) -> None:
    builder = make_builder()
    builder.env["VIRBY_EMULATOR_FAULT"] = "crash-after=1"
    daemon = builder.start()
    builder.ssh("true", timeout=60)
    daemon.wait_for_line(r"the VM exited with status 1", timeout=60)
    last_error = status_of(builder)["last_error"]
    assert last_error == (
        "the VM exited with status 1 (vfkit: virtualization error: hypervisor virtualization error)"
    )


# -- starting again after a crash: a lock the kernel releases, stale files replaced


@pytest.fixture
def unrelated_process():
    process = subprocess.Popen(["sleep", "600"])
    yield process.pid
    process.kill()
    process.wait(30)


def test_a_lock_naming_a_live_unrelated_pid_does_not_stop_a_start(
    make_builder, unrelated_process
) -> None:
    builder = make_builder()
    (builder.wd / "daemon.lock").write_text(f"{unrelated_process}\n")
    os.symlink(str(unrelated_process), builder.wd / "control.sock.lock")
    daemon = builder.start()
    assert status_of(builder)["daemon_pid"] == daemon.pid
    result = builder.ssh("echo", "up")
    assert result.stdout == "up\n", result.stderr + daemon.text()


@pytest.mark.parametrize("junk", ["file", "stale-socket"])
def test_junk_at_the_control_socket_is_replaced(make_builder, junk) -> None:
    builder = make_builder()
    path = builder.wd / "control.sock"
    if junk == "file":
        path.write_text("junk")
    else:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()
    daemon = builder.start()
    assert status_of(builder)["daemon_pid"] == daemon.pid


def test_a_failed_start_leaves_nothing_behind(make_builder) -> None:
    builder = make_builder()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", builder.port))
        busy.listen(1)
        daemon = builder.start(wait=False)
        assert daemon.wait_exit(60) == 1
    lines = [line for line in daemon.text().splitlines() if "error" in line.lower()]
    assert any("virbyd: error: cannot listen on" in line for line in lines), daemon.text()
    assert "Traceback" not in daemon.text()
    left = {p.name for p in builder.wd.iterdir()}
    assert not left & {"control.sock", "control.sock.lock", "daemon.lock"}, left


def test_two_daemons_cannot_serve_one_working_directory(make_builder) -> None:
    builder = make_builder()
    first = builder.start()
    second = builder.start("--listen", "tcp:0:interface=127.0.0.1", wait=False)
    assert second.wait_exit(60) == 1
    errors = [line for line in second.text().splitlines() if "virbyd: error" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"virbyd: error: another virby daemon (pid {first.pid}) is already serving "
        f"{builder.wd}: stop it first, or give this daemon its own working-directory"
    ), second.text()
    assert status_of(builder)["daemon_pid"] == first.pid
    assert builder.ssh("true").returncode == 0


# -- a VM left by a killed daemon: known by what only ours has, never by its name


def wrapped_emulator(builder: Builder) -> str:
    """vfkit behind a wrapper: a shell that execs the emulator under another name."""
    binary = builder.root / "bin"
    binary.mkdir()
    hypervisor = binary / "hypervisor"
    shutil.copy(tool("vfkit-emulator"), hypervisor)
    wrapper = binary / "vm-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec "{hypervisor}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def hypervisors(builder: Builder) -> list[int]:
    return pids_of(r"bin/hypervisor .*" + re.escape(str(builder.wd)))


def test_a_vm_started_through_a_wrapper_is_stopped_after_a_crash(make_builder) -> None:
    builder = make_builder()
    builder.config.write_text(json.dumps({**builder.settings, "vfkit": wrapped_emulator(builder)}))
    daemon = builder.start()
    assert builder.ssh("true").returncode == 0, daemon.text()
    (orphan,) = hypervisors(builder)
    assert int((builder.wd / "vfkit.pid").read_text()) == orphan
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(10)
    assert hypervisors(builder) == [orphan], "the orphan outlives its daemon"
    again = builder.start()
    again.wait_for_line(rf"stopped the leftover vfkit \(pid {orphan}\)", timeout=60)
    assert wait_gone([orphan]) == []
    result = builder.ssh("echo", "again")
    assert result.stdout == "again\n", result.stderr + again.text()
    (current,) = hypervisors(builder)
    assert current != orphan


def test_a_process_named_vfkit_that_is_not_ours_is_left_alone(make_builder) -> None:
    builder = make_builder()
    foreign_dir = builder.root / "podman"
    foreign_dir.mkdir()
    shutil.copy(shutil.which("sleep") or "/bin/sleep", foreign_dir / "vfkit")
    foreign = subprocess.Popen([str(foreign_dir / "vfkit"), "600"])
    try:
        (builder.wd / "vfkit.pid").write_text(str(foreign.pid))
        daemon = builder.start()
        daemon.wait_for_line(
            rf"names pid {foreign.pid}, which is not this working directory's vfkit .*"
            r"leaving it alone"
        )
        assert builder.ssh("true").returncode == 0, daemon.text()
        assert foreign.poll() is None, "another tool's vfkit is never signalled"
    finally:
        foreign.kill()
        foreign.wait(30)


def test_no_second_vm_boots_on_a_disk_an_unknown_vm_holds(make_builder) -> None:
    builder = make_builder()
    orphan = builder.orphan()
    (builder.wd / "vfkit.pid").unlink()  # nothing says where the orphan is any more
    again = builder.start()
    assert builder.ssh("true", timeout=60).returncode != 0
    again.wait_for_line(r"boot failed: a VM of \S+ is still running: a process holds \S+vm\.lock")
    assert builder.emulators() == [orphan], "no second VM on the same disk"
