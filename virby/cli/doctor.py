"""
``virby doctor [--json] [--ssh] --config FILE``: why does my builder not work?

Each check is one line: ok, or what is wrong and the command that fixes it.  The exit status
is 1 when any check failed, 0 otherwise; C{--json} prints one document for scripts.  A check
that only root can make (the working directory is owner-only, C{lsof} sees only the caller's
sockets) says so instead of guessing, and the last line says to run C{sudo virby doctor}.

The checks, in order, and what each looks at:

================  ==========================================================================
check             looks at
================  ==========================================================================
config            the config file read: the one given, else C{/etc/virby/config.json}; with
                  neither, nothing else is checked (defaults would fail further down)
launchd           C{launchctl print system/org.nixos.virbyd}: loaded, and running unless
                  on-demand (an on-demand job waits for its socket)
daemon            the control socket: the daemon answers, its VM's state, its last error
port              C{lsof -iTCP@127.0.0.1:PORT -sTCP:LISTEN}: only launchd (which holds the
                  socket it hands over) and the daemon hold the builder's port
working-dir       the working directory: there, a directory, C{prepare}'s mode, and owned by
                  the daemon's user (the owner of its control socket, else C{_virby})
files             every file C{prepare} makes: there, regular, its mode, the directory's owner
keys              the client key matches the authorized key the guest installs; the host key
                  matches its public half and the first line of C{ssh_known_hosts} (a
                  second pins the previous keys, kept for a VM of the image before)
image             the image C{prepare} recorded is the config's, and it and C{base.img} exist
vfkit             found, and C{vfkit --version} is a release with every flag and device the
                  daemon passes for this config (L{VFKIT_SINCE})
shared-dirs       (when any) the daemon's user can reach each one: not a folder macOS's
                  privacy protection keeps from daemons, there, and every folder on the way
                  searchable and the share listable, asked as that user (L{virby.shares})
rosetta           (when on) Apple silicon, macOS 13 or later, Rosetta installed
nested            (when on) Apple M3 or later with macOS 15 or later
nix-settings      C{nix config show} (C{nix show-config} before Nix 2.20): C{builders} reads
                  the machines file (or names virby-vm), C{builders-use-substitutes}, and
                  whether the caller is among C{trusted-users}
machines          the machines file C{builders} names (C{/etc/nix/machines}, which
                  nix-darwin and Determinate both write) lists C{virby-vm} with the systems
                  and features this config implies, as C{nix/module.nix} writes them
ssh-config        C{ssh -G virby-vm}: the Host block is read, with the daemon's address and
                  port, the pinned host key's alias, the client key and the known hosts
ssh               (with C{--ssh}) C{ssh virby-vm -x nix-daemon --version}, as Nix connects
                  (as root, no forwarding, the program C{ssh-ng} runs), within
                  start-timeout; before the leases, so that a VM it boots is the one they
                  are checked for
dhcp-lease        bootpd's lease file: readable, and written for this boot when a VM runs;
                  when no lease came, the application firewall's state and how to let
                  bootpd through (C{socketfilterfw --getglobalstate}, C{--getblockall})
lease-pool        unexpired leases in the VM's /24 against bootpd's 253 addresses
disk-space        free space on the working directory's volume against how much more the
                  VM's sparse disk may take (C{disk-size} minus what is allocated now): a
                  warning when it cannot all be taken, a failure below 5 GiB of room
================  ==========================================================================

Every command goes through the host-facts runner (L{virby.hostfacts.Runner}), so a test
plays a Mac, healthy or broken in any one way.  This is a short-lived command, never code
on the daemon's reactor: blocking calls are fine here.
"""

from __future__ import annotations

import enum
import grp
import ipaddress
import json
import os
import pwd
import re
import stat
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TextIO

from virby import keys, shares
from virby.cli import INSTALLED_CONFIG
from virby.cli.client import DAEMON_LOG, LOAD_FIX, RESTART_FIX, DaemonDown, NotAllowed
from virby.cli.prepare import recordedImage
from virby.cli.status import query
from virby.config import MIB, Config
from virby.errors import VirbyError
from virby.hostfacts import (
    LAUNCHCTL,
    LSOF,
    NIX,
    NIX_ELSEWHERE,
    NIX_MACHINES,
    NO_SUCH_SERVICE,
    PS,
    SOCKETFILTERFW,
    SSH,
    HostCommandError,
    HostFacts,
    Runner,
    configOfCommandLine,
    defaultRunner,
    gather,
    parseLaunchctl,
    parseLsof,
    parseMachines,
    parseNixConfig,
    parseSshOptions,
)
from virby.keys import HOST_KEY_ALIAS
from virby.layout import (
    AUTHORIZED_KEY,
    BASE_IMAGE,
    CLIENT_KEY,
    CONTROL_SOCKET,
    DIFF_IMAGE,
    HOST_KEY,
    HOST_PUBLIC_KEY,
    IMAGE_DERIVATION,
    IMAGE_FAILURE,
    KNOWN_HOSTS,
    MAC,
    NO_IMAGE_FIX,
    PREPARE_FIX,
    PREPARED_MODES,
    PREVIOUS_CLIENT_KEY,
    PREVIOUS_SHARED_CLIENT_KEY,
    PRIVATE_DIRECTORY,
    SERIAL_LOG,
    SHARED_CLIENT_KEY,
    SSHD_KEYS,
    VFKIT_PIDFILE,
    WorkingDirectoryError,
    checkWorkingDirectory,
    directoryMode,
)
from virby.leases import GUEST_HOSTNAME, Lease, newestIp, normalizeMac, parseLeases
from virby.sshconfig import HOST as SSH_HOST
from virby.vfkitflags import VfkitNotFound, findVfkit, parseVfkitVersion, vfkitNeeds
from virby.wire import LAUNCHD_LABEL

#: Free space below which the VM's disk cannot take even one large build's output, so writes
#: in the guest would fail: less than this (or than all the disk may still grow) fails.
ROOM_TO_BUILD = 5 * 1024**3

BOOTPD = "/usr/libexec/bootpd"
#: The user launchd runs the daemon as (C{nix/module.nix}).
DAEMON_USER = "_virby"
#: bootpd's pool for the VMs' NAT network, a /24: .2 to .254.
POOL_SIZE = 253
#: Unexpired leases from which the pool may run out: bootpd takes back an expired lease only
#: when no free address is left, and a lease lasts a day.
POOL_CROWDED = 200
#: How long a boot may go without a lease before that says bootpd is not answering.
LEASE_GRACE = 30.0
#: ssh gets start-timeout plus this: a cold boot, then the login.
SSH_MARGIN = 30.0
#: The system the VM builds natively: nixpkgs 26.11 builds Virby for aarch64-darwin only.
LINUX_SYSTEM = "aarch64-linux"
#: How C{nix config show} is asked: the new command, else (Nix before 2.20) the old one.
NIX_CONFIG_SHOW = (
    (NIX, "--extra-experimental-features", "nix-command", "config", "show"),
    (NIX, "--extra-experimental-features", "nix-command", "show-config"),
)
SWITCH_FIX = "darwin-rebuild switch (the module writes it from services.virby)"


class Status(enum.Enum):
    OK = "ok"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"
    SUDO = "needs-sudo"


_MARKS = {
    Status.OK: "ok",
    Status.FAIL: "FAIL",
    Status.WARN: "warn",
    Status.SKIP: "skip",
    Status.SUDO: "sudo",
}


@dataclass(frozen=True)
class Finding:
    """One check's outcome: C{detail} says what was found, C{fix} what to run about it."""

    check: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{_MARKS[self.status]:<4}  {self.check:<11}  {self.detail}{fix}"

    def document(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


class _Finished(Exception):
    """A check reached its verdict early."""

    def __init__(self, finding: Finding) -> None:
        self.finding = finding


@dataclass
class _Seen:
    """What one check learnt that a later one uses."""

    daemon_pids: set[int] = field(default_factory=set)
    daemon: dict[str, Any] | None = None
    owner: int | None = None
    working_directory: bool = True
    leases: list[Lease] | None = None
    vm_ip: str | None = None
    machines_file: str = NIX_MACHINES
    machines_inline: str | None = None
    ssh_config: str | None = None


class Doctor:
    """
    Runs the checks in order.

    @param runner: the Mac (L{defaultRunner} by default).
    @param configFile: the config file that was read, named in the fixes so they can be
        pasted as they are; C{None} when none was (the C{config} check fails, and it alone
        is run).
    @param euid: whose rights the checks have (root sees everything).
    @param now: the wall clock, to age leases and files (never to schedule anything).
    @param statvfs: the free space of a volume.
    @param ask: the daemon's status document from its control socket (L{query}).
    @param askAs: how the shared directories are asked about as that user
        (L{shares.askAs}).
    @param user: who runs this (the user behind C{sudo}), for what Nix trusts them with.
    """

    def __init__(
        self,
        config: Config,
        runner: Runner | None = None,
        *,
        configFile: str | None = None,
        ssh: bool = False,
        euid: int | None = None,
        now: Callable[[], float] = time.time,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
        ask: Callable[[str], dict[str, Any]] | None = None,
        askAs: shares.Ask | None = None,
        user: str | None = None,
    ) -> None:
        self.config = config
        self.runner = runner or defaultRunner()
        self.configRead = configFile
        self.configFile = configFile or "FILE"
        self.ssh = ssh
        self.euid = os.geteuid() if euid is None else euid
        self.now = now
        self.statvfs = statvfs
        self.ask = ask or query
        self._ask_as = askAs
        self.user = user if user is not None else _caller()
        self.seen = _Seen()
        self._facts: HostFacts | None = None

    def checks(self) -> list[tuple[str, Callable[[], Finding]]]:
        listed = [
            ("config", self.configCheck),
            ("launchd", self.launchd),
            ("daemon", self.daemon),
            ("port", self.port),
            ("working-dir", self.workingDirectory),
            ("files", self.files),
            ("keys", self.keys),
            ("image", self.image),
            ("vfkit", self.vfkit),
        ]
        if self.config.shared_dirs:
            listed.append(("shared-dirs", self.sharedDirectories))
        if self.config.rosetta:
            listed.append(("rosetta", self.rosetta))
        if self.config.nested_virtualization:
            listed.append(("nested", self.nested))
        listed += [
            ("nix-settings", self.nixSettings),
            ("machines", self.machines),
            ("ssh-config", self.sshConfig),
        ]
        # ssh before the leases: when it boots the VM, they are checked for that boot.
        listed += [
            ("ssh", self.sshLogin),
            ("dhcp-lease", self.dhcpLease),
            ("lease-pool", self.leasePool),
            ("disk-space", self.diskSpace),
        ]
        return listed

    def run(self) -> list[Finding]:
        findings = []
        for name, check in self.checks():
            try:
                finding = check()
            except _Finished as done:
                finding = done.finding
            findings.append(Finding(name, finding.status, finding.detail, finding.fix))
            if name == "config" and finding.status is Status.FAIL:
                break  # every other check would judge the defaults, not this Mac's builder
        return findings

    # -- helpers

    @property
    def root(self) -> bool:
        return self.euid == 0

    def _prepareFix(self) -> str:
        owner = self._ownerName(self.seen.owner)
        hand = f" --owner {owner}" if owner and owner != "root" else ""
        return (
            f"sudo virby prepare --config {self.configFile}{hand} "
            "(darwin-rebuild switch runs it; the daemon then moves onto what it made)"
        )

    def _restartFix(self) -> str:
        return RESTART_FIX

    @staticmethod
    def _ownerName(uid: int | None) -> str | None:
        if uid is None:
            return None
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return str(uid)
        try:
            group = grp.getgrgid(entry.pw_gid).gr_name
        except KeyError:
            return entry.pw_name
        return f"{entry.pw_name}:{group}" if entry.pw_name == DAEMON_USER else entry.pw_name

    def _read(self, name: str, what: str) -> bytes:
        """A file of the working directory; a missing one fails, an unreadable one asks sudo."""
        data = self._readIfThere(name, what)
        if data is None:
            raise _Finished(fail(f"{name} is missing", self._prepareFix()))
        return data

    def _readIfThere(self, name: str, what: str) -> bytes | None:
        """A file of the working directory, or C{None}; an unreadable one asks sudo."""
        try:
            with open(self.config.path(name), "rb") as f:
                return f.read()
        except PermissionError:
            raise _Finished(sudo(what)) from None
        except FileNotFoundError:
            return None

    # -- the checks

    def configCheck(self) -> Finding:
        if self.configRead is None:
            return fail(
                f"no --config given, and {INSTALLED_CONFIG} is not installed: nothing says "
                "how this builder is set up",
                "darwin-rebuild switch with services.virby.enable installs it; "
                "or name the config: virby doctor --config FILE",
            )
        installed = " (the one the module installs)" if self.configRead == INSTALLED_CONFIG else ""
        return ok(f"read {self.configRead}{installed}")

    def launchd(self) -> Finding:
        try:
            text = self.runner.run([LAUNCHCTL, "print", f"system/{LAUNCHD_LABEL}"])
        except HostCommandError as e:
            if e.status == NO_SUCH_SERVICE or "Could not find service" in str(e):
                return fail(
                    f"{LAUNCHD_LABEL} is not loaded",
                    LOAD_FIX,
                )
            return skip(f"cannot ask launchd: {e}")
        job = parseLaunchctl(text)
        pid = job.get("pid")
        if job.get("state") == "running" and pid and pid.isdigit():
            self.seen.daemon_pids.add(int(pid))
            return ok(f"{LAUNCHD_LABEL} is running (pid {pid})")
        code = job.get("last exit code")
        exited = f", last exit code {code}" if code and code != "(never exited)" else ""
        if self.config.on_demand:
            return ok(f"{LAUNCHD_LABEL} is loaded and waits for the first build{exited}")
        state = job.get("state") or "not running"
        return fail(f"{LAUNCHD_LABEL} is loaded but {state}{exited}", self._restartFix())

    def daemon(self) -> Finding:
        path = self.config.path(CONTROL_SOCKET)
        try:
            document = self.ask(path)
        except DaemonDown as e:
            if self.config.on_demand:
                return ok("not running yet: launchd starts it at the first build (on-demand)")
            return fail(str(e), self._restartFix())
        except NotAllowed:
            return sudo("the control socket is owner-only")
        except VirbyError as e:
            return fail(str(e), self._restartFix())
        self.seen.daemon = document
        if isinstance(document.get("daemon_pid"), int):
            self.seen.daemon_pids.add(document["daemon_pid"])
        self.seen.vm_ip = document.get("vm_ip")
        detail = f"answers (pid {document.get('daemon_pid', '?')}); VM {document.get('state')}"
        warnings = document.get("warnings") or []
        if warnings:
            return warn(f"{detail}; {'; '.join(warnings)}")
        error = document.get("last_error")
        if error and document.get("state") != "running":
            return warn(f"{detail}; last error: {error}", f"read {DAEMON_LOG}")
        return ok(detail + (f"; last error: {error}" if error else ""))

    def port(self) -> Finding:
        where = f"127.0.0.1:{self.config.builderPort}"
        if not self.root:
            return sudo(f"who holds {where}")
        argv = [LSOF, "+c", "0", "-nP", f"-iTCP@{where}", "-sTCP:LISTEN", "-Fpc"]
        try:
            output = self.runner.run(argv)
        except HostCommandError as e:
            if e.status != 1:  # lsof's "found nothing" is status 1
                return skip(f"cannot run lsof: {e}")
            output = ""
        holders = parseLsof(output)
        if not holders:
            return fail(f"nothing listens on {where}", self._restartFix())
        strangers = [(pid, command) for pid, command in holders if not self._ours(pid, command)]
        if strangers:
            pid, command = strangers[0]
            other = self._otherVirby(pid)
            if other is not None:
                return fail(
                    f"{where} is held by another Virby daemon (pid {pid}), which runs with "
                    f"--config {other}, not by this config's",
                    f"stop that one (its launchd job, or sudo kill {pid}) if {other} is left "
                    "over, or give the two configs different ports (services.virby.port)",
                )
            return fail(
                f"{where} is held by {command} (pid {pid}), not by the daemon",
                f"stop it (sudo kill {pid}), or set services.virby.port to a free port",
            )
        names = ", ".join(f"{command} (pid {pid})" for pid, command in holders)
        return ok(f"{where} is held by {names}")

    def _otherVirby(self, pid: int) -> str | None:
        """
        The config another Virby daemon holding the port runs with, from its command line
        (on macOS its command's name is Python's, so only the line tells): C{None} when the
        process is not one, or its line cannot be read.
        """
        try:
            line = self.runner.run([PS, "-ww", "-o", "command=", "-p", str(pid)])
        except HostCommandError:
            return None
        if "virby" not in line:
            return None
        other = configOfCommandLine(line)
        return other if other is not None and other != self.configRead else None

    def _ours(self, pid: int, command: str) -> bool:
        """
        launchd holds the socket it hands over; the daemon holds it once it runs, by the pid
        launchd or the daemon itself gave (its name says little: on macOS it is Python's).
        """
        return pid == 1 or pid in self.seen.daemon_pids

    def workingDirectory(self) -> Finding:
        wd = self.config.working_directory
        try:
            # Whether the daemon's user can write there is what its mode and owner say.
            info = checkWorkingDirectory(wd, writable=False)
        except WorkingDirectoryError as e:
            if e.denied:
                return sudo(f"{wd}")
            self.seen.working_directory = False
            prepare = self._prepareFix()
            return fail(e.problem, prepare if e.fix == PREPARE_FIX else f"{e.fix}, then {prepare}")
        assert info is not None
        self.seen.owner = info.st_uid
        expected = self._daemonUser()
        want = directoryMode(self.config.allow_user_ssh)
        mode = stat.S_IMODE(info.st_mode)
        problems = []
        if mode != want:
            problems.append(f"its mode is {mode:04o}, not {want:04o}")
        if expected is not None and info.st_uid != expected:
            problems.append(
                f"it is {self._ownerName(info.st_uid)}'s, not the daemon's user "
                f"{self._ownerName(expected)}'s"
            )
            self.seen.owner = expected
        if problems:
            return fail(f"{wd}: {'; '.join(problems)}", self._prepareFix())
        return ok(f"{wd}, mode {mode:04o}, {self._ownerName(info.st_uid)}'s")

    def _daemonUser(self) -> int | None:
        """Who the daemon runs as: its control socket's owner, else the module's user."""
        try:
            return os.lstat(self.config.path(CONTROL_SOCKET)).st_uid
        except OSError:
            return self.runner.userId(DAEMON_USER)

    def daemonAccount(self) -> shares.Account | None:
        """
        Who the daemon runs as, with its group: its control socket's owner and group, else the
        module's user (asked through the runner, as L{_daemonUser} does) with its own group;
        C{None} when neither is there.
        """
        try:
            info = os.lstat(self.config.path(CONTROL_SOCKET))
        except OSError:
            uid = self.runner.userId(DAEMON_USER)
            return None if uid is None else shares.Account(DAEMON_USER, uid)
        account = shares.Account.of(info.st_uid, info.st_gid)
        return account or shares.Account(str(info.st_uid), info.st_uid, info.st_gid)

    def _needsWorkingDirectory(self) -> None:
        if not self.seen.working_directory:
            raise _Finished(skip("no working directory (see working-dir)"))

    def files(self) -> Finding:
        self._needsWorkingDirectory()
        problems: list[str] = []
        owner = self.seen.owner
        wanted = dict(PREPARED_MODES)
        wanted[SSHD_KEYS] = PRIVATE_DIRECTORY
        for name, mode in wanted.items():
            try:
                info = os.lstat(self.config.path(name))
            except FileNotFoundError:
                if self._required(name):
                    problems.append(f"{name} is missing")
                continue
            except PermissionError:
                return sudo("the working directory's files")
            if name in _SHARED_KEYS and not self.config.allow_user_ssh:
                problems.append(f"{name} exists though allow-user-ssh is off")
                continue
            directory = name == SSHD_KEYS
            if not (stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)):
                problems.append(f"{name} is not a {'directory' if directory else 'file'}")
            elif stat.S_IMODE(info.st_mode) != mode:
                problems.append(f"{name} is {stat.S_IMODE(info.st_mode):04o}, not {mode:04o}")
            elif owner is not None and info.st_uid != owner:
                problems.append(f"{name} is {self._ownerName(info.st_uid)}'s")
        if problems:
            return fail("; ".join(problems), self._prepareFix())
        return ok(f"present, with prepare's modes and owner ({self._ownerName(owner)})")

    def _required(self, name: str) -> bool:
        if name == SHARED_CLIENT_KEY:
            return self.config.allow_user_ssh
        if name in (PREVIOUS_CLIENT_KEY, PREVIOUS_SHARED_CLIENT_KEY):
            return False  # only from a new image to the next boot (virby.rotation)
        if name == DIFF_IMAGE:
            return not self.config.ephemeral  # made before each boot
        # Written only with the module's derivation, and only while there is no image.
        return name not in (IMAGE_DERIVATION, IMAGE_FAILURE)

    def keys(self) -> Finding:
        self._needsWorkingDirectory()
        what = "the keys"
        host_private = self._read(HOST_KEY, what)
        client_private = self._read(CLIENT_KEY, what)
        host_public = self._read(HOST_PUBLIC_KEY, what)
        authorized = self._read(AUTHORIZED_KEY, what)
        known_hosts = self._read(KNOWN_HOSTS, what)
        problems = []
        try:
            host = keys.publicOfPrivate(host_private)
            client = keys.publicOfPrivate(client_private)
        except ValueError:
            return fail("a private key is not an OpenSSH ed25519 key", self._prepareFix())
        if _bare(authorized) != client:
            problems.append(
                f"the client key {CLIENT_KEY} does not match the key the guest authorizes "
                f"({AUTHORIZED_KEY})"
            )
        if _bare(host_public) != host:
            problems.append(f"{HOST_PUBLIC_KEY} is not the public half of the VM's host key")
        # A second line pins the previous set's host key, for a VM of the image before.
        pinned = keys.pinnedKeys(known_hosts.decode("ascii", "replace"))
        if pinned is None or pinned[0] != host:
            problems.append(f"{KNOWN_HOSTS} does not pin the VM's host key")
        if self.config.allow_user_ssh:
            shared = self._read(SHARED_CLIENT_KEY, what)
            if shared != client_private:
                problems.append(f"{SHARED_CLIENT_KEY} is not the client key")
            problems.extend(self._previousShared())
        if problems:
            return fail("; ".join(problems), self._prepareFix())
        kept = (
            "; the previous keys are kept for a VM of the image before, until the next boot"
            if pinned is not None and len(pinned) == 2
            else ""
        )
        return ok(f"the client key is the one the guest authorizes; the host key is pinned{kept}")

    def _previousShared(self) -> list[str]:
        """With allow-user-ssh, the previous client key's copy is that key, while it is kept."""
        previous = self._readIfThere(PREVIOUS_CLIENT_KEY, "the keys")
        if previous is None:
            return []
        if self._readIfThere(PREVIOUS_SHARED_CLIENT_KEY, "the keys") != previous:
            return [f"{PREVIOUS_SHARED_CLIENT_KEY} is not the previous client key"]
        return []

    def image(self) -> Finding:
        image = self.config.image
        if image is None:
            return fail('no "image" in the config', "the nix-darwin module sets it; switch again")
        try:
            recorded = recordedImage(self.config)
        except PermissionError:
            return sudo("the image record")
        if not os.path.isfile(image):
            try:
                with open(self.config.path(IMAGE_FAILURE), "rb") as f:
                    why = f.readline().decode("utf-8", "replace").strip()
            except OSError:
                why = ""
            because = f" ({why})" if why else ""
            older = "" if recorded is None else f"; the VM boots {recorded} until then"
            return fail(f"no image yet: {image} does not exist{because}{older}", NO_IMAGE_FIX)
        if recorded is None:
            return fail("virby prepare never made the disks", self._prepareFix())
        if recorded != image:
            return fail(
                f"the disks were made from {recorded}, but the config names {image}",
                self._prepareFix(),
            )
        try:
            os.stat(self.config.path(BASE_IMAGE))
        except FileNotFoundError:
            return fail(f"{BASE_IMAGE} is missing", self._prepareFix())
        except PermissionError:
            return sudo(BASE_IMAGE)
        return ok(f"the disks were made from {image}")

    def vfkit(self) -> Finding:
        try:
            path = findVfkit(self.config.vfkit)
        except VfkitNotFound as e:
            return fail(str(e))
        try:
            said = self.runner.run([path, "--version"]).strip()
        except HostCommandError as e:
            return fail(f"{path} --version failed: {e}", "reinstall vfkit (nixpkgs#vfkit)")
        needed = vfkitNeeds(self.config)
        version = parseVfkitVersion(said)
        if version is None:
            return warn(f"{path} says {said!r}: cannot tell which flags it has")
        lacking = [(what, since) for what, since in needed.items() if version < since]
        if lacking:
            newest = max(since for _, since in lacking)
            missing = ", ".join(f"{what} (since {_version(since)})" for what, since in lacking)
            return fail(
                f"vfkit {_version(version)} at {path} lacks {missing}",
                f"install vfkit {_version(newest)} or later (nixpkgs#vfkit)",
            )
        newest = max(needed.values())
        return ok(
            f"vfkit {_version(version)} at {path} has every flag this config passes "
            f"(they need {_version(newest)})"
        )

    def sharedDirectories(self) -> Finding:
        account = self.daemonAccount()
        name = account.name if account is not None else DAEMON_USER
        ask = self._ask_as or partial(shares.askAs, euid=self.euid)
        reach = shares.check(self.config.shared_dirs, account, ask)
        if reach.unreachable:
            problems = "; ".join(
                f'"{found.tag}" ({found.directory}): {found.problem}' for found in reach.unreachable
            )
            fixes = "; ".join(f'"{found.tag}": {found.fix}' for found in reach.unreachable)
            return fail(f"{problems}; vfkit runs as {name} and stops every boot there", fixes)
        if isinstance(reach.unknown, shares.CannotAsk):
            return sudo(f"whether {name} can reach the shared directories")
        if isinstance(reach.unknown, shares.NoAccount):
            return skip(f"no user {name} yet (darwin-rebuild switch makes it)")
        if reach.unknown is not None:
            return warn(f"cannot tell whether {name} can reach the shares: {reach.unknown}")
        reached = ", ".join(f'"{tag}" ({self.config.shared_dirs[tag]})' for tag in reach.reachable)
        return ok(f"{name} can reach {reached}")

    def _host(self) -> HostFacts:
        if self._facts is None:
            self._facts = gather(self.runner)
        return self._facts

    def rosetta(self) -> Finding:
        verdict = self._host().rosetta()
        if verdict.ok:
            return ok(verdict.why)
        if verdict.ok is None:
            return warn(verdict.why)
        return fail(f"{verdict.why}; no VM boots until then", verdict.fix)

    def nested(self) -> Finding:
        verdict = self._host().nestedVirtualization()
        if verdict.ok:
            return ok(verdict.why)
        if verdict.ok is None:
            return warn(verdict.why)
        return fail(
            f"this Mac cannot nest: {verdict.why}; the daemon boots the VM without --nested",
            "turn services.virby.nestedVirtualization off",
        )

    def dhcpLease(self) -> Finding:
        path = self.config.leases_file
        mac = self._mac()
        try:
            # As the daemon reads it (L{virby.leases.LeaseFile}): a link in its place is refused.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, encoding="utf-8", errors="replace") as f:
                info = os.fstat(f.fileno())
                self.seen.leases = leases = parseLeases(f.read())
        except FileNotFoundError:
            if mac is None:
                return ok(f"no {path} yet: bootpd writes it at the VM's first boot")
            return fail(
                f"no {path}, though the VM has booted before: bootpd never gave it an address",
                self._firewall(),
            )
        except PermissionError:
            return fail(
                f"{path} is not readable", f"sudo chmod 644 {path} (bootpd keeps it readable)"
            )
        except OSError as e:
            return fail(
                f"cannot read {path}: {e.strerror or e}",
                "set leases-file to bootpd's lease file, /var/db/dhcpd_leases",
            )
        ip = newestIp(leases, mac) if mac else None
        self.seen.vm_ip = ip or self.seen.vm_ip
        started = self._bootStarted()
        if started is not None:
            ago = self.now() - started
            if ip is not None and info.st_mtime >= started:
                return ok(f"bootpd gave {mac} {ip} for the running VM")
            if ago < LEASE_GRACE:
                return ok(f"the VM started {ago:.0f}s ago and has no lease yet")
            return fail(
                f"no lease for {mac} since the VM started {ago:.0f}s ago: bootpd did not answer",
                self._firewall(),
            )
        error = (self.seen.daemon or {}).get("last_error") or ""
        if "no DHCP lease" in error:
            return fail(f"the last boot got no address ({error})", self._firewall())
        if ip is not None:
            return ok(f"bootpd gave {mac} {ip}; the VM is not running")
        duid = [lease for lease in leases if lease.name == GUEST_HOSTNAME and lease.isDuid]
        if duid:
            return fail(
                f"bootpd keyed {GUEST_HOSTNAME}'s lease by a DUID, not its MAC: the daemon "
                "cannot find it",
                'the image must send its MAC as DHCP client id (dhcpcd clientid "")',
            )
        if mac is None:
            return ok(f"{path} is readable; the VM has not booted yet")
        return warn(f"no lease for {mac} in {path}; the next boot asks bootpd again")

    def _mac(self) -> str | None:
        try:
            with open(self.config.path(MAC), encoding="ascii", errors="replace") as f:
                return normalizeMac(f.read())
        except OSError:
            return None

    def _bootStarted(self) -> float | None:
        """When the VM now running (or booting) was started: its pidfile is written then."""
        try:
            return os.stat(self.config.path(VFKIT_PIDFILE)).st_mtime
        except OSError:
            return None

    def _firewall(self) -> str:
        """What the application firewall says, and how to let bootpd through it."""
        state = "the firewall's state is unknown"
        try:
            answer = self.runner.run([SOCKETFILTERFW, "--getglobalstate"])
            on = _saysOn(answer)
            if on is not None:
                state = f"the firewall is {'on' if on else 'off'}"
            if on:
                block_all = _saysOn(self.runner.run([SOCKETFILTERFW, "--getblockall"]))
                if block_all:
                    state += " and blocks all incoming connections"
        except HostCommandError:
            pass
        if state == "the firewall is off":
            # Nothing to let through: what stops bootpd is elsewhere.
            return (
                f"{state}, so it is not what keeps bootpd from answering; read the VM's "
                f"console for its DHCP client (sudo tail {self.config.path(SERIAL_LOG)}, "
                "kept with debug on) and whether bootpd runs "
                "(sudo launchctl print system/com.apple.bootpd)"
            )
        steps = [
            f"{state}; check `{SOCKETFILTERFW} --getglobalstate` and `--listapps`",
            f"let bootpd through: `sudo {SOCKETFILTERFW} --add {BOOTPD} --unblockapp {BOOTPD}`",
        ]
        if "blocks all" in state:
            steps.append(f"`sudo {SOCKETFILTERFW} --setblockall off`")
        return "; ".join(steps)

    def leasePool(self) -> Finding:
        leases = self.seen.leases
        if leases is None:
            return skip("no lease file was read")
        net = _pool(leases, self.seen.vm_ip)
        if net is None:
            return ok(f"{len(leases)} leases, none in a pool of the VM's")
        now = self.now()
        active = [
            lease
            for lease in leases
            if lease.lease > now and ipaddress.ip_address(lease.ip_address) in net
        ]
        detail = (
            f"{len(active)} unexpired leases in {net} ({len(leases)} entries), "
            f"of {POOL_SIZE} addresses"
        )
        if len(active) >= POOL_CROWDED:
            return fail(
                f"{detail}: the pool may run out",
                "bootpd takes back expired leases only when the pool is full: while no VM "
                f"runs, delete the entries of VMs you no longer use from {self.config.leases_file}",
            )
        return ok(detail)

    def diskSpace(self) -> Finding:
        name = DIFF_IMAGE
        if self.config.ephemeral or not os.path.lexists(self.config.path(DIFF_IMAGE)):
            name = BASE_IMAGE  # what the next fresh disk starts from
        try:
            info = os.stat(self.config.path(name))
            volume = self.statvfs(self.config.working_directory)
        except FileNotFoundError:
            return skip(f"no {name} yet")
        except PermissionError:
            return sudo(name)
        final = max(self.config.disk_size, info.st_size)
        allocated = info.st_blocks * 512
        growth = max(0, final - allocated)
        free = volume.f_bavail * volume.f_frsize
        detail = (
            f"{name} may take {_gib(growth)} more (up to {_gib(final)}, {_gib(allocated)} "
            f"now), and its volume has {_gib(free)} free"
        )
        fix = (
            "free space on that volume, or lower diskSize (a disk never shrinks: a smaller "
            "size takes effect with a new image, or at the next boot with ephemeral)"
        )
        if free < min(growth, ROOM_TO_BUILD):
            return fail(detail, fix)
        if free < growth:
            # A sparse disk takes its size only as builds fill it: the builder works today.
            return warn(detail, fix)
        return ok(detail)

    def sshLogin(self) -> Finding:
        if not self.ssh:
            return skip(f"not tried: `virby doctor --ssh` runs `{SSH_AS_NIX_TEXT}` (boots the VM)")
        if not self.root and not self.config.allow_user_ssh:
            return sudo("ssh virby-vm with the root-only client key")
        limit = self.config.start_timeout + SSH_MARGIN
        started = time.monotonic()
        try:
            said = self.runner.run(SSH_AS_NIX, timeout=limit).strip()
        except HostCommandError as e:
            return fail(f"{SSH_AS_NIX_TEXT} failed: {e}", self._sshFix(str(e)))
        return ok(
            f"{SSH_AS_NIX_TEXT} answered in {time.monotonic() - started:.1f}s"
            + (f" ({said})" if said else "")
        )

    def _sshFix(self, said: str) -> str:
        """What to do about ssh's own last line (docs/symptoms.md has each)."""
        if self.seen.ssh_config is not None:
            return f"first the ssh-config check's problem: {self.seen.ssh_config}"
        if "Could not resolve hostname" in said:
            return _NO_HOST_BLOCK_FIX
        if "Connection refused" in said:
            return (
                "nothing listens on the builder's port: see the launchd and port checks; "
                + LOAD_FIX
            )
        if "host key" in said.lower() or "Host key verification failed" in said:
            if not self.root:
                return "run it as root (sudo), as Nix does, or set allowUserSsh = true"
            return f"{self._prepareFix()}; a VM still running with old keys: sudo virby stop"
        if "Permission denied" in said:
            return f"the guest refused the client key: {self._prepareFix()}"
        if "kex_exchange_identification" in said or "Connection closed" in said:
            return (
                "the daemon closed the connection: the VM did not boot; "
                f"`sudo virby start --config {self.configFile}` shows why, as does {DAEMON_LOG}"
            )
        if "not found" in said or "No such file" in said:
            return "the guest has no nix-daemon on its PATH: the image is not Virby's"
        return f"see `sudo virby status --config {self.configFile}` and {DAEMON_LOG}"

    # -- the Nix side: what makes Nix pick the builder at all

    def _nixSettings(self) -> dict[str, str] | None:
        """The first answer of the first Nix found: C{PATH}'s, else a profile's."""
        for nix in (NIX, *NIX_ELSEWHERE):
            for argv in NIX_CONFIG_SHOW:
                try:
                    return parseNixConfig(self.runner.run((nix, *argv[1:])))
                except HostCommandError as e:
                    if e.status is None:
                        break  # this nix is not there (or hung): try the next one
        return None

    def nixSettings(self) -> Finding:
        settings = self._nixSettings()
        if settings is None:
            return warn(
                "cannot ask Nix for its settings (nix config show, nix show-config)",
                "run it where `nix` is on PATH",
            )
        builders = settings.get("builders", "")
        notes: list[str] = []
        problem = None
        references = [word[1:] for word in re.split(r"[\s;]+", builders) if word.startswith("@")]
        if references:
            self.seen.machines_file = references[0]
        elif SSH_HOST in builders:
            self.seen.machines_inline = builders.replace(";", "\n")
        if not builders.strip():
            problem = fail(
                "Nix's builders setting is empty: Nix reads no machines file, so it never "
                "builds on virby-vm (nix-darwin empties it when distributed builds are off)",
                "nix.distributedBuilds = true (the module sets it unless overridden), then "
                "darwin-rebuild switch",
            )
        elif not references and SSH_HOST not in builders:
            problem = fail(
                f"Nix's builders setting is {builders!r}: it reads no machines file and does "
                f"not name {SSH_HOST}",
                f"builders = @{NIX_MACHINES} (Nix's default; remove the setting that "
                "overrides it), then darwin-rebuild switch",
            )
        else:
            notes.append(f"builders = {builders}")
        user = self.user
        trusted = settings.get("trusted-users", "").split()
        if (
            user
            and user != "root"
            and user not in trusted
            and not any(entry.startswith("@") or entry == "*" for entry in trusted)
        ):
            notes.append(
                f"{user} is not in trusted-users ({' '.join(trusted) or 'none'}): a --builders "
                "of theirs is ignored, and the daemon's own list is used"
            )
        if problem is not None:
            return problem
        if settings.get("builders-use-substitutes") != "true":
            notes.append(
                "builders-use-substitutes is not true: the Mac copies every input to the VM "
                "instead of the VM fetching them from the caches"
            )
            return warn("; ".join(notes), "nix.settings.builders-use-substitutes = true")
        return ok("; ".join(notes))

    def machines(self) -> Finding:
        path = self.seen.machines_file
        try:
            if self.seen.machines_inline is not None:
                path = "the builders setting"
                listed = parseMachines(self.seen.machines_inline)
            else:
                listed = parseMachines(self.runner.readText(path))
        except FileNotFoundError:
            listed = None
        except PermissionError:
            return sudo(path)
        except OSError as e:
            return fail(f"cannot read {path}: {e.strerror or e}", SWITCH_FIX)
        fix = (
            "darwin-rebuild switch: nix-darwin writes it from nix.buildMachines (with "
            "nix.enable on), Determinate's module from determinateNix.buildMachines"
        )
        if listed is None:
            return fail(f"no {path}: Nix knows no remote builders", fix)
        ours = [m for m in listed if m.host == SSH_HOST]
        if not ours:
            names = ", ".join(m.uri for m in listed) or "none"
            return fail(f"{path} lists no {SSH_HOST} (it lists {names})", fix)
        machine = ours[0]
        systems, features = self._wantedMachine()
        problems = []
        if machine.systems != systems:
            problems.append(f"systems {_words(machine.systems)}, not {_words(systems)}")
        if machine.supportedFeatures != features:
            problems.append(f"features {_words(machine.supportedFeatures)}, not {_words(features)}")
        if machine.mandatoryFeatures:
            problems.append(
                f"mandatory features {_words(machine.mandatoryFeatures)}: Nix sends it only "
                "builds that ask for them"
            )
        if problems:
            return fail(
                f"{path} lists {machine.uri} with {'; '.join(problems)} (as this config implies)",
                fix,
            )
        return ok(f"{path} lists {machine.uri} for {_words(systems)} with {_words(features)}")

    def _wantedMachine(self) -> tuple[frozenset[str], frozenset[str]]:
        """The systems and features C{nix/module.nix} registers for this config."""
        systems = {LINUX_SYSTEM}
        if self.config.rosetta:
            systems.add("x86_64-linux")
        features = {"benchmark", "big-parallel"}
        if self.config.nested_virtualization:
            features |= {"kvm", "nixos-test"}
        return frozenset(systems), frozenset(features)

    def sshConfig(self) -> Finding:
        try:
            options = parseSshOptions(self.runner.run([SSH, "-G", SSH_HOST]))
        except HostCommandError as e:
            return warn(f"ssh -G {SSH_HOST} failed: {e}")
        who = "root's ssh" if self.root else f"{_caller() or 'your'} ssh (Nix connects as root)"

        def first(keyword: str) -> str:
            return (options.get(keyword) or [""])[0]

        if first("hostname") in (SSH_HOST, ""):
            self.seen.ssh_config = f"{who} has no Host {SSH_HOST} block"
            return fail(
                f"{who} has no Host {SSH_HOST} block: it would look {SSH_HOST} up in DNS "
                "(ssh: Could not resolve hostname)",
                _NO_HOST_BLOCK_FIX,
            )
        problems = []
        if first("hostname") != "127.0.0.1":
            problems.append(f"hostname {first('hostname')}, not 127.0.0.1")
        if first("port") != str(self.config.builderPort):
            problems.append(f"port {first('port')}, not {self.config.builderPort}")
        if first("hostkeyalias") != HOST_KEY_ALIAS:
            problems.append(f"hostkeyalias {first('hostkeyalias') or 'none'}, not {HOST_KEY_ALIAS}")
        keys_ = {self.config.path(CLIENT_KEY), self.config.path(SHARED_CLIENT_KEY)}
        if not keys_ & set(options.get("identityfile", [])):
            problems.append(f"identityfile is not {self.config.path(CLIENT_KEY)}")
        known = " ".join(options.get("userknownhostsfile", [])).split()
        if self.config.path(KNOWN_HOSTS) not in known:
            problems.append(f"userknownhostsfile is not {self.config.path(KNOWN_HOSTS)}")
        if problems:
            self.seen.ssh_config = f"{who} reaches {SSH_HOST} with " + "; ".join(problems)
            return fail(
                self.seen.ssh_config,
                "the block must be what `virby prepare --print-ssh-config` prints: "
                "darwin-rebuild switch installs it; remove a Host virby-vm block or "
                "-o option of your own that comes first",
            )
        return ok(
            f"{who} reaches {SSH_HOST} at 127.0.0.1:{first('port')} with the pinned key "
            f"{HOST_KEY_ALIAS}"
        )


#: How Nix runs ssh for an C{ssh-ng://virby-vm} builder: C{ssh HOST -x} (no X11), its
#: options, then the program the store protocol runs (C{nix-daemon --stdio}); here its
#: C{--version}, so that the login proves that program is there without speaking the
#: protocol.  BatchMode: nothing can answer a prompt, as nothing does for the daemon.
SSH_AS_NIX = (SSH, SSH_HOST, "-x", "-o", "BatchMode=yes", "--", "nix-daemon", "--version")
SSH_AS_NIX_TEXT = f"ssh {SSH_HOST} nix-daemon --version"
_NO_HOST_BLOCK_FIX = (
    "darwin-rebuild switch installs it as /etc/ssh/ssh_config.d/100-virby-vm.conf; "
    "/etc/ssh/ssh_config must keep its `Include /etc/ssh/ssh_config.d/*` line "
    "(a macOS update can replace that file)"
)


def _caller() -> str | None:
    """Who runs this: the user behind sudo, else the login."""
    user = os.environ.get("SUDO_USER")
    if user:
        return user
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None


def _words(values: Iterable[str]) -> str:
    return ",".join(sorted(values)) or "none"


# -- verdicts


def ok(detail: str) -> Finding:
    return Finding("", Status.OK, detail)


def fail(detail: str, fix: str | None = None) -> Finding:
    return Finding("", Status.FAIL, detail, fix)


def warn(detail: str, fix: str | None = None) -> Finding:
    return Finding("", Status.WARN, detail, fix)


def skip(detail: str) -> Finding:
    return Finding("", Status.SKIP, detail)


def sudo(what: str) -> Finding:
    return Finding("", Status.SUDO, f"{what}: only root can look", "run sudo virby doctor")


def _saysOn(text: str) -> bool | None:
    lowered = text.lower()
    state = re.search(r"state = (\d)", lowered)
    if state:
        return state.group(1) != "0"
    if "disabled" in lowered:
        return False
    if "enabled" in lowered or "block all non-essential" in lowered:
        return True
    return None


#: The copies of client keys that only allow-user-ssh keeps.
_SHARED_KEYS = (SHARED_CLIENT_KEY, PREVIOUS_SHARED_CLIENT_KEY)


def _bare(line: bytes) -> str | None:
    try:
        return keys.barePublic(line.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


#: bootpd leases IPv4 addresses; the lease file's parser takes either kind.
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _pool(leases: Iterable[Lease], ip: str | None) -> _Network | None:
    """The /24 bootpd hands the VM's addresses from: the VM's own, else the busiest."""
    if ip is not None:
        return ipaddress.ip_network(f"{ip}/24", strict=False)
    counts: dict[_Network, int] = {}
    for lease in leases:
        net = ipaddress.ip_network(f"{lease.ip_address}/24", strict=False)
        counts[net] = counts.get(net, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def _version(version: tuple[int, ...]) -> str:
    return "v" + ".".join(map(str, version))


def _gib(size: int) -> str:
    return f"{size / (1024 * MIB):.1f} GiB"


# -- the command


def run(
    config: Config,
    asJson: bool,
    ssh: bool = False,
    configFile: str | None = None,
    out: TextIO | None = None,
    runner: Runner | None = None,
    euid: int | None = None,
) -> int:
    """C{virby doctor}: 1 when any check failed, else 0 (checks that need root do not fail)."""
    out = out or sys.stdout
    findings = Doctor(config, runner, configFile=configFile, ssh=ssh, euid=euid).run()
    failed = [f for f in findings if f.status is Status.FAIL]
    needsRoot = [f for f in findings if f.status is Status.SUDO]
    if asJson:
        document = {
            "ok": not failed,
            "checks": [f.document() for f in findings],
            "needs_sudo": [f.check for f in needsRoot],
        }
        out.write(json.dumps(document, indent=2) + "\n")
    else:
        for finding in findings:
            out.write(finding.line() + "\n")
        out.write(_summary(findings, failed, needsRoot, configFile) + "\n")
    return 1 if failed else 0


def _summary(
    findings: list[Finding],
    failed: list[Finding],
    needsRoot: list[Finding],
    configFile: str | None,
) -> str:
    parts = []
    if failed:
        parts.append(f"{len(failed)} of {len(findings)} checks failed")
    else:
        parts.append("no check failed")
    if needsRoot:
        names = ", ".join(f.check for f in needsRoot)
        parts.append(
            f"{len(needsRoot)} need root ({names}): run "
            f"`sudo virby doctor --config {configFile or 'FILE'}`"
        )
    return "; ".join(parts)
