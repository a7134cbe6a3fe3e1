"""
The activation script nix-darwin generates for a system with services.virby, run as
darwin-rebuild runs it (C{$systemConfig/activate}, under bash with C{set -e} and
C{pipefail}), switch after switch, on a fake Mac.

The systems are built for real with C{nix-build} from L{nix/tests/darwin.nix} (nix-darwin's
own builders make C{/etc}, the launchd plists and C{activate}, and run shellcheck on it; the
packages are stand-ins).  The fake Mac is a directory used as the root of a chroot in a
private mount namespace: the host's C{/usr} and C{/nix/store} read-only, and in C{/sbin} the
stand-ins of L{tests.e2e.macos_standins} for C{dscl}, C{sysadminctl}, C{launchctl} and the
other macOS commands, which record every call.  C{virby prepare} is the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.darwin_harness import HARNESS, PAIRS, ROOT, Pair, arguments

pytestmark = pytest.mark.e2e

STANDINS = Path(__file__).resolve().parent / "macos_standins.py"
MACOS_COMMANDS = ["dscl", "sysadminctl", "dseditgroup", "createhomedir", "launchctl", "tccutil",
                  "defaults", "scutil", "systemsetup", "pmset", "nvram", "sw_vers"]  # fmt: skip
STORE_PROGRAMS = ["virby", "virbyd", "nix-store", "rsync"]
APFS_UTIL = "System/Library/Filesystems/apfs.fs/Contents/Resources/apfs.util"
LABEL = "org.nixos.virbyd"
DAEMON_PLIST = f"/Library/LaunchDaemons/{LABEL}.plist"
NIX_DAEMON_PLIST = "/Library/LaunchDaemons/org.nixos.nix-daemon.plist"

# documentation.enable is off: the manual needs nixpkgs' doc tools, which have no stand-ins.
# Four Nix build users instead of 32 keep each switch short (every dscl call is a process).
BUILD_USERS = 4
QUIET = {"documentation": {"enable": False}, "nix": {"nrBuildUsers": BUILD_USERS}}
UNBUILT = f"unbuilt-{os.urandom(6).hex()}"
SYSTEMS: dict[str, dict[str, Any]] = {
    "enabled": {"virby": {"enable": True}, "config": QUIET},
    "new-image": {
        "virby": {"enable": True, "extraConfig": {"boot": {"kernelParams": ["quiet"]}}},
        "config": QUIET,
    },
    "on-demand": {"virby": {"enable": True, "onDemand": {"enable": True}}, "config": QUIET},
    # An upgrade of Virby: the same options, another package.
    "new-package": {"virby": {"enable": True}, "config": QUIET, "packageVersion": "0.1.0-new"},
    "disabled": {"virby": {}, "config": QUIET},
    # An image no one builds before the switch: the fake Mac's Nix has no builder for it.
    # Its own in every run, since a run builds it into the host's store.
    "unbuilt-image": {
        "virby": {"enable": True, "extraConfig": {"boot": {"kernelParams": [UNBUILT]}}},
        "config": QUIET,
    },
}
#: The systems whose image is built before the switch, as on a Mac whose Nix has a builder
#: for the image's system (the fake Mac's stand-in nix-store finds it there).
PREBUILT = {"enabled", "new-image", "on-demand", "new-package"}


def why_not_here() -> str | None:
    if os.geteuid() != 0:
        return "needs root: a chroot in a private mount namespace"
    for tool in ("nix-build", "unshare", "chroot", "shellcheck"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (dev/setup installs what the tests need)"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a mount namespace here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module", params=PAIRS, ids=lambda pair: pair.name)
def systems(request: pytest.FixtureRequest) -> dict[str, str]:
    """The systems of SYSTEMS, built: name -> store path."""
    pair: Pair = request.param
    why = pair.missing() or why_not_here()
    if why is not None:
        pytest.skip(why)
    names = sorted(SYSTEMS)
    command = ["nix-build", str(HARNESS), "--no-out-link",
               "--option", "sandbox", "false", "--option", "build-users-group", "",
               "--option", "substituters", ""]  # fmt: skip
    images = sorted(PREBUILT)
    for name in names:
        command += ["-A", f"systems.{name}.config.system.build.toplevel"]
    for name in images:
        command += ["-A", f"systems.{name}.config.system.build.virbyImage"]
    built = subprocess.run(
        [*command, *arguments(pair, per_pair(pair))],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-4000:]
    paths = built.stdout.split()
    unbuilt = image_of(paths[names.index("unbuilt-image")])
    assert not Path(unbuilt).exists(), "building the system built its image"
    return dict(zip(names, paths[: len(names)], strict=True))


def per_pair(pair: Pair) -> dict:
    """SYSTEMS, with an unbuilt image of this pair's own (each pair's run builds its own)."""
    unbuilt = {"boot": {"kernelParams": [f"{UNBUILT}-{pair.name}"]}}
    case = {**SYSTEMS["unbuilt-image"], "virby": {"enable": True, "extraConfig": unbuilt}}
    return {**SYSTEMS, "unbuilt-image": case}


def package_of(system: str) -> str:
    """The Virby package whose C{virby prepare} the system's activation script runs."""
    activate = (Path(system) / "activate").read_text()
    return activate.split("/bin/virby prepare ", 1)[0].rsplit(None, 1)[-1]


def image_of(system: str) -> str:
    """The image file the daemon's config of C{system} names."""
    config = json.loads((Path(system) / "etc/virby/config.json").read_text())
    return config["image"]


@dataclass
class Switch:
    returncode: int
    output: str
    calls: list[dict]

    def commands(self, name: str) -> list[list[str]]:
        return [c["argv"][1:] for c in self.calls if c.get("argv", [""])[0] == name]

    def index(self, name: str, *prefix: str) -> int:
        """Where the first call of C{name} starting with C{prefix} is, in call order."""
        for i, call in enumerate(self.calls):
            argv = call.get("argv", [])
            if argv[:1] == [name] and argv[1 : 1 + len(prefix)] == list(prefix):
                return i
        raise AssertionError(f"no call {name} {' '.join(prefix)} in {self.calls}")

    def loaded(self, label: str) -> list[dict]:
        return [c for c in self.calls if c.get("launchd") == "loaded" and c["label"] == label]


class FakeMac:
    """A root directory shaped like a Mac with Nix installed and nix-darwin not yet."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = sys.executable
        # /etc/alternatives: Debian's awk is a symlink through it.
        self.binds = sorted({"/usr", "/nix/store", "/dev", "/etc/alternatives", str(ROOT),
                             sys.base_prefix})  # fmt: skip
        for directory in (
            "etc",
            "tmp",
            "proc",
            "sbin",
            "bin",
            "standins",
            "var/root",
            "var/log",
            "var/db/standins",
            "private/var/run",
            "Library/LaunchDaemons",
            "Library/LaunchAgents",
            "Applications",
            "Users",
            "nix/var/nix/gcroots",
            str(Path(APFS_UTIL).parent),
            *[b.lstrip("/") for b in self.binds],
        ):
            (root / directory).mkdir(parents=True, exist_ok=True)  # fmt: skip
        for name in ("lib", "lib64"):
            if Path("/" + name).exists():
                (root / name).symlink_to(f"usr/{name}")
        for shell in ("bash", "sh"):
            (root / "bin" / shell).symlink_to(f"/usr/bin/{shell}")
        run = root / "standins" / ".run"
        run.write_text(f'#!/bin/sh\nexec {self.python} {STANDINS} "$(basename "$0")" "$@"\n')
        run.chmod(0o755)
        for name in MACOS_COMMANDS:
            (root / "sbin" / name).symlink_to("/standins/.run")
        for name in STORE_PROGRAMS:
            (root / "standins" / name).symlink_to(".run")
        (root / APFS_UTIL).symlink_to("/standins/.run")
        (root / "var/db/standins/python").write_text(self.python)
        # What the Nix installer leaves: its synthetic.conf entry and its daemon, loaded.
        # Files macOS ships that nix-darwin reads.
        (root / "etc/pam.d").mkdir()
        (root / "etc/pam.d/sudo").write_text(
            "# sudo: auth account password session\n"
            "auth       include        sudo_local\n"
            "auth       sufficient     pam_smartcard.so\n"
            "auth       required       pam_opendirectory.so\n"
            "account    required       pam_permit.so\n"
            "password   required       pam_deny.so\n"
            "session    required       pam_permit.so\n"
        )
        (root / "etc/profile").write_text("# System-wide .profile for sh(1)\n")
        synthetic = root / "etc/synthetic.conf"
        synthetic.write_text("nix\n")
        synthetic.chmod(0o644)
        (root / NIX_DAEMON_PLIST.lstrip("/")).write_text(
            '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict>'
            "<key>Label</key><string>org.nixos.nix-daemon</string></dict></plist>\n"
        )
        self.writeState(
            "launchd.json", {"jobs": {"org.nixos.nix-daemon": {"plist": NIX_DAEMON_PLIST}}}
        )
        self.directory = {
            "Users": {
                "root": self.user(0, 0, "System Administrator", "/var/root", "/bin/sh"),
                "nobody": self.user(65534, 65534, "Unprivileged User", "/var/empty"),
                "alice": self.user(501, 20, "Alice", "/Users/alice", "/bin/zsh"),
            },
            "Groups": {
                "wheel": {"PrimaryGroupID": ["0"], "GroupMembership": ["root"]},
                "staff": {"PrimaryGroupID": ["20"], "GroupMembership": ["root"]},
                "nogroup": {"PrimaryGroupID": ["65534"]},
            },
        }
        # The Nix installer's build users and group (the ids nix-darwin expects of them).
        builders = [f"_nixbld{n}" for n in range(1, BUILD_USERS + 1)]
        for n, name in enumerate(builders, 1):
            self.directory["Users"][name] = self.user(350 + n, 350, f"Nix build user {n}",
                                                      "/var/empty")  # fmt: skip
        self.directory["Groups"]["nixbld"] = {
            "PrimaryGroupID": ["350"],
            "GroupMembership": builders,
        }
        self.save_directory()

    @staticmethod
    def user(uid: int, gid: int, name: str, home: str, shell: str = "/usr/bin/false") -> dict:
        return {"UniqueID": [str(uid)], "PrimaryGroupID": [str(gid)], "RealName": [name],
                "NFSHomeDirectory": [home], "UserShell": [shell]}  # fmt: skip

    def writeState(self, name: str, data: dict) -> None:
        (self.root / "var/db/standins" / name).write_text(json.dumps(data))

    def save_directory(self) -> None:
        self.writeState("directory.json", self.directory)
        users = [
            f"{n}:*:{r['UniqueID'][0]}:{r['PrimaryGroupID'][0]}:{r['RealName'][0]}:"
            f"{r['NFSHomeDirectory'][0]}:{r['UserShell'][0]}"
            for n, r in self.directory["Users"].items()
        ]
        groups = [
            f"{n}:*:{r['PrimaryGroupID'][0]}:{','.join(r.get('GroupMembership', []))}"
            for n, r in self.directory["Groups"].items()
        ]
        (self.root / "etc/passwd").write_text("\n".join(users) + "\n")
        (self.root / "etc/group").write_text("\n".join(groups) + "\n")

    def accounts(self) -> dict:
        return json.loads((self.root / "var/db/standins/directory.json").read_text())

    def jobs(self) -> dict:
        return json.loads((self.root / "var/db/standins/launchd.json").read_text())["jobs"]

    def path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def links(self, path: str) -> list[str]:
        """
        The links C{path} goes through on the Mac, in order, and where they end: each
        component is resolved as the Mac's kernel would, inside the fake root (the store,
        bound there during a switch, is the host's).
        """
        seen = [path]
        todo = list(reversed(Path(path).parts[1:]))
        current = "/"
        while todo:
            name = todo.pop()
            if name == "..":
                current = os.path.dirname(current)
                continue
            candidate = os.path.join(current, name)
            here = Path(candidate) if candidate.startswith("/nix/store/") else self.path(candidate)
            if not here.is_symlink():
                current = candidate
                continue
            assert len(seen) < 40, f"a loop of links: {seen}"
            target = os.readlink(here)
            todo.extend(reversed(Path(target).parts[1:] if target.startswith("/") else
                                 Path(target).parts))  # fmt: skip
            current = "/" if target.startswith("/") else current
            seen.append(os.path.join(current, *reversed(todo)))
        seen.append(current)
        return seen

    def switch(self, system: str) -> Switch:
        """Activate C{system} as darwin-rebuild does: run its `activate` as root."""
        log = self.path("/var/log/standins.jsonl")
        log.write_text("")
        mounts = "\n".join(
            f"mount -o bind,ro {b} {self.root}{b}" if b not in ("/dev",)
            else f"mount -o bind {b} {self.root}{b}"
            for b in self.binds
        )  # fmt: skip
        script = (
            "set -e\n"
            f"{mounts}\n"
            f"mount -t proc proc {self.root}/proc\n"
            f"mount -t tmpfs tmpfs {self.root}/tmp\n"
            # What macOS's kernel runs for `#!/usr/bin/env -i /bin/bash`: it splits the
            # shebang's arguments, which Linux's does not.
            f"exec chroot {self.root} /usr/bin/env -i /bin/bash {system}/activate\n"
        )
        ran = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return Switch(ran.returncode, ran.stdout + ran.stderr, calls)


@pytest.fixture
def mac(tmp_path: Path) -> FakeMac:
    return FakeMac(tmp_path / "mac")


def test_a_fresh_mac_switches_and_starts_the_daemon(systems: dict, mac: FakeMac) -> None:
    first = mac.switch(systems["enabled"])
    assert first.returncode == 0, first.output
    # nix-darwin makes the group and the user, then Virby's step prepares the VM and gives
    # the log to _virby, then nix-darwin's launchd step loads the daemon.
    group = first.index("dscl", ".", "-create", "/Groups/virby", "PrimaryGroupID", "348")
    user = first.index("sysadminctl", "-addUser", "_virby")
    prepare = first.index("virby", "prepare")
    load = first.index("launchctl", "load", "-w", DAEMON_PLIST)
    assert group < user < prepare < load
    # After the launchd step, prepare has Nix root the image in the working directory.
    realise = first.index("nix-store", "--realise")
    assert load < realise
    assert mac.path("/var/lib/virby/image").resolve() == Path(image_of(systems["enabled"])).parent
    (loaded,) = first.loaded(LABEL)
    assert loaded["problems"] == [], "launchd could not start the daemon"
    assert not kickstarts(first)
    # The job's program and config: links in /etc, through /etc/static, to this system's.
    program = mac.links("/etc/virby/virbyd")
    assert program[1] == "/etc/static/virby/virbyd"
    assert f"{package_of(systems['enabled'])}/bin/virbyd" in program
    assert os.access(mac.path(program[-1]), os.X_OK)
    config = mac.links("/etc/virby/config.json")[-1]
    assert image_of(systems["enabled"]) == json.loads(Path(config).read_text())["image"]
    log = mac.path("/var/log/virbyd.log").stat()
    assert (log.st_uid, log.st_gid, log.st_mode & 0o777) == (348, 348, 0o644)
    assert mac.path("/var/lib/virby/image-path").exists()
    assert mac.path("/var/lib/virby").stat().st_uid == 348
    assert mac.accounts()["Users"]["_virby"]["UniqueID"] == ["348"]
    assert LABEL in mac.jobs()
    assert mac.path("/etc/ssh/ssh_config.d/100-virby-vm.conf").is_symlink()


def test_only_the_virby_command_is_on_the_macs_path(systems: dict) -> None:
    """
    The package also installs virbyd, which launchd runs through /etc/virby/virbyd, and
    vfkit-emulator, a Linux-only stand-in for vfkit: neither belongs on the Mac's PATH.
    """
    on_path = set(os.listdir(Path(systems["enabled"]) / "sw" / "bin"))
    assert "virby" in on_path
    assert not {"vfkit-emulator", "virbyd"} & on_path


def test_a_second_switch_with_nothing_changed_leaves_the_daemon_alone(
    systems: dict, mac: FakeMac
) -> None:
    assert mac.switch(systems["enabled"]).returncode == 0
    again = mac.switch(systems["enabled"])
    assert again.returncode == 0, again.output
    assert again.commands("sysadminctl") == []
    assert again.commands("virby")[0][0] == "prepare"
    assert [c for c in again.commands("launchctl") if LABEL in " ".join(c)] == []


def test_new_keys_without_a_new_image_leave_the_job_alone(systems: dict, mac: FakeMac) -> None:
    """prepare makes the keys and asks the daemon to renew: the activation touches no job."""
    assert mac.switch(systems["enabled"]).returncode == 0
    # A key that went missing: prepare makes new keys, the plist stays the same.
    mac.path("/var/lib/virby/ssh_known_hosts").unlink()
    again = mac.switch(systems["enabled"])
    assert again.returncode == 0, again.output
    assert mac.path("/var/lib/virby/ssh_known_hosts").exists()
    assert calls_of_the_job(again) == []
    assert daemon_lines(again) == []


def test_a_new_image_leaves_the_plist_and_the_job_alone(systems: dict, mac: FakeMac) -> None:
    """
    The image reaches the daemon through /etc/virby/config.json, when it renews (prepare
    asks it; on this Mac no daemon answers, and prepare says nothing of it): nix-darwin's
    launchd step finds the same plist and leaves the job running.
    """
    assert mac.switch(systems["enabled"]).returncode == 0
    before = mac.path("/var/lib/virby/image-path").read_text()
    plist = mac.path(DAEMON_PLIST).read_bytes()
    new = mac.switch(systems["new-image"])
    assert new.returncode == 0, new.output
    assert mac.path("/var/lib/virby/image-path").read_text() != before
    assert mac.path(DAEMON_PLIST).read_bytes() == plist
    assert calls_of_the_job(new) == []
    assert daemon_lines(new) == []
    config = mac.links("/etc/virby/config.json")[-1]
    assert json.loads(Path(config).read_text())["image"] == image_of(systems["new-image"])
    assert LABEL in mac.jobs()


def test_a_new_package_leaves_the_plist_and_the_job_alone(systems: dict, mac: FakeMac) -> None:
    assert mac.switch(systems["enabled"]).returncode == 0
    plist = mac.path(DAEMON_PLIST).read_bytes()
    old, new = package_of(systems["enabled"]), package_of(systems["new-package"])
    assert old != new
    upgrade = mac.switch(systems["new-package"])
    assert upgrade.returncode == 0, upgrade.output
    assert mac.path(DAEMON_PLIST).read_bytes() == plist
    assert calls_of_the_job(upgrade) == []
    # The next start of the daemon runs the new package's program.
    program = mac.links("/etc/virby/virbyd")
    assert f"{new}/bin/virbyd" in program and f"{old}/bin/virbyd" not in program


def calls_of_the_job(switch: Switch) -> list[list[str]]:
    """The launchctl calls that name Virby's job or its plist."""
    return [c for c in switch.commands("launchctl") if LABEL in " ".join(c)]


def kickstarts(switch: Switch) -> list[list[str]]:
    return [c for c in calls_of_the_job(switch) if c[:1] == ["kickstart"]]


def daemon_lines(switch: Switch) -> list[str]:
    """What the switch printed about Virby's daemon: nothing when none is running."""
    return [
        line
        for line in switch.output.splitlines()
        if "virby" in line.lower() and ("daemon" in line or "control" in line)
    ]


def test_new_options_reload_the_daemon(systems: dict, mac: FakeMac) -> None:
    assert mac.switch(systems["enabled"]).returncode == 0
    changed = mac.switch(systems["on-demand"])
    assert changed.returncode == 0, changed.output
    assert changed.index("launchctl", "unload", DAEMON_PLIST) < changed.index(
        "launchctl", "load", "-w", DAEMON_PLIST
    )
    assert not kickstarts(changed)


def test_disabling_removes_what_enabling_made(systems: dict, mac: FakeMac) -> None:
    assert mac.switch(systems["enabled"]).returncode == 0
    off = mac.switch(systems["disabled"])
    assert off.returncode == 0, off.output
    unload = off.index("launchctl", "unload", DAEMON_PLIST)
    user = off.index("dscl", ".", "-delete", "/Users/_virby")
    group = off.index("dscl", ".", "-delete", "/Groups/virby")
    assert unload < user < group
    assert not mac.path("/var/lib/virby").exists()
    assert "_virby" not in mac.accounts()["Users"] and "virby" not in mac.accounts()["Groups"]
    assert LABEL not in mac.jobs()
    again = mac.switch(systems["disabled"])
    assert again.returncode == 0, again.output
    assert ["-delete", "/Users/_virby"] not in [c[1:] for c in again.commands("dscl")]


def test_a_foreign_virby_user_is_refused_and_never_deleted(systems: dict, mac: FakeMac) -> None:
    mac.directory["Users"]["_virby"] = mac.user(502, 20, "Someone else", "/Users/_virby")
    mac.save_directory()
    refused = mac.switch(systems["enabled"])
    assert refused.returncode == 1
    assert "the user _virby exists with uid 502; Virby needs uid 348" in refused.output
    assert refused.commands("sysadminctl") == [] and refused.commands("virby") == []
    off = mac.switch(systems["disabled"])
    assert off.returncode == 0, off.output
    assert mac.accounts()["Users"]["_virby"]["UniqueID"] == ["502"]
    assert "leaving user _virby alone" in off.output


def test_an_image_nix_cannot_build_leaves_a_completed_switch_that_says_why(
    systems: dict, mac: FakeMac
) -> None:
    """
    The fake Mac's Nix has no builder for the image: the switch completes, the daemon is
    loaded and refuses boots with the recorded cause, and the ways forward are printed.
    """
    first = mac.switch(systems["unbuilt-image"])
    assert first.returncode == 0, first.output
    # Stage 0 is tried: the fake Mac's Nix cannot realise nixpkgs' linux-builder either.
    runner = first.commands("nix-store")[-1]
    assert runner[:2] == ["--realise", stage0_runner(systems["unbuilt-image"])], runner
    assert runner[3] == "/var/lib/virby/stage0/runner"
    stage0 = "no Linux builder for aarch64-linux, and the temporary builder's runner: "
    assert "virby prepare: stage 0: no Linux builder for aarch64-linux: starting" in first.output
    assert "virby prepare: stage 0: removed" in first.output
    assert (
        f"virby prepare: no VM image yet: {stage0}a 'aarch64-linux' with features {{}} is required"
    ) in first.output
    assert "The switch is complete" in first.output and "nix.linux-builder" in first.output
    (loaded,) = first.loaded(LABEL)
    assert loaded["problems"] == []
    wd = mac.path("/var/lib/virby")
    assert not (wd / "base.img").exists() and not (wd / "image").exists()
    assert not (wd / "stage0").exists()
    assert (wd / "image-failure").read_text().startswith(f"{stage0}a 'aarch64-linux' with")
    assert (wd / "ssh_known_hosts").exists()
    assert not kickstarts(first)
    # A builder appears (the image is built elsewhere and copied here): the next switch
    # prepares the disks from it and roots it; the loaded job is left alone (prepare asks
    # the daemon to renew onto the disks).
    built = subprocess.run(
        ["nix-store", "--realise", realisable(systems["unbuilt-image"])],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "NIX_CONFIG": "sandbox = false\nbuild-users-group =\nsubstituters ="},
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    again = mac.switch(systems["unbuilt-image"])
    assert again.returncode == 0, again.output
    assert (wd / "base.img").exists() and not (wd / "image-failure").exists()
    assert (wd / "image").resolve() == Path(image_of(systems["unbuilt-image"])).parent
    assert calls_of_the_job(again) == []
    assert again.index("virby", "prepare") < again.index("nix-store", "--realise")
    # Realised and rooted: a third switch asks Nix nothing and touches no job.
    third = mac.switch(systems["unbuilt-image"])
    assert third.returncode == 0, third.output
    assert ["--realise"] not in [c[:1] for c in third.commands("nix-store")]
    assert calls_of_the_job(third) == []


def stage0_runner(system: str) -> str:
    """The derivation of stage 0's runner as the system's activation script names it."""
    activate = (Path(system) / "activate").read_text()
    return activate.split("--stage0-runner ", 1)[1].split()[0]


def realisable(system: str) -> str:
    """The image's derivation as the system's activation script names it."""
    activate = (Path(system) / "activate").read_text()
    return activate.split("--image-derivation ", 1)[1].split()[0]
