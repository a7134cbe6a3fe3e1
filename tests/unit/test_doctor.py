"""
``virby doctor`` on a real prepared working directory and a played Mac: a healthy machine,
and one broken in each way a check looks for.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.played_user import PLAYED, PlayedUser
from virby import keys
from virby.cli import doctor, prepare
from virby.cli.client import DaemonDown, NotAllowed
from virby.cli.doctor import NIX_CONFIG_SHOW, SSH_AS_NIX, Doctor, Status
from virby.config import MIB, Config, fromMapping
from virby.hostfacts import (
    ARM64,
    CPU_BRAND,
    LAUNCHCTL,
    LSOF,
    MACOS_VERSION,
    NIX_MACHINES,
    PS,
    ROSETTA_RUNTIME,
    SOCKETFILTERFW,
    SSH,
    HostCommandError,
    PlayedMac,
    parseLaunchctl,
    parseLsof,
)
from virby.layout import (
    CLIENT_KEY,
    CONTROL_SOCKET,
    KNOWN_HOSTS,
    NO_IMAGE_FIX,
    PREVIOUS_CLIENT_KEY,
    PREVIOUS_SHARED_CLIENT_KEY,
)
from virby.shares import Account
from virby.vfkitflags import VFKIT_SINCE, parseVfkitVersion, vfkitNeeds
from virby.wire import LAUNCHD_LABEL

ROOT = Path(__file__).resolve().parents[2]
MAC = "02:94:00:00:00:07"
NOW = 1_800_000_000.0
DAEMON_PID = 4242
DISK = 64 * MIB

RUNNING_JOB = f"""system/{LAUNCHD_LABEL} = {{
\tactive count = 1
\tpath = /Library/LaunchDaemons/{LAUNCHD_LABEL}.plist
\ttype = LaunchDaemon
\tstate = running

\tprogram = /bin/sh
\tsockets = {{
\t\t"Listener" = {{
\t\t\ttype = stream
\t\t\tstate = active
\t\t}}
\t}}
\tpid = {DAEMON_PID}
\tlast exit code = (never exited)
}}
"""


#: What nix-darwin writes into /etc/nix/machines for the default config (nix/module.nix).
MACHINE_LINE = "ssh-ng://virby-vm aarch64-linux - 8 1 benchmark,big-parallel - -\n"
NIX_SETTINGS = (
    "allow-dirty = true\nbuilders = @/etc/nix/machines\nbuilders-use-substitutes = true\n"
    "trusted-users = root\n"
)


def sshG(config: Config, **changed: str) -> str:
    """What C{ssh -G virby-vm} prints with the module's block installed (a few lines)."""
    lines = {
        "user": "builder",
        "hostname": "127.0.0.1",
        "port": str(config.builderPort),
        "hostkeyalias": "virby-vm-key",
        "identityfile": config.path(CLIENT_KEY),
        "userknownhostsfile": config.path(KNOWN_HOSTS),
        "stricthostkeychecking": "true",
        **changed,
    }
    return "".join(f"{key} {value}\n" for key, value in lines.items())


class ScriptedMac:
    """A Mac whose every answer the test sets; it records what was asked."""

    def __init__(self, vfkit: str) -> None:
        self.answers: dict[tuple[str, ...], str | HostCommandError] = {
            CPU_BRAND: "Apple M4 Pro\n",
            ARM64: "1\n",
            MACOS_VERSION: "15.5\n",
            (LAUNCHCTL, "print", f"system/{LAUNCHD_LABEL}"): RUNNING_JOB,
            (SOCKETFILTERFW, "--getglobalstate"): "Firewall is disabled. (State = 0)\n",
            (SOCKETFILTERFW, "--getblockall"): "Firewall has block all state set to disabled.\n",
            (vfkit, "--version"): "vfkit version: v0.6.3\n",
            SSH_AS_NIX: "nix-daemon (Nix) 2.28.3\n",
            NIX_CONFIG_SHOW[0]: NIX_SETTINGS,
        }
        #: The Mac's own files, as the runner reads them.
        self.texts = {NIX_MACHINES: MACHINE_LINE}
        self.lsof = f"p1\nclaunchd\np{DAEMON_PID}\ncvirbyd\n"
        self.files = {ROSETTA_RUNTIME}
        #: The host's users: none by default, so no test depends on the users of the host
        #: that runs it (a Mac where Virby was installed before has a _virby).
        self.users: dict[str, int] = {}
        self.asked: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], timeout: float | None = None) -> str:
        self.asked.append(tuple(argv))
        if argv[0] == LSOF:
            if not self.lsof:
                raise HostCommandError("exit status 1", 1)
            return self.lsof
        answer = self.answers.get(tuple(argv), HostCommandError("not found"))
        if isinstance(answer, HostCommandError):
            raise answer
        return answer

    def exists(self, path: str) -> bool:
        return path in self.files

    def readText(self, path: str) -> str:
        if path not in self.texts:
            raise FileNotFoundError(2, "No such file or directory", path)
        return self.texts[path]

    def userId(self, name: str) -> int | None:
        return self.users.get(name)


@pytest.fixture
def machine(short_tmp: Path) -> dict[str, Any]:
    """A prepared working directory, a booted VM's MAC and lease, and a vfkit."""
    image = short_tmp / "store-image.img"
    with open(image, "wb") as f:
        f.truncate(2 * MIB)
        f.write(b"image")
    vfkit = short_tmp / "vfkit"
    vfkit.write_text("#!/bin/sh\n")
    vfkit.chmod(0o755)
    config = fromMapping(
        {"working-directory": str(short_tmp / "wd"), "image": str(image), "vfkit": str(vfkit),
         "leases-file": str(short_tmp / "dhcpd_leases"), "disk-size": "1GiB"}
    )  # fmt: skip
    prepare.prepare(config)
    (short_tmp / "wd" / "mac").write_text(MAC + "\n")
    write_leases(short_tmp / "dhcpd_leases", [("192.168.64.7", MAC, NOW + 80000, "virby-vm")])
    mac = ScriptedMac(str(vfkit))
    mac.answers[(SSH, "-G", "virby-vm")] = sshG(config)
    return {"config": config, "mac": mac, "root": short_tmp}


def write_leases(path: Path, leases: list[tuple[str, str | None, float, str]]) -> None:
    blocks = []
    for ip, mac, expiry, name in leases:
        hw = f"1,{mac}" if mac else "ff,f1:2:3:4"
        blocks.append(
            f"{{\n\tname={name}\n\tip_address={ip}\n\thw_address={hw}\n"
            f"\tidentifier={hw}\n\tlease={hex(int(expiry))}\n}}\n"
        )
    path.write_text("".join(blocks))


RUNNING_STATUS = {
    "state": "running",
    "daemon_pid": DAEMON_PID,
    "vm_ip": "192.168.64.7",
    "last_error": None,
    "warnings": [],
}


class Volume:
    def __init__(self, free: int) -> None:
        self.f_bavail, self.f_frsize = free // 4096, 4096


def examine(
    machine: dict[str, Any],
    config: Config | None = None,
    *,
    status: dict[str, Any] | Exception | None = None,
    free: int = 500 * 1024 * MIB,
    **kwargs: Any,
) -> dict[str, Any]:
    answer = RUNNING_STATUS if status is None else status

    def ask(path: str) -> dict[str, Any]:
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    findings = Doctor(
        config or machine["config"],
        machine["mac"],
        configFile="/etc/virby.json",
        euid=kwargs.pop("euid", 0),
        user=kwargs.pop("user", "root"),
        now=lambda: NOW,
        statvfs=lambda path: Volume(free),  # type: ignore[arg-type,return-value]
        ask=ask,
        **kwargs,
    ).run()
    return {finding.check: finding for finding in findings}


def failed(found: dict[str, Any]) -> dict[str, Any]:
    return {name: f for name, f in found.items() if f.status is Status.FAIL}


# -- a healthy machine


def test_a_healthy_machine_passes_every_check(machine) -> None:
    found = examine(machine)
    assert list(found) == [
        "config", "launchd", "daemon", "port", "working-dir", "files", "keys", "image", "vfkit",
        "nix-settings", "machines", "ssh-config", "ssh", "dhcp-lease", "lease-pool", "disk-space",
    ]  # fmt: skip
    assert {name: f.status for name, f in found.items()} == {
        **{name: Status.OK for name in found},
        "ssh": Status.SKIP,
    }, "\n".join(f.line() for f in found.values())
    assert found["launchd"].detail == f"{LAUNCHD_LABEL} is running (pid {DAEMON_PID})"
    assert "launchd (pid 1), virbyd (pid 4242)" in found["port"].detail
    assert "vfkit v0.6.3" in found["vfkit"].detail and "need v0.6.1" in found["vfkit"].detail
    assert "bootpd gave 02:94:00:00:00:07 192.168.64.7" in found["dhcp-lease"].detail
    assert found["config"].detail == "read /etc/virby.json"
    assert found["machines"].detail == (
        "/etc/nix/machines lists ssh-ng://virby-vm for aarch64-linux with benchmark,big-parallel"
    )
    assert "builders = @/etc/nix/machines" in found["nix-settings"].detail
    assert "127.0.0.1:31222" in found["ssh-config"].detail


def test_rosetta_nested_and_ssh_are_checked_when_asked(machine) -> None:
    config = dataclasses.replace(machine["config"], rosetta=True, nested_virtualization=True)
    machine["mac"].texts[NIX_MACHINES] = (
        "ssh-ng://virby-vm aarch64-linux,x86_64-linux - 8 1 "
        "benchmark,big-parallel,kvm,nixos-test - -\n"
    )
    found = examine(machine, config, ssh=True)
    assert found["rosetta"].status is Status.OK and found["nested"].status is Status.OK
    assert found["machines"].status is Status.OK, found["machines"].line()
    assert found["ssh"].status is Status.OK
    assert found["ssh"].detail.startswith("ssh virby-vm nix-daemon --version answered")
    assert "(nix-daemon (Nix) 2.28.3)" in found["ssh"].detail
    assert "need v0.6.2" in found["vfkit"].detail, "--nested came with v0.6.2"


def test_the_command_prints_one_line_a_check_and_exits_0(machine, monkeypatch) -> None:
    monkeypatch.setattr(doctor, "query", lambda path: dict(RUNNING_STATUS))
    monkeypatch.setattr(doctor, "defaultRunner", lambda: machine["mac"])
    monkeypatch.setattr(doctor.Doctor, "_bootStarted", lambda self: None)
    out = io.StringIO()
    code = doctor.run(machine["config"], asJson=False, configFile="/c.json", out=out, euid=0)
    assert code == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert len(lines) == 17 and lines[-1] == "no check failed"
    assert lines[0].split() == ["ok", "config", "read", "/c.json"]
    assert all(re.match(r"^(ok|skip)  +[a-z-]+  +\S", line) for line in lines[:-1]), lines


# -- one failure at a time


def test_a_job_that_is_not_loaded(machine) -> None:
    machine["mac"].answers[(LAUNCHCTL, "print", f"system/{LAUNCHD_LABEL}")] = HostCommandError(
        f'Could not find service "{LAUNCHD_LABEL}" in domain for system', 113
    )
    finding = failed(examine(machine))["launchd"]
    assert finding.detail == f"{LAUNCHD_LABEL} is not loaded"
    assert finding.fix is not None and "launchctl bootstrap system" in finding.fix


def test_an_always_on_job_that_is_not_running(machine) -> None:
    machine["mac"].answers[(LAUNCHCTL, "print", f"system/{LAUNCHD_LABEL}")] = (
        f"system/{LAUNCHD_LABEL} = {{\n\tstate = not running\n\tlast exit code = 1\n}}\n"
    )
    finding = failed(examine(machine, status=DaemonDown("the daemon is not running")))["launchd"]
    assert finding.detail == f"{LAUNCHD_LABEL} is loaded but not running, last exit code 1"
    assert finding.fix is not None and "kickstart -k system/org.nixos.virbyd" in finding.fix


def test_an_on_demand_job_waiting_for_its_socket_is_fine(machine) -> None:
    machine["mac"].answers[(LAUNCHCTL, "print", f"system/{LAUNCHD_LABEL}")] = (
        f"system/{LAUNCHD_LABEL} = {{\n\tstate = waiting\n}}\n"
    )
    machine["mac"].lsof = "p1\nclaunchd\n"
    config = dataclasses.replace(machine["config"], on_demand=True)
    found = examine(machine, config, status=DaemonDown("the daemon is not running"))
    assert failed(found) == {}
    assert "waits for the first build" in found["launchd"].detail


def test_the_port_held_by_another_program(machine) -> None:
    machine["mac"].lsof = "p1\nclaunchd\np999\ncssh\n"
    finding = failed(examine(machine))["port"]
    assert finding.detail == "127.0.0.1:31222 is held by ssh (pid 999), not by the daemon"
    assert finding.fix is not None and "services.virby.port" in finding.fix


def test_the_port_checked_is_the_one_listen_names(machine) -> None:
    config = dataclasses.replace(machine["config"], listen="tcp:31333:interface=127.0.0.1")
    machine["mac"].lsof = ""
    detail = failed(examine(machine, config))["port"].detail
    assert detail == "nothing listens on 127.0.0.1:31333"


def test_nothing_listening_on_the_port(machine) -> None:
    machine["mac"].lsof = ""
    assert failed(examine(machine))["port"].detail == "nothing listens on 127.0.0.1:31222"


def test_a_working_directory_with_the_wrong_mode(machine) -> None:
    os.chmod(machine["config"].working_directory, 0o755)
    finding = failed(examine(machine))["working-dir"]
    assert "its mode is 0755, not 0700" in finding.detail
    assert finding.fix is not None and "virby prepare --config /etc/virby.json" in finding.fix


def test_files_with_drifted_modes_and_a_missing_known_hosts(machine) -> None:
    wd = Path(machine["config"].working_directory)
    os.chmod(wd / "ssh_user_ed25519_key", 0o644)
    (wd / "ssh_known_hosts").unlink()
    found = failed(examine(machine))
    assert found["files"].detail == (
        "ssh_user_ed25519_key is 0644, not 0600; ssh_known_hosts is missing"
    )
    assert found["keys"].detail == "ssh_known_hosts is missing"


def test_without_a_daemon_the_owner_is_the_hosts_daemon_user(machine) -> None:
    """No control socket: the working directory must be the module's user's, when it exists."""
    me = os.geteuid()
    machine["mac"].users["_virby"] = me
    assert "working-dir" not in failed(examine(machine))
    machine["mac"].users["_virby"] = me + 1
    found = failed(examine(machine))
    assert "not the daemon's user" in found["working-dir"].detail


def test_files_owned_by_someone_else(machine) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    wd = Path(machine["config"].working_directory)
    os.chown(wd / "base.img", 65534, 65534)
    assert "base.img is " in failed(examine(machine))["files"].detail


def test_a_client_key_the_guest_does_not_authorize(machine) -> None:
    wd = Path(machine["config"].working_directory)
    other = keys.generate("someone-else")
    (wd / "vm_sshd_keys/ssh_user_ed25519_key.pub").write_text(other.public + "\n")
    finding = failed(examine(machine))["keys"]
    assert finding.detail == (
        "the client key ssh_user_ed25519_key does not match the key the guest authorizes "
        "(vm_sshd_keys/ssh_user_ed25519_key.pub)"
    )


def test_a_known_hosts_that_pins_another_key(machine) -> None:
    wd = Path(machine["config"].working_directory)
    other = keys.generate("impostor")
    (wd / "ssh_known_hosts").write_text(keys.knownHostsLine(other.public))
    assert (
        failed(examine(machine))["keys"].detail == "ssh_known_hosts does not pin the VM's host key"
    )


def test_disks_made_from_another_image(machine) -> None:
    wd = Path(machine["config"].working_directory)
    (wd / "image-path").write_text("/nix/store/old-image/nixos.img\n")
    finding = failed(examine(machine))["image"]
    assert finding.detail == (
        "the disks were made from /nix/store/old-image/nixos.img, but the config names "
        f"{machine['config'].image}"
    )


def test_an_image_that_is_gone(machine) -> None:
    os.unlink(machine["config"].image)
    finding = failed(examine(machine))["image"]
    image = machine["config"].image
    assert finding.detail == (
        f"no image yet: {image} does not exist; the VM boots {image} until then"
    )
    assert finding.fix == NO_IMAGE_FIX


def test_no_image_yet_says_why_the_build_failed(machine) -> None:
    wd = Path(machine["config"].working_directory)
    os.unlink(machine["config"].image)
    (wd / "image-path").unlink()
    (wd / "image-failure").write_text("no builder for aarch64-linux\n")
    finding = failed(examine(machine))["image"]
    assert finding.detail == (
        f"no image yet: {machine['config'].image} does not exist (no builder for aarch64-linux)"
    )


def test_a_vfkit_too_old_for_the_flags(machine) -> None:
    machine["mac"].answers[(machine["config"].vfkit, "--version")] = "vfkit version: v0.5.1\n"
    config = dataclasses.replace(machine["config"], nested_virtualization=True)
    finding = failed(examine(machine, config))["vfkit"]
    assert finding.detail == (
        f"vfkit v0.5.1 at {config.vfkit} lacks virtio-balloon (since v0.6.1), "
        "--nested (since v0.6.2)"
    )
    assert finding.fix == "install vfkit v0.6.2 or later (nixpkgs#vfkit)"


def test_a_vfkit_that_cannot_say_its_version_is_a_warning(machine) -> None:
    machine["mac"].answers[(machine["config"].vfkit, "--version")] = "vfkit version: unknown\n"
    found = examine(machine)
    assert found["vfkit"].status is Status.WARN and "cannot tell" in found["vfkit"].detail


def test_no_vfkit(machine) -> None:
    config = dataclasses.replace(machine["config"], vfkit="/nonexistent/vfkit")
    assert "was not found" in failed(examine(machine, config))["vfkit"].detail


def test_rosetta_on_without_rosetta(machine) -> None:
    machine["mac"].files = set()
    config = dataclasses.replace(machine["config"], rosetta=True)
    finding = failed(examine(machine, config))["rosetta"]
    assert finding.detail.startswith("Rosetta is not installed on this Mac")
    assert finding.fix == "run `softwareupdate --install-rosetta --agree-to-license`"


def test_nested_on_an_m1(machine) -> None:
    machine["mac"].answers[CPU_BRAND] = "Apple M1\n"
    config = dataclasses.replace(machine["config"], nested_virtualization=True)
    finding = failed(examine(machine, config))["nested"]
    assert "it needs Apple M3 or later, and this Mac has Apple M1" in finding.detail
    assert finding.fix == "turn services.virby.nestedVirtualization off"


def booting_for(machine, seconds: float) -> None:
    """A VM started C{seconds} ago, whose lease file was written before it started."""
    wd = Path(machine["config"].working_directory)
    (wd / "vfkit.pid").write_text("777")
    os.utime(wd / "vfkit.pid", (NOW - seconds, NOW - seconds))
    leases = Path(machine["config"].leases_file)
    os.utime(leases, (NOW - seconds - 600, NOW - seconds - 600))


def test_a_boot_that_got_no_lease_points_at_the_firewall(machine) -> None:
    booting_for(machine, 120)
    machine["mac"].answers[(SOCKETFILTERFW, "--getglobalstate")] = (
        "Firewall is enabled. (State = 1)\n"
    )
    machine["mac"].answers[(SOCKETFILTERFW, "--getblockall")] = (
        "Firewall has block all state set to enabled.\n"
    )
    finding = failed(examine(machine, status={**RUNNING_STATUS, "state": "booting"}))["dhcp-lease"]
    assert finding.detail == (
        f"no lease for {MAC} since the VM started 120s ago: bootpd did not answer"
    )
    assert finding.fix is not None
    assert finding.fix.startswith("the firewall is on and blocks all incoming connections")
    assert "--add /usr/libexec/bootpd --unblockapp /usr/libexec/bootpd" in finding.fix
    assert "--setblockall off" in finding.fix


def test_a_boot_still_waiting_for_its_lease_is_not_a_failure(machine) -> None:
    booting_for(machine, 5)
    assert examine(machine)["dhcp-lease"].status is Status.OK


def test_the_daemons_last_error_about_leases_points_at_the_firewall(machine) -> None:
    error = "boot failed: no DHCP lease for MAC 02:94:00:00:00:07 in /var/db/dhcpd_leases"
    write_leases(Path(machine["config"].leases_file), [])
    found = examine(machine, status={**RUNNING_STATUS, "state": "stopped", "last_error": error})
    assert found["daemon"].status is Status.WARN
    finding = failed(found)["dhcp-lease"]
    assert finding.fix is not None and finding.fix.startswith("the firewall is off")


def test_a_lease_keyed_by_a_duid(machine) -> None:
    write_leases(Path(machine["config"].leases_file), [("192.168.64.7", None, NOW + 9, "virby-vm")])
    finding = failed(examine(machine, status={**RUNNING_STATUS, "state": "stopped"}))["dhcp-lease"]
    assert "DUID" in finding.detail


def test_a_lease_file_that_is_a_directory(machine) -> None:
    leases = Path(machine["config"].leases_file)
    leases.unlink()
    leases.mkdir()
    finding = failed(examine(machine))["dhcp-lease"]
    assert finding.detail.startswith(f"cannot read {leases}")


def test_a_lease_file_that_is_a_link_is_not_followed(machine) -> None:
    """As the daemon reads it: a symbolic link in the lease file's place is refused."""
    leases = Path(machine["config"].leases_file)
    real = leases.with_name("elsewhere")
    leases.rename(real)
    leases.symlink_to(real)
    finding = failed(examine(machine))["dhcp-lease"]
    assert finding.detail.startswith(f"cannot read {leases}: Too many levels of symbolic links")


def test_a_crowded_lease_pool(machine) -> None:
    crowd: list[tuple[str, str | None, float, str]] = [
        (f"192.168.64.{n}", f"02:00:00:00:00:{n:02x}", NOW + 3600, "vm") for n in range(2, 203)
    ]
    old: list[tuple[str, str | None, float, str]] = [
        (f"192.168.65.{n}", f"02:00:00:00:01:{n:02x}", NOW + 3600, "vm") for n in range(2, 250)
    ]
    write_leases(Path(machine["config"].leases_file), crowd + old)
    finding = failed(examine(machine))["lease-pool"]
    assert finding.detail.startswith("201 unexpired leases in 192.168.64.0/24 (449 entries)")
    assert "may run out" in finding.detail


def test_expired_leases_do_not_crowd_the_pool(machine) -> None:
    stale = [(f"192.168.64.{n}", f"02:00:00:00:00:{n:02x}", NOW - 60, "vm") for n in range(2, 250)]
    write_leases(
        Path(machine["config"].leases_file), [("192.168.64.7", MAC, NOW + 9, "virby-vm"), *stale]
    )
    assert examine(machine)["lease-pool"].status is Status.OK


def test_too_little_space_for_the_disk_to_grow(machine) -> None:
    finding = failed(examine(machine, free=100 * MIB))["disk-space"]
    assert finding.detail.startswith("diff.img may take 1.0 GiB more (up to 1.0 GiB")
    assert "and its volume has 0.1 GiB free" in finding.detail
    assert finding.fix is not None and "lower diskSize" in finding.fix


def test_room_for_builds_but_not_for_the_whole_disk_is_a_warning(machine) -> None:
    config = dataclasses.replace(machine["config"], disk_size=100 * 1024 * MIB)
    found = examine(machine, config, free=20 * 1024 * MIB)
    assert failed(found) == {}
    finding = found["disk-space"]
    assert finding.status is Status.WARN
    assert "and its volume has 20.0 GiB free" in finding.detail
    assert finding.fix is not None and "lower diskSize" in finding.fix


def test_too_little_room_for_a_build_fails_however_large_the_disk(machine) -> None:
    config = dataclasses.replace(machine["config"], disk_size=100 * 1024 * MIB)
    finding = failed(examine(machine, config, free=4 * 1024 * MIB))["disk-space"]
    assert "and its volume has 4.0 GiB free" in finding.detail


def test_an_ssh_that_fails(machine) -> None:
    machine["mac"].answers[SSH_AS_NIX] = HostCommandError(
        "builder@127.0.0.1: Permission denied (publickey).", 255
    )
    finding = failed(examine(machine, ssh=True))["ssh"]
    assert finding.detail == (
        "ssh virby-vm nix-daemon --version failed: builder@127.0.0.1: Permission denied "
        "(publickey)."
    )


def test_ssh_connects_as_nix_does() -> None:
    """C{ssh HOST -x ... -- nix-daemon}: Nix's own order, and the program ssh-ng runs."""
    assert SSH_AS_NIX[:3] == (SSH, "virby-vm", "-x")
    assert SSH_AS_NIX[-3:] == ("--", "nix-daemon", "--version")


def test_ssh_waits_as_long_as_a_boot_may_take(machine) -> None:
    timeouts: list[float | None] = []
    run = machine["mac"].run
    machine["mac"].run = lambda argv, timeout=None: timeouts.append(timeout) or run(argv, timeout)
    examine(machine, ssh=True)
    assert timeouts[-1] == 180 + 30


# -- ephemeral and non-root


def test_ephemeral_needs_no_diff_img(machine) -> None:
    os.unlink(Path(machine["config"].working_directory) / "diff.img")
    config = dataclasses.replace(machine["config"], ephemeral=True)
    found = examine(machine, config)
    assert failed(found) == {}
    assert found["disk-space"].detail.startswith("base.img may take")


# -- shared directories: vfkit runs as the daemon's user and stops at a share it cannot reach


def sharing(machine, **shared: Path | str) -> tuple[Config, Path]:
    """The machine's config with these shares, and a home folder as macOS makes it."""
    root = machine["root"]
    root.chmod(0o755)
    home = root / "Users" / "me"
    (home / "src").mkdir(parents=True, exist_ok=True)
    home.chmod(0o750)
    machine["mac"].users["_virby"] = PLAYED.uid
    shares = {tag: str(path).replace("HOME", str(home)) for tag, path in shared.items()}
    return dataclasses.replace(machine["config"], shared_dirs=shares), home


def test_shares_the_daemons_user_reaches_pass(machine) -> None:
    config, home = sharing(machine, src="HOME/src")
    home.chmod(0o755)
    played = PlayedUser(machine["root"])
    found = examine(machine, config, askAs=played)
    names = list(found)
    assert names.index("shared-dirs") == names.index("vfkit") + 1
    assert found["shared-dirs"].status is Status.OK
    assert found["shared-dirs"].detail == f'_virby can reach "src" ({home}/src)'
    assert played.asked[0][0] == Account("_virby", PLAYED.uid)


def test_a_share_in_a_home_folder_fails_with_the_acl_that_fixes_it(machine) -> None:
    config, home = sharing(machine, src="HOME/src")
    found = failed(examine(machine, config, askAs=PlayedUser(machine["root"])))
    shared = found["shared-dirs"]
    assert shared.detail.startswith(f'"src" ({home}/src): _virby may not search {home} (')
    assert shared.detail.endswith("vfkit runs as _virby and stops every boot there")
    assert f'sudo chmod +a "_virby allow search" {home}' in shared.fix


def test_a_protected_folder_fails_even_without_root(machine) -> None:
    config, _ = sharing(machine, docs="/Users/me/Documents/src", src="HOME/src")
    found = examine(machine, config, euid=PLAYED.uid + 1)
    assert found["shared-dirs"].status is Status.FAIL
    assert "/Users/me/Documents is kept from daemons" in found["shared-dirs"].detail


def test_only_root_can_ask_as_the_daemons_user(machine) -> None:
    config, _ = sharing(machine, src="HOME/src")
    found = examine(machine, config, euid=PLAYED.uid + 1)
    assert found["shared-dirs"].status is Status.SUDO
    assert found["shared-dirs"].detail.startswith("whether _virby can reach")


def test_without_the_daemons_user_the_shares_are_not_guessed(machine) -> None:
    config, _ = sharing(machine, src="HOME/src")
    machine["mac"].users.clear()
    found = examine(machine, config, askAs=PlayedUser(machine["root"]))
    assert found["shared-dirs"].status is Status.SKIP
    assert "no user _virby" in found["shared-dirs"].detail


def test_the_shares_are_asked_about_as_the_running_daemons_user(machine) -> None:
    """A running daemon's control socket says who it runs as, whatever the host's users."""
    import socket

    config, home = sharing(machine, src="HOME/src")
    home.chmod(0o755)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(config.path(CONTROL_SOCKET))
    try:
        owner = os.lstat(config.path(CONTROL_SOCKET))
        played = PlayedUser(machine["root"])
        examine(machine, config, askAs=played)
    finally:
        listening.close()
    account = played.asked[0][0]
    assert (account.uid, account.gid) == (owner.st_uid, owner.st_gid) != (PLAYED.uid, None)


def test_json_names_the_unreachable_share_and_its_fix(machine, monkeypatch) -> None:
    config, _ = sharing(machine, docs="/Users/me/Downloads")
    monkeypatch.setattr(doctor, "query", lambda path: dict(RUNNING_STATUS))
    monkeypatch.setattr(doctor, "defaultRunner", lambda: machine["mac"])
    out = io.StringIO()
    assert doctor.run(config, asJson=True, configFile="/c.json", out=out, euid=0) == 1
    (check,) = [c for c in json.loads(out.getvalue())["checks"] if c["check"] == "shared-dirs"]
    assert check["status"] == "fail" and "outside /Users" in check["fix"]


def test_a_user_is_told_which_checks_need_root(machine) -> None:
    found = examine(machine, status=NotAllowed("owner-only"), euid=501)
    assert found["port"].status is Status.SUDO and found["daemon"].status is Status.SUDO
    assert found["port"].fix == "run sudo virby doctor"


def test_json_for_scripts(machine, monkeypatch) -> None:
    monkeypatch.setattr(doctor, "query", lambda path: dict(RUNNING_STATUS))
    monkeypatch.setattr(doctor, "defaultRunner", lambda: machine["mac"])
    os.chmod(machine["config"].working_directory, 0o755)
    out = io.StringIO()
    assert doctor.run(machine["config"], asJson=True, configFile="/c", out=out, euid=0) == 1
    document = json.loads(out.getvalue())
    assert document["ok"] is False and document["needs_sudo"] == []
    (failure,) = [c for c in document["checks"] if c["status"] == "fail"]
    assert failure["check"] == "working-dir" and "virby prepare" in failure["fix"]


# -- what the Mac says, parsed


def test_launchctl_print_is_read_from_the_jobs_own_lines() -> None:
    job = parseLaunchctl(RUNNING_JOB)
    assert job["state"] == "running" and job["pid"] == str(DAEMON_PID)
    assert job["last exit code"] == "(never exited)"


def test_lsof_field_output() -> None:
    assert parseLsof("p1\nclaunchd\nf3\np42\ncvirbyd\n") == [(1, "launchd"), (42, "virbyd")]
    assert parseLsof("") == []


@pytest.mark.parametrize(
    ("text", "version"),
    [("vfkit version: v0.6.3\n", (0, 6, 3)), ("vfkit version: 0.6.1", (0, 6, 1)),
     ("vfkit version: v0.6.3-4-gabcdef", (0, 6, 3)), ("vfkit version: unknown", None),
     ("vfkit version: ", None)],
)  # fmt: skip
def test_vfkit_versions(text: str, version) -> None:
    assert parseVfkitVersion(text) == version


def test_every_flag_the_daemon_passes_has_its_vfkit_release() -> None:
    everything = fromMapping(
        {"rosetta": True, "nested-virtualization": True, "shared-dirs": {"src": "/src"}}
    )
    needs = vfkitNeeds(everything)
    assert set(needs) <= set(VFKIT_SINCE)
    assert needs["--timesync"] == (0, 0, 3) and needs["rosetta"] == (0, 5, 0)
    assert max(needs.values()) == (0, 6, 2)


def test_the_played_mac_answers_what_doctor_asks() -> None:
    played = PlayedMac("Apple M4", "15.5", "installed", launchd="running:77", firewall="block-all")
    job = parseLaunchctl(played.run([LAUNCHCTL, "print", f"system/{LAUNCHD_LABEL}"]))
    assert (job["state"], job["pid"]) == ("running", "77")
    assert doctor._saysOn(played.run([SOCKETFILTERFW, "--getglobalstate"])) is True
    assert doctor._saysOn(played.run([SOCKETFILTERFW, "--getblockall"])) is True
    with pytest.raises(HostCommandError) as caught:
        dataclasses.replace(played, launchd="missing").run(
            [LAUNCHCTL, "print", f"system/{LAUNCHD_LABEL}"]
        )
    assert caught.value.status == 113
    with pytest.raises(HostCommandError) as caught:
        dataclasses.replace(played, launchd="").run([LAUNCHCTL, "print", "system/x"])
    assert caught.value.status is None, "no launchd: the command is missing"
    waiting = dataclasses.replace(played, launchd="waiting", firewall="off")
    assert parseLaunchctl(waiting.run([LAUNCHCTL, "print", "system/x"]))["state"] == "waiting"
    assert doctor._saysOn(waiting.run([SOCKETFILTERFW, "--getglobalstate"])) is False


@pytest.mark.repository
def test_the_label_is_the_modules() -> None:
    module = ROOT / "nix" / "module.nix"
    assert f'label = "{LAUNCHD_LABEL}";' in module.read_text()


def test_without_config_the_modules_config_is_read(machine, monkeypatch, capsys) -> None:
    from virby import cli

    installed = machine["root"] / "config.json"
    installed.write_text(
        json.dumps({"working-directory": machine["config"].working_directory,
                    "image": machine["config"].image, "vfkit": machine["config"].vfkit})
    )  # fmt: skip
    monkeypatch.setattr(cli, "INSTALLED_CONFIG", str(installed))
    monkeypatch.setattr(doctor, "defaultRunner", lambda: machine["mac"])
    monkeypatch.setattr(doctor, "query", lambda path: dict(RUNNING_STATUS))
    cli.main(["doctor", "--json"])
    document = json.loads(capsys.readouterr().out)
    (image,) = [c for c in document["checks"] if c["check"] == "image"]
    assert image["status"] == "ok" and machine["config"].image in image["detail"]


# -- the config that was read


def test_no_config_given_and_none_installed_is_the_one_failure(machine, monkeypatch) -> None:
    monkeypatch.setattr(doctor, "defaultRunner", lambda: machine["mac"])
    out = io.StringIO()
    assert doctor.run(machine["config"], asJson=False, configFile=None, out=out, euid=0) == 1
    first, summary = out.getvalue().splitlines()
    assert first.split()[:2] == ["FAIL", "config"]
    assert "no --config given, and /etc/virby/config.json is not installed" in first
    assert "virby doctor --config FILE" in first
    assert summary == "1 of 1 checks failed"
    assert machine["mac"].asked == [], "nothing was asked of a Mac judged by defaults"


# -- the Nix side: why Nix would not pick the builder


def test_no_machines_file(machine) -> None:
    del machine["mac"].texts[NIX_MACHINES]
    finding = failed(examine(machine))["machines"]
    assert finding.detail == "no /etc/nix/machines: Nix knows no remote builders"
    assert finding.fix is not None and "nix.buildMachines" in finding.fix
    assert "determinateNix.buildMachines" in finding.fix


def test_a_machines_file_without_the_builder(machine) -> None:
    machine["mac"].texts[NIX_MACHINES] = "# others\nssh://mac-mini x86_64-linux - 4 1 - - -\n"
    finding = failed(examine(machine))["machines"]
    assert finding.detail == "/etc/nix/machines lists no virby-vm (it lists ssh://mac-mini)"


def test_a_machine_without_the_systems_and_features_the_config_implies(machine) -> None:
    config = dataclasses.replace(machine["config"], rosetta=True, nested_virtualization=True)
    finding = failed(examine(machine, config))["machines"]
    assert "systems aarch64-linux, not aarch64-linux,x86_64-linux" in finding.detail
    assert "features benchmark,big-parallel, not benchmark,big-parallel,kvm,nixos-test" in (
        finding.detail
    )


def test_a_machine_with_what_this_config_does_not_offer(machine) -> None:
    """kvm without nesting would send NixOS tests to a VM with no /dev/kvm."""
    machine["mac"].texts[NIX_MACHINES] = (
        "ssh-ng://virby-vm aarch64-linux - 8 1 benchmark,big-parallel,kvm,nixos-test kvm -\n"
    )
    finding = failed(examine(machine))["machines"]
    assert "not benchmark,big-parallel" in finding.detail
    assert "mandatory features kvm" in finding.detail


def test_the_machines_file_is_the_one_builders_names(machine) -> None:
    mac = machine["mac"]
    mac.answers[NIX_CONFIG_SHOW[0]] = NIX_SETTINGS.replace(
        "@/etc/nix/machines", "@/etc/nix/other-machines"
    )
    mac.texts["/etc/nix/other-machines"] = MACHINE_LINE
    del mac.texts[NIX_MACHINES]
    found = examine(machine)
    assert found["machines"].status is Status.OK
    assert found["machines"].detail.startswith("/etc/nix/other-machines lists ssh-ng://virby-vm")


def test_builders_that_name_the_builder_inline(machine) -> None:
    mac = machine["mac"]
    mac.answers[NIX_CONFIG_SHOW[0]] = NIX_SETTINGS.replace(
        "@/etc/nix/machines", MACHINE_LINE.strip()
    )
    del mac.texts[NIX_MACHINES]
    found = examine(machine)
    assert found["machines"].status is Status.OK, found["machines"].line()
    assert found["machines"].detail.startswith("the builders setting lists")


def test_empty_builders_is_distributed_builds_off(machine) -> None:
    machine["mac"].answers[NIX_CONFIG_SHOW[0]] = NIX_SETTINGS.replace("@/etc/nix/machines", "")
    finding = failed(examine(machine))["nix-settings"]
    assert "builders setting is empty" in finding.detail
    assert finding.fix is not None and "nix.distributedBuilds = true" in finding.fix


def test_builders_that_read_no_machines_file(machine) -> None:
    machine["mac"].answers[NIX_CONFIG_SHOW[0]] = NIX_SETTINGS.replace(
        "@/etc/nix/machines", "ssh://elsewhere x86_64-linux"
    )
    finding = failed(examine(machine))["nix-settings"]
    assert "reads no machines file and does not name virby-vm" in finding.detail


def test_an_older_nix_is_asked_with_show_config(machine) -> None:
    mac = machine["mac"]
    mac.answers[NIX_CONFIG_SHOW[0]] = HostCommandError(
        "error: 'config' is not a recognised command", 1
    )
    mac.answers[NIX_CONFIG_SHOW[1]] = NIX_SETTINGS
    found = examine(machine)
    assert found["nix-settings"].status is Status.OK
    assert NIX_CONFIG_SHOW[0] in mac.asked and NIX_CONFIG_SHOW[1] in mac.asked


def test_a_nix_off_path_is_found_in_the_system_profile(machine) -> None:
    """sudo can reset PATH: nix-darwin's profile still has Nix."""
    mac = machine["mac"]
    mac.answers[NIX_CONFIG_SHOW[0]] = HostCommandError("No such file or directory: 'nix'")
    system = ("/run/current-system/sw/bin/nix", *NIX_CONFIG_SHOW[0][1:])
    mac.answers[system] = NIX_SETTINGS
    found = examine(machine)
    assert found["nix-settings"].status is Status.OK
    assert NIX_CONFIG_SHOW[1] not in mac.asked, "a missing nix is not asked the old way"
    assert system in mac.asked


def test_no_nix_to_ask_is_a_warning(machine) -> None:
    del machine["mac"].answers[NIX_CONFIG_SHOW[0]]
    assert examine(machine)["nix-settings"].status is Status.WARN


def test_substitutes_off_and_an_untrusted_user_are_said(machine) -> None:
    machine["mac"].answers[NIX_CONFIG_SHOW[0]] = NIX_SETTINGS.replace(
        "builders-use-substitutes = true", "builders-use-substitutes = false"
    )
    finding = examine(machine, user="alice")["nix-settings"]
    assert finding.status is Status.WARN
    assert "alice is not in trusted-users (root)" in finding.detail
    assert "builders-use-substitutes is not true" in finding.detail
    assert finding.fix == "nix.settings.builders-use-substitutes = true"
    machine["mac"].answers[NIX_CONFIG_SHOW[0]] = NIX_SETTINGS.replace("= root", "= root @admin")
    assert "trusted-users" not in examine(machine, user="alice")["nix-settings"].detail


def test_no_host_block_is_said_by_ssh_config_and_named_by_the_ssh_failure(machine) -> None:
    mac = machine["mac"]
    mac.answers[(SSH, "-G", "virby-vm")] = "user root\nhostname virby-vm\nport 22\n"
    mac.answers[SSH_AS_NIX] = HostCommandError(
        "ssh: Could not resolve hostname virby-vm: nodename nor servname provided, or not known",
        255,
    )
    found = failed(examine(machine, ssh=True))
    assert found["ssh-config"].detail.startswith("root's ssh has no Host virby-vm block")
    assert found["ssh-config"].fix is not None
    assert "Include /etc/ssh/ssh_config.d/*" in found["ssh-config"].fix
    assert found["ssh"].fix is not None and "daemon" not in found["ssh"].fix
    assert found["ssh"].fix.startswith("first the ssh-config check's problem")


def test_a_host_block_with_another_port_and_key(machine) -> None:
    machine["mac"].answers[(SSH, "-G", "virby-vm")] = sshG(
        machine["config"], port="2222", identityfile="~/.ssh/id_ed25519"
    )
    finding = failed(examine(machine))["ssh-config"]
    assert "port 2222, not 31222" in finding.detail
    assert "identityfile is not" in finding.detail
    assert finding.fix is not None and "virby prepare --print-ssh-config" in finding.fix


@pytest.mark.parametrize(
    ("said", "fix"),
    [("kex_exchange_identification: Connection closed by remote host", "sudo virby start"),
     ("ssh: connect to host 127.0.0.1 port 31222: Connection refused", "launchd and port"),
     ("No ED25519 host key is known for virby-vm-key and you have requested strict checking.",
      "sudo virby prepare"),
     ("builder@127.0.0.1: Permission denied (publickey).", "refused the client key"),
     ("bash: nix-daemon: command not found", "no nix-daemon")],
)  # fmt: skip
def test_an_ssh_failure_is_fixed_by_its_cause(machine, said: str, fix: str) -> None:
    machine["mac"].answers[SSH_AS_NIX] = HostCommandError(said, 255)
    finding = failed(examine(machine, ssh=True))["ssh"]
    assert finding.fix is not None and fix in finding.fix, finding.fix


def test_the_host_key_as_a_user_asks_for_root(machine) -> None:
    config = dataclasses.replace(machine["config"], allow_user_ssh=True)
    machine["mac"].answers[SSH_AS_NIX] = HostCommandError("Host key verification failed.", 255)
    finding = examine(machine, config, ssh=True, euid=501)["ssh"]
    assert finding.fix is not None and finding.fix.startswith("run it as root")


def test_the_port_held_by_another_virby_daemon_names_its_config(machine) -> None:
    mac = machine["mac"]
    mac.lsof = "p1\nclaunchd\np999\ncPython\n"
    mac.answers[(PS, "-ww", "-o", "command=", "-p", "999")] = (
        "/nix/store/x-python3/bin/python3.12 /nix/store/y-virby/bin/virbyd "
        "--config /nix/store/z-virby.json\n"
    )
    finding = failed(examine(machine))["port"]
    assert "another Virby daemon (pid 999), which runs with --config /nix/store/z-virby.json" in (
        finding.detail
    )
    assert finding.fix is not None and "different ports" in finding.fix


def test_a_firewall_that_is_off_is_not_given_as_the_fix(machine) -> None:
    (Path(machine["config"].working_directory) / "vfkit.pid").write_text("123\n")
    os.utime(Path(machine["config"].working_directory) / "vfkit.pid", (NOW - 120, NOW - 120))
    write_leases(Path(machine["config"].leases_file), [])
    finding = failed(examine(machine))["dhcp-lease"]
    assert finding.fix is not None and finding.fix.startswith("the firewall is off, so it is not")
    assert "let bootpd through" not in finding.fix and "serial.log" in finding.fix


def test_the_played_mac_has_a_machines_file_and_ps(tmp_path) -> None:
    played = PlayedMac("Apple M4", "15.5", "installed")
    with pytest.raises(FileNotFoundError):
        played.readText(NIX_MACHINES)
    machines = tmp_path / "machines"
    machines.write_text(MACHINE_LINE)
    played = PlayedMac.fromEnvironment({"VIRBY_PLAYED_NIX_MACHINES": str(machines)})
    assert played.readText(NIX_MACHINES) == MACHINE_LINE


@pytest.mark.linux
def test_the_played_mac_runs_ps_as_linux_has_it() -> None:
    played = PlayedMac("Apple M4", "15.5", "installed")
    line = played.run([PS, "-ww", "-o", "command=", "-p", str(os.getpid())])
    assert "python" in line.lower() or "pytest" in line


@pytest.mark.repository
def test_the_builder_the_doctor_expects_is_the_modules() -> None:
    """C{nix/module.nix} registers these features and systems; the doctor checks the same."""
    module = (ROOT / "nix" / "module.nix").read_text()
    block = module[module.index("buildMachine = {") : module.index("# Reads one attribute")]
    for word in ('"benchmark"', '"big-parallel"', '"kvm"', '"nixos-test"', '"x86_64-linux"'):
        assert word in block
    assert 'hostName = "virby-vm"' in block and 'protocol = "ssh-ng"' in block


# -- the previous keys, kept from a new image to the next boot (virby.rotation)


def rotated(machine, **options: Any) -> Config:
    """The machine's directory after a new image: the previous set kept."""
    image = Path(machine["root"]) / "store-new-image.img"
    image.write_bytes(b"new image" + bytes(4096))
    config = dataclasses.replace(machine["config"], image=str(image), **options)
    prepare.prepare(config)
    assert prepare.previousHostKey(config) is not None
    return config


def test_the_previous_keys_and_their_pin_are_no_problem(machine) -> None:
    config = rotated(machine)
    previous = config.path(PREVIOUS_CLIENT_KEY)
    machine["mac"].answers[(SSH, "-G", "virby-vm")] = sshG(
        config, identityfile=f"{config.path(CLIENT_KEY)}\nidentityfile {previous}"
    )
    found = examine(machine, config)
    assert [name for name, finding in found.items() if finding.status is Status.FAIL] == []
    assert found["keys"].detail == (
        "the client key is the one the guest authorizes; the host key is pinned; the previous "
        "keys are kept for a VM of the image before, until the next boot"
    )
    assert found["ssh-config"].status is Status.OK


def test_the_previous_keys_copy_for_users_must_be_that_key(machine) -> None:
    config = rotated(machine, allow_user_ssh=True)
    wd = Path(config.working_directory)
    assert "keys" not in failed(examine(machine, config))
    (wd / PREVIOUS_SHARED_CLIENT_KEY).write_bytes(keys.generate("stray").private)
    assert failed(examine(machine, config))["keys"].detail == (
        f"{PREVIOUS_SHARED_CLIENT_KEY} is not the previous client key"
    )


def test_a_copy_of_the_previous_key_without_allow_user_ssh_is_a_problem(machine) -> None:
    config = rotated(machine)
    wd = Path(config.working_directory)
    (wd / PREVIOUS_SHARED_CLIENT_KEY).write_bytes((wd / PREVIOUS_CLIENT_KEY).read_bytes())
    os.chmod(wd / PREVIOUS_SHARED_CLIENT_KEY, 0o644)
    assert failed(examine(machine, config))["files"].detail == (
        f"{PREVIOUS_SHARED_CLIENT_KEY} exists though allow-user-ssh is off"
    )


def test_a_second_pin_that_is_no_key_is_a_problem(machine) -> None:
    wd = Path(machine["config"].working_directory)
    with open(wd / KNOWN_HOSTS, "a") as f:
        f.write("virby-vm-key ssh-ed25519 junk\n")
    assert failed(examine(machine))["keys"].detail == (
        "ssh_known_hosts does not pin the VM's host key"
    )
