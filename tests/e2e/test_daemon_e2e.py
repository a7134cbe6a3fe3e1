"""
The daemon end to end: real virbyd (and twistd), the vfkit emulator, a real sshd guest, ssh,
nix-build.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess

import pytest

from testbed.builder import Builder, read_line, tool

pytestmark = pytest.mark.e2e


def assert_nothing_left(builder: Builder) -> None:
    assert builder.emulators() == [], "a vfkit emulator is still running"
    assert builder.guests() == [], "a guest sshd is still running"


def test_ssh_through_a_tcp_listener_runs_a_command_in_the_guest(make_builder) -> None:
    builder = make_builder()
    daemon = builder.start()
    assert builder.emulators() == [], "on demand: nothing boots before a connection"
    result = builder.ssh("echo", "hello from the guest")
    assert result.returncode == 0, result.stderr + daemon.text()
    assert result.stdout == "hello from the guest\n"
    # Each phase of the boot, at info, with its time.
    daemon.wait_for_line(r"boot: vfkit started \(pid \d+\); waiting for the guest's DHCP lease \(")
    daemon.wait_for_line(r"boot: the guest leased 127\.0\.\d+\.\d+; waiting for the guest's sshd")
    daemon.wait_for_line(r"VM ready at 127\.0\.\d+\.\d+:2222")
    status = builder.status()
    assert status["state"] == "running" and status["vm_ip"].startswith("127.0.")
    assert status["recent_boots"] == 1 and status["boot_phase"] is None
    assert status["boots"] == 1 and status["vfkit_pid"] in builder.emulators()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert_nothing_left(builder)
    assert not (builder.wd / "vfkit.pid").exists()
    assert not (builder.wd / "vfkit.sock").exists()
    assert not (builder.wd / "control.sock").exists()


def test_started_by_its_first_connection_under_systemd_socket_activate(make_builder) -> None:
    builder = make_builder()
    activator = builder.socket_activated()
    assert "serving the builder" not in activator.text()
    result = builder.ssh("uname", "-s")
    assert result.returncode == 0, result.stderr + activator.text()
    assert result.stdout.strip() == "Linux"
    assert "serving the builder on" in activator.text()
    activator.signal(signal.SIGTERM)
    assert activator.wait_exit(30) == 0
    assert_nothing_left(builder)


def test_fifty_connections_at_cold_start_one_vfkit(make_builder) -> None:
    builder = make_builder()
    daemon = builder.start()
    sockets = [socket.create_connection(("127.0.0.1", builder.port), timeout=60)
               for _ in range(50)]  # fmt: skip
    try:
        banners = [read_line(s) for s in sockets]
        assert all(b.startswith(b"SSH-2.0-") for b in banners), banners
    finally:
        for s in sockets:
            s.close()
    assert daemon.text().count("booting the VM") == 1
    assert len(builder.emulators()) == 1


def test_idle_stop_after_ttl_and_the_next_connection_boots_again(make_builder) -> None:
    builder = make_builder(ttl=2)
    daemon = builder.start()
    session = builder.ssh_background("sleep", "4", "&&", "echo", "held")
    try:
        daemon.wait_for_line(r"VM ready at")
        session.wait_for_line(r"held", timeout=30)
        assert "stopping the VM" not in daemon.text(), "stopped while a connection was open"
        assert session.wait_exit(30) == 0
    finally:
        session.kill_all()
    daemon.wait_for_line(r"no connection for 2s: stopping the VM", timeout=30)
    daemon.wait_for_line(r"VM stopped", timeout=30)
    assert builder.emulators() == []
    assert builder.status()["state"] == "stopped"
    result = builder.ssh("true")
    assert result.returncode == 0, result.stderr
    assert daemon.text().count("booting the VM") == 2


def test_sigterm_during_a_boot(make_builder) -> None:
    builder = make_builder()
    builder.env["VIRBY_EMULATOR_BOOT_DELAY"] = "30"
    daemon = builder.start()
    client = socket.create_connection(("127.0.0.1", builder.port), timeout=10)
    try:
        daemon.wait_for_line(r"booting the VM")
        daemon.wait_for_line(r"starting .*vfkit-emulator")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(30) == 0
        assert client.recv(10) == b"", "the waiting client is closed"
    finally:
        client.close()
    assert_nothing_left(builder)


def test_sigterm_during_a_session(make_builder) -> None:
    builder = make_builder()
    daemon = builder.start()
    session = builder.ssh_background("echo", "started", "&&", "sleep", "600")
    try:
        session.wait_for_line(r"started", timeout=60)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(30) == 0
        session.wait_exit(30)
    finally:
        session.kill_all()
    assert_nothing_left(builder)


def test_kill_9_then_restart_stops_the_orphan_first(make_builder) -> None:
    builder = make_builder()
    orphan = builder.orphan()
    assert builder.emulators() == [orphan], "the orphan outlives its daemon"
    again = builder.start()
    again.wait_for_line(rf"stopped the leftover vfkit \(pid {orphan}\)", timeout=30)
    assert orphan not in builder.emulators()
    result = builder.ssh("echo", "again")
    assert result.stdout == "again\n", result.stderr + again.text()
    assert orphan not in builder.emulators() and len(builder.emulators()) == 1


def test_no_lease_is_one_clear_error_and_the_daemon_keeps_serving(make_builder) -> None:
    builder = make_builder(**{"start-timeout": 3})
    builder.env["VIRBY_EMULATOR_FAULT"] = "no-lease"
    daemon = builder.start()
    result = builder.ssh("true", timeout=60)
    assert result.returncode != 0
    daemon.wait_for_line(r"boot failed: no DHCP lease for MAC [0-9a-f:]+ in .*dhcpd_leases")
    daemon.wait_for_line(
        r"the boot stopped in phase lease \(waiting for the guest's DHCP lease\) after 3\.\ds"
    )
    daemon.wait_for_line(r"VM stopped")
    assert "Traceback" not in daemon.text()
    assert "no DHCP lease" in builder.status()["last_error"]
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed")
    assert daemon.text().count("booting the VM") == 2, "the next connection retried"
    daemon.wait_for_line(r"VM stopped")
    assert builder.emulators() == []


def test_a_crash_after_boot_closes_connections_and_the_next_one_boots(make_builder) -> None:
    builder = make_builder()
    builder.env["VIRBY_EMULATOR_FAULT"] = "crash-after=3"
    daemon = builder.start()
    session = builder.ssh_background("echo", "up", "&&", "sleep", "600")
    try:
        session.wait_for_line(r"up", timeout=60)
        daemon.wait_for_line(r"the VM exited with status 1", timeout=30)
        assert session.wait_exit(30) != 0, "the session dies with the VM"
    finally:
        session.kill_all()
    result = builder.ssh("echo", "back")
    assert result.stdout == "back\n", result.stderr + daemon.text()
    assert daemon.text().count("booting the VM") == 2


def test_a_real_nix_remote_build_through_the_daemon(make_builder, tmp_path) -> None:
    if not shutil.which("nix-build"):
        pytest.skip("nix-build is not installed (Debian's nix-bin)")
    builder = make_builder()
    daemon = builder.start()
    expression = tmp_path / "hello.nix"
    expression.write_text(
        'derivation { name = "virby-remote-' + str(os.getpid()) + '"; system = '
        'builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" '
        '"echo built remotely > $out" ]; }'
    )
    client_store = tmp_path / "client-store"
    result = subprocess.run(
        ["nix-build", str(expression), "--no-out-link", "--store", str(client_store),
         "--max-jobs", "0", "--builders", f"ssh-ng://virby-vm {_nix_system(builder.env)}",
         "--option", "substituters", "", "--option", "builders-use-substitutes", "false"],
        capture_output=True, text=True, timeout=300,
        env={**builder.env, "NIX_SSHOPTS": f"-F {builder.ssh_config}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + daemon.text()
    out = result.stdout.strip().splitlines()[-1]
    assert out.startswith("/nix/store/")
    copied = client_store / out.lstrip("/")
    assert copied.read_text() == "built remotely\n", "the output came back to the local store"
    assert "VM ready at" in daemon.text()


def _nix_system(env: dict[str, str]) -> str:
    return subprocess.run(
        ["nix-instantiate", "--eval", "--expr", "builtins.currentSystem", "--json"],
        capture_output=True, text=True, check=True, timeout=60, env=env,
    ).stdout.strip().strip('"')  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"cores": "eight"}, "config key 'cores'"),
        ({"working-directory": "/nonexistent/virby"}, "working directory /nonexistent/virby"),
        ({"vfkit": "/nonexistent/vfkit"}, "vfkit: '/nonexistent/vfkit' was not found"),
    ],
)
def test_startup_problems_are_one_line_and_a_non_zero_exit(make_builder, change, words) -> None:
    builder = make_builder()
    builder.config.write_text(json.dumps({**builder.settings, **change}))
    daemon = builder.start(wait=False)
    assert daemon.wait_exit(60) != 0
    output = daemon.text()
    assert words in output, output
    assert "Traceback" not in output


def test_a_missing_config_file(make_builder, tmp_path) -> None:
    builder = make_builder()
    builder.config = tmp_path / "missing.json"
    daemon = builder.start(wait=False)
    assert daemon.wait_exit(60) == 1
    assert "cannot read" in daemon.text() and "Traceback" not in daemon.text()


def test_an_unreadable_lease_file_is_logged_and_the_daemon_keeps_serving(make_builder) -> None:
    builder = make_builder()
    builder.config.write_text(json.dumps({**builder.settings, "leases-file": str(builder.root)}))
    daemon = builder.start()
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed: cannot read the lease file")
    assert "Traceback" not in daemon.text()
    assert builder.status()["state"] in ("stopping", "stopped")


def test_a_vanished_working_directory_is_logged_and_the_daemon_keeps_serving(
    make_builder,
) -> None:
    builder = make_builder()
    daemon = builder.start()
    (builder.wd / "diff.img").unlink()
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed: .*diff\.img is missing: run `virby prepare")
    assert "Traceback" not in daemon.text()
    assert builder.status()["state"] == "stopped"


@pytest.fixture
def small_builder(tmp_path):
    """A Virby whose working directory is a small tmpfs, so that a test can fill it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    root = tmp_path / "small"
    (root / "wd").mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(root / "wd")], check=True
    )
    builder = None
    try:
        builder = Builder(root)
        yield builder
    finally:
        if builder is not None:
            builder.cleanup()
        subprocess.run(["umount", "-l", str(root / "wd")], check=False)


def fill(directory) -> str:
    """Fill the file system holding C{directory} to the last byte; the filler's path."""
    filler = os.path.join(directory, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_a_full_working_directory_fails_the_boot_and_leaks_no_vfkit(small_builder) -> None:
    """
    vfkit.pid cannot be written after vfkit was spawned: that vfkit is killed, so it holds
    no vm.lock, and the boot after some space was freed succeeds.
    """
    builder = small_builder
    daemon = builder.start()
    assert builder.ssh("true").returncode == 0, daemon.text()  # the VM's MAC is kept now
    stop = [tool("virby"), "stop", "--config", str(builder.config)]
    subprocess.run(stop, check=True, capture_output=True, timeout=60, env=builder.env)
    filler = fill(builder.wd)
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(
        r"boot failed: cannot record vfkit's pid: no space left on the device holding "
        + re.escape(str(builder.wd / "vfkit.pid"))
    )
    daemon.wait_for_line(r"vfkit \(pid \d+\) was killed by signal 9")
    assert builder.emulators() == [], "the vfkit spawned is gone"
    os.unlink(filler)
    result = builder.ssh("echo", "after the disk was freed")
    assert result.stdout == "after the disk was freed\n", result.stderr + daemon.text()
    assert "a process holds" not in daemon.text()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert_nothing_left(builder)
