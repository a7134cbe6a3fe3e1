"""The vfkit emulator as a real process: boot, ssh into the guest, and every way to stop."""

from __future__ import annotations

import getpass
import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.processes import ProcessUnderTest, pids_of, wait_gone
from virby.emulator.guardian import descendants
from virby.leases import LeaseFile

pytestmark = pytest.mark.e2e
MAC = "02:94:00:00:10:01"


@pytest.fixture
def machine(tmp_path: Path):
    """A working directory with keys, and a way to start the emulator on it."""
    keys = tmp_path / "vm_sshd_keys"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)],
            check=True,
        )
    (keys / "ssh_host_ed25519_key").write_bytes((tmp_path / "host").read_bytes())
    (keys / "ssh_user_ed25519_key.pub").write_bytes((tmp_path / "user.pub").read_bytes())
    host_public = (tmp_path / "host.pub").read_text().split()[:2]
    (tmp_path / "known_hosts").write_text("virby-vm-key " + " ".join(host_public) + "\n")
    with open(tmp_path / "diff.img", "wb") as f:
        f.truncate(4 * 1024 * 1024)
    started: list[ProcessUnderTest] = []

    def start(
        *extra: str, fault: str | None = None, console: str | None = None, stdin=subprocess.DEVNULL
    ) -> ProcessUnderTest:
        argv = [
            sys.executable, "-m", "virby.emulator",
            "--leases-file", str(tmp_path / "leases"), "--guest-port", "2222",
            "--boot-delay", "0.1", *(["--fault", fault] if fault else []),
            "--cpus", "1", "--memory", "1024",
            "--bootloader", f"efi,variable-store={tmp_path}/efistore.nvram,create",
            "--device", f"virtio-blk,path={tmp_path}/diff.img",
            "--device", f"virtio-fs,sharedDir={keys},mountTag=sshd-keys",
            "--device", f"virtio-net,nat,mac={MAC}",
            "--device", console or f"virtio-serial,logFilePath={tmp_path}/serial.log",
            "--device", "virtio-rng", "--device", "virtio-balloon",
            "--restful-uri", f"unix://{tmp_path}/vfkit.sock",
            "--pidfile", str(tmp_path / "vfkit.pid"), *extra,
        ]  # fmt: skip
        process = ProcessUnderTest(argv, stdin=stdin)
        started.append(process)
        return process

    yield tmp_path, start
    for process in started:
        process.kill_all()


def ssh(root: Path, ip: str, *command: str) -> ProcessUnderTest:
    return ProcessUnderTest(
        ["ssh", "-i", str(root / "user"), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={root / 'known_hosts'}",
         "-o", "HostKeyAlias=virby-vm-key", "-p", "2222", f"{getpass.getuser()}@{ip}",
         *command]
    )  # fmt: skip


def rest(root: Path, method: str, body: str | None = None) -> tuple[str, str]:
    result = subprocess.run(
        ["curl", "-s", "--unix-socket", str(root / "vfkit.sock"), "-X", method,
         *(["-d", body] if body else []), "-w", "\n%{http_code}", "http://vfkit/vm/state"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    text, _, code = result.stdout.rpartition("\n")
    return code, text


def guest_processes(emulator: ProcessUnderTest) -> list[int]:
    """The guest: the emulator's guardian and everything below it (sshd, sessions)."""
    guardians = [pid for pid in pids_of(r"virby\.emulator\.guardian") if
                 f" {emulator.pid} " in _cmdline(pid)]  # fmt: skip
    return guardians + [pid for g in guardians for pid in descendants(g)]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return " " + f.read().replace(b"\0", b" ").decode(errors="replace")


def boot(start, *extra: str) -> tuple[ProcessUnderTest, str]:
    emulator = start(*extra)
    emulator.wait_for_line(r"virtual machine is running", timeout=30)
    root = Path(emulator.argv[emulator.argv.index("--leases-file") + 1]).parent
    ip = _wait_for_console(root / "serial.log", r"sshd listening on (127\.0\.\d+\.\d+):2222")
    return emulator, ip


def _wait_for_console(path: Path, pattern: str, timeout: float = 30) -> str:
    """The console is a file: follow it, as `tail -f` would, until the line comes."""
    follower = ProcessUnderTest(["tail", "-n", "+1", "-F", str(path)])
    try:
        return follower.wait_for_line(pattern, timeout=timeout).group(1).decode()
    finally:
        follower.kill_all()


@pytest.fixture(autouse=True)
def _needs_curl() -> None:
    if subprocess.run(["which", "curl"], capture_output=True).returncode != 0:
        pytest.skip("curl is not installed")


def test_boot_ssh_lease_and_api(machine) -> None:
    root, start = machine
    emulator, ip = boot(start)
    assert LeaseFile(str(root / "leases")).lookup(MAC) == ip
    assert (root / "vfkit.pid").read_text() == str(emulator.pid)
    session = ssh(root, ip, "echo", "hi")
    assert session.wait_exit(30) == 0 and session.text() == "hi\n"
    code, text = rest(root, "GET")
    assert code == "200" and json.loads(text)["state"] == "VirtualMachineStateRunning"
    code, text = rest(root, "POST", '{"state":"Bogus"}')
    assert code == "500" and "invalid new VMState: Bogus" in text


@pytest.mark.parametrize("how", ["Stop", "HardStop", "SIGTERM", "SIGKILL"])
def test_every_stop_leaves_nothing_behind(machine, how) -> None:
    root, start = machine
    emulator, ip = boot(start)
    session = ssh(root, ip, "echo", "in", "&&", "sleep", "600")
    session.wait_for_line(r"in", timeout=30)
    guest = guest_processes(emulator)
    assert len(guest) >= 3, "guardian, sshd and the session"
    if how in ("Stop", "HardStop"):
        rest(root, "POST", json.dumps({"state": how}))
    else:
        emulator.signal(getattr(signal, how))
    code = emulator.wait_exit(30)
    assert code == (-9 if how == "SIGKILL" else 0)
    session.wait_exit(30)
    session.kill_all()
    assert wait_gone(guest) == [], "a guest process outlived its VM"
    if how != "SIGKILL":
        assert not (root / "vfkit.sock").exists()


def test_crash_after_boot(machine) -> None:
    root, start = machine
    emulator = start(fault="crash-after=0.5")
    _wait_for_console(root / "serial.log", r"(sshd listening)")
    assert emulator.wait_exit(30) == 1
    assert "virtualization error" in emulator.text()


@pytest.mark.parametrize("fault", ["no-lease", "duid-lease"])
def test_lease_faults(machine, fault) -> None:
    root, start = machine
    emulator = start(fault=fault)
    _wait_for_console(root / "serial.log", r"(sshd listening)")
    assert LeaseFile(str(root / "leases")).lookup(MAC) is None
    if fault == "duid-lease":
        assert "hw_address=ff," in (root / "leases").read_text()
    rest(root, "POST", '{"state":"HardStop"}')
    assert emulator.wait_exit(30) == 0


@pytest.mark.parametrize(
    "extra", [["--device", "virtio-net,mac=02:00:00:00:00:02"], ["--device", "virtio-sound"],
              ["--restful-uri", "unix:///" + "x" * 120]],
)  # fmt: skip
def test_refused_command_lines_exit_1(machine, extra) -> None:
    root, start = machine
    emulator = start(*extra)
    assert emulator.wait_exit(30) == 1
    assert re.search(r"(?m)^Error: ", emulator.text()), emulator.text()
    assert "Traceback" not in emulator.text()
    assert os.path.exists(root / "diff.img")


def test_an_old_style_stdio_console_is_refused_without_a_terminal(machine) -> None:
    """The daemon's old command line: vfkit's setRawMode fails on a piped stdin."""
    _root, start = machine
    for stdin in (subprocess.DEVNULL, subprocess.PIPE):
        emulator = start(console="virtio-serial,stdio", stdin=stdin)
        assert emulator.wait_exit(30) == 1
        text = emulator.text()
        assert "Error: inappropriate ioctl for device\n" in text, text
        assert text.endswith("\ninappropriate ioctl for device\n")
        assert "virtual machine is running" not in text


def test_a_stdio_console_on_a_terminal_boots(machine) -> None:
    _root, start = machine
    controller, terminal = pty.openpty()
    try:
        emulator = start(console="virtio-serial,stdio", stdin=terminal)
        emulator.wait_for_line(r"sshd listening on 127\.0\.\d+\.\d+:2222", timeout=30)
    finally:
        os.close(terminal)
        os.close(controller)
    emulator.signal(signal.SIGTERM)
    assert emulator.wait_exit(30) == 0


def test_the_console_file_is_truncated_at_each_start(machine) -> None:
    root, start = machine
    (root / "serial.log").write_text("the last boot's console\n" * 1000)
    emulator, _ip = boot(start)
    assert "the last boot" not in (root / "serial.log").read_text()
    emulator.signal(signal.SIGTERM)
    assert emulator.wait_exit(30) == 0
    assert "powered off" in (root / "serial.log").read_text()


def test_a_share_tag_of_36_bytes_or_more_is_refused(machine) -> None:
    """Virtualization.framework's tags are fewer than 36 bytes of UTF-8 (docs/vfkit.md)."""
    root, start = machine
    refused = start("--device", f"virtio-fs,sharedDir={root},mountTag={'t' * 36}")
    assert refused.wait_exit(30) == 1
    assert "Error: Error Domain=VZErrorDomain Code=2" in refused.text()
    emulator, _ip = boot(start, "--device", f"virtio-fs,sharedDir={root},mountTag={'t' * 35}")
    emulator.signal(signal.SIGTERM)
    assert emulator.wait_exit(30) == 0


def test_an_m1_without_rosetta_refuses_nested_and_rosetta(machine) -> None:
    _root, start = machine
    nested = start("--nested", "--cpu", "Apple M1")
    assert nested.wait_exit(30) == 1
    assert "Error: nested virtualization is not supported" in nested.text()
    rosetta = start("--device", "rosetta,mountTag=rosetta", "--rosetta", "missing")
    assert rosetta.wait_exit(30) == 1
    assert "Error: rosetta is not installed" in rosetta.text()
    emulator, _ip = boot(start, "--nested", "--device", "rosetta,mountTag=rosetta")
    emulator.signal(signal.SIGTERM)
    assert emulator.wait_exit(30) == 0
