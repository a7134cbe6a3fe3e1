"""
What a real Mac does that Linux would hide, end to end: the console in serial.log, a Mac
that cannot nest, a Mac without Rosetta, new keys on an old disk, and a person who is not
root asking for the status.  The daemon and the emulator play the same Mac
(C{VIRBY_EMULATOR_CPU}, C{..._MACOS}, C{..._ROSETTA}).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from testbed.builder import Builder, tool
from virby.emulator import guest

pytestmark = pytest.mark.e2e

M1_WITHOUT_ROSETTA = {"VIRBY_EMULATOR_CPU": "Apple M1", "VIRBY_EMULATOR_ROSETTA": "missing"}
INSTALL_ROSETTA = "softwareupdate --install-rosetta --agree-to-license"


def test_a_failed_boot_is_logged_with_the_console_tail_from_serial_log(make_builder) -> None:
    builder = make_builder(**{"start-timeout": 3})
    builder.env["VIRBY_EMULATOR_FAULT"] = "no-sshd"
    daemon = builder.start()
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed: ")
    daemon.wait_for_line(r"last console lines:")
    daemon.wait_for_line(r"EFI stub: Booting Linux Kernel")
    daemon.wait_for_line(r"sshd\.service: Failed with result 'exit-code'")
    daemon.wait_for_line(r"VM stopped")
    assert "--device virtio-serial,logFilePath=" in daemon.text()
    assert not (builder.wd / "serial.log").exists(), "without debug the console goes with the VM"


def test_with_debug_serial_log_stays_after_the_vm_stops(make_builder) -> None:
    builder = make_builder(debug=True, ttl=1)
    daemon = builder.start()
    assert builder.ssh("true").returncode == 0
    daemon.wait_for_line(r"VM stopped", timeout=60)
    console = (builder.wd / "serial.log").read_text()
    assert "sshd listening on" in console and "powered off" in console


def test_a_crash_is_logged_with_the_console_tail(make_builder) -> None:
    builder = make_builder()
    builder.env["VIRBY_EMULATOR_FAULT"] = "crash-after=1"
    daemon = builder.start()
    client = socket.create_connection(("127.0.0.1", builder.port), timeout=60)  # boots it
    try:
        daemon.wait_for_line(r"the VM exited with status 1", timeout=60)
        daemon.wait_for_line(r"last console lines:")
        daemon.wait_for_line(r"virby-vm login:")
    finally:
        client.close()


def test_a_mac_that_cannot_nest_boots_without_nested_and_says_why(make_builder) -> None:
    builder = make_builder(**{"nested-virtualization": True})
    builder.env.update(VIRBY_EMULATOR_CPU="Apple M1 Pro")
    daemon = builder.start()
    warning = (
        "nested-virtualization is on, but this Mac cannot run it: it needs Apple M3 or later, "
        "and this Mac has Apple M1 Pro; booting the VM without --nested"
    )
    assert warning in daemon.text()
    result = builder.ssh("echo", "booted")
    assert result.stdout == "booted\n", result.stderr + daemon.text()
    (command,) = [line for line in daemon.text().splitlines()
                  if f"starting {builder.settings['vfkit']} " in line]  # fmt: skip
    assert "--device virtio-serial,logFilePath=" in command and " --nested" not in command
    assert builder.status()["warnings"] == [warning]
    assert daemon.text().count(warning) == 1


def test_a_mac_that_can_nest_gets_nested(make_builder) -> None:
    builder = make_builder(**{"nested-virtualization": True})
    builder.env.update(VIRBY_EMULATOR_CPU="Apple M4", VIRBY_EMULATOR_MACOS="15.2")
    daemon = builder.start()
    assert builder.ssh("true").returncode == 0, daemon.text()
    (command,) = [line for line in daemon.text().splitlines()
                  if f"starting {builder.settings['vfkit']} " in line]  # fmt: skip
    assert command.endswith(" --nested") and builder.status()["warnings"] == []


@pytest.mark.parametrize("on_demand", [True, False])
def test_missing_rosetta_is_one_line_with_the_fix_and_no_boot(make_builder, on_demand) -> None:
    builder = make_builder(rosetta=True, **{"on-demand": on_demand})
    builder.env.update(M1_WITHOUT_ROSETTA)
    daemon = builder.start()
    refusal = (
        f"rosetta is on, but Rosetta is not installed on this Mac: run `{INSTALL_ROSETTA}`, "
        "then restart virbyd; until then no VM boots"
    )
    assert refusal in daemon.text()
    result = builder.ssh("true", timeout=60)
    assert result.returncode != 0
    daemon.wait_for_line(r"boot failed: rosetta is on, but Rosetta is not installed")
    status = builder.status()
    assert status["warnings"] == [refusal] and refusal in status["last_error"]
    assert builder.emulators() == [], "no vfkit at all"
    assert f"starting {builder.settings['vfkit']}" not in daemon.text()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert "Traceback" not in daemon.text()


@pytest.mark.parametrize(
    ("rule", "works"),
    [("every-boot", True), ("when-absent", False)],
    ids=["the image's key unit", "the old unit that ran only once"],
)
def test_new_keys_with_the_same_disk(make_builder, rule, works) -> None:
    """`virby prepare` makes new keys and keeps diff.img: the next boot must take them."""
    builder = make_builder()
    builder.env["VIRBY_EMULATOR_GUEST_KEYS"] = rule
    daemon = builder.start()
    assert builder.ssh("true").returncode == 0, daemon.text()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    disk = builder.wd / "diff.img"
    before = (disk.stat().st_ino, guest.readState(str(disk)))
    old_host_key = (builder.wd / "ssh_host_ed25519_key.pub").read_text()
    assert before[1].boots == 1 and before[1].host_key is not None

    (builder.wd / "ssh_user_ed25519_key").unlink()  # lost: prepare makes a whole new set
    assert "made new SSH keys" in builder.prepare()
    assert (builder.wd / "ssh_host_ed25519_key.pub").read_text() != old_host_key
    assert (disk.stat().st_ino, guest.readState(str(disk))) == before, "the disk was kept"

    again = builder.start()
    result = builder.ssh("echo", "new keys")
    if works:
        assert result.stdout == "new keys\n", result.stderr + again.text()
        state = guest.readState(str(disk))
        assert state.boots == 2 and state.host_key != before[1].host_key
    else:
        assert result.returncode != 0
        assert "Host key verification failed" in result.stderr


@pytest.fixture
def reachable_root():
    """A directory every user may enter (the tests' own temporary directory is root's)."""
    root = Path(tempfile.mkdtemp(prefix="virby-status-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the unprivileged user `nobody`, for real."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.fail("this test runs a command as another user: run it as root with setpriv")
    return subprocess.run(
        [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip


@pytest.mark.parametrize("allow_user_ssh", [False, True], ids=["wd 0700", "wd 0711"])
def test_status_as_a_normal_user_says_it_needs_root(reachable_root, allow_user_ssh) -> None:
    builder = Builder(reachable_root, **{"allow-user-ssh": allow_user_ssh})
    try:
        builder.config.chmod(0o644)
        daemon = builder.start()
        command = [tool("virby"), "status", "--config", str(builder.config)]
        text = as_nobody(*command)
        assert text.returncode == 1, text
        assert text.stderr == (
            f"virby status: error: only root may ask the daemon (its control socket "
            f"{builder.wd}/control.sock is owner-only): run `sudo virby status`\n"
        )
        assert text.stdout == ""
        document = as_nobody(*command, "--json")
        assert document.returncode == 1, document
        parsed = json.loads(document.stdout)
        assert parsed["state"] == "unknown" and "sudo virby status" in parsed["reason"]
        assert builder.status()["state"] == "stopped", "root still gets the whole status"
        assert "Traceback" not in text.stderr + document.stderr + daemon.text()
    finally:
        builder.cleanup()
