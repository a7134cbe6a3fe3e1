"""
What this Mac can do for the VM: nested virtualization and Rosetta, and how we found out.

vfkit refuses C{--nested} on a Mac that cannot run it ("nested virtualization is not
supported": Virtualization.framework offers it on Apple M3 or later with macOS 15 or later)
and refuses the C{rosetta} share when Rosetta is not installed ("rosetta is not
installed").  Either refusal, met at every boot, makes every boot fail.  The daemon asks
here once, before its reactor runs, and decides before it builds vfkit's command line;
C{virby doctor} asks the same questions to tell a person.

Every command run and every file looked at goes through one L{Runner}, so that a test can
play any Mac, and so that a report can say exactly what was asked (L{HostFacts.probes}).
C{virby doctor} asks the rest of what it needs of the Mac through the same runner: launchd
(C{launchctl print}), who holds the builder's port (C{lsof}), the application firewall
(C{socketfilterfw}), vfkit's version, C{ssh} (and what C{ssh -G} makes of C{virby-vm}),
the command line of a process (C{ps}), Nix's settings (C{nix config show}) and its machines
file.
On macOS the runner runs the commands (L{MacRunner}); elsewhere there is no Mac to ask, and
L{PlayedMac} answers for the Mac that the vfkit emulator plays, set by the same
C{VIRBY_EMULATOR_CPU}, C{VIRBY_EMULATOR_MACOS} and C{VIRBY_EMULATOR_ROSETTA} variables the
emulator reads, so a daemon on Linux and its emulated vfkit agree on what the Mac can do.

The commands are blocking by nature: this module is for start-up (before the reactor runs)
and for short-lived commands, never for code on a running reactor.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

SYSCTL = "/usr/sbin/sysctl"
SW_VERS = "/usr/bin/sw_vers"
LAUNCHCTL = "/bin/launchctl"
SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"
LSOF = "/usr/sbin/lsof"
SSH = "/usr/bin/ssh"
PS = "/bin/ps"
#: Nix, as the person running C{virby doctor} finds it: nix-darwin and Determinate each put
#: their own on C{PATH}.
NIX = "nix"
#: Where Nix is when C{PATH} lacks it (a C{sudo} that resets it): nix-darwin's system
#: profile, then the profile the installers (Determinate's too) make.
NIX_ELSEWHERE = ("/run/current-system/sw/bin/nix", "/nix/var/nix/profiles/default/bin/nix")
#: The machines file Nix reads by default (C{builders = @/etc/nix/machines}); nix-darwin's
#: C{nix.buildMachines} and Determinate's C{determinateNix.buildMachines} both write it.
NIX_MACHINES = "/etc/nix/machines"
#: launchctl's exit status for a service it does not know.
NO_SUCH_SERVICE = 113
#: Rosetta 2's translator; present exactly when Rosetta is installed on Apple silicon.
ROSETTA_RUNTIME = "/Library/Apple/usr/share/rosetta/rosetta"
#: The command that installs Rosetta without a dialog.
INSTALL_ROSETTA = "softwareupdate --install-rosetta --agree-to-license"

CPU_BRAND = (SYSCTL, "-n", "machdep.cpu.brand_string")
ARM64 = (SYSCTL, "-n", "hw.optional.arm64")
MACOS_VERSION = (SW_VERS, "-productVersion")

#: Virtualization.framework's nested virtualization: Apple M3 or later, macOS 15 or later.
NESTED_MIN_CHIP = 3
NESTED_MIN_MACOS = (15,)
#: Rosetta for Linux VMs (Virtualization.framework's Rosetta share): macOS 13 or later.
ROSETTA_MIN_MACOS = (13,)

#: The Mac a Linux machine plays when nothing says otherwise: one that can do everything,
#: so the emulator and the daemon accept every option by default.
PLAYED_DEFAULTS = {"CPU": "Apple M4", "MACOS": "15.5", "ROSETTA": "installed"}


class HostCommandError(Exception):
    """
    A command asked of the Mac failed or is missing; the message says how.  (Not the
    readiness probe's failure, L{virby.daemon.readiness.ProbeError}: that one is a guest
    that answered without an SSH banner.)

    @ivar status: the command's exit status, or C{None} when it did not run (or timed out).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Runner(Protocol):
    """The one way this module (and C{virby doctor}) learns anything about the host."""

    def run(self, argv: Sequence[str], timeout: float | None = None) -> str:
        """The command's standard output.  @raise HostCommandError: when it fails."""

    def exists(self, path: str) -> bool:
        """Whether C{path} exists."""

    def userId(self, name: str) -> int | None:
        """The uid of the user C{name}, or C{None} when the host has no such user."""

    def readText(self, path: str) -> str:
        """
        The text of one of the Mac's own files (C{/etc/nix/machines}).  @raise OSError: when
        it cannot be read, as C{open} raises it.
        """


class MacRunner:
    """Runs the commands for real (macOS)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = timeout

    def run(self, argv: Sequence[str], timeout: float | None = None) -> str:
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=self._timeout if timeout is None else timeout,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HostCommandError(str(e)) from None
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()
            raise HostCommandError(
                why[-1] if why else f"exit status {done.returncode}", done.returncode
            )
        return done.stdout

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def userId(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def readText(self, path: str) -> str:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


@dataclass(frozen=True)
class PlayedMac:
    """
    A Mac described by settings, for systems that are not one (tests, C{dev/try}).

    It answers the Mac's own system commands from its settings (C{sysctl}, C{sw_vers},
    C{launchctl}, the application firewall's C{socketfilterfw}) and runs every other command
    for real, as the Mac would run a program it has: vfkit (here its emulator), and C{lsof},
    C{ssh} (C{ssh -G} too), C{ps} and C{nix}, which Linux has too (found on C{PATH} instead
    of at the Mac's path).  Of the Mac's files it plays C{/etc/nix/machines}.

    @ivar cpu: the CPU brand string, e.g. C{"Apple M1 Pro"} or an Intel one.
    @ivar macos: the macOS version, e.g. C{"14.6.1"}.
    @ivar rosetta: C{"installed"} or C{"missing"}.
    @ivar launchd: what C{launchctl print system/<label>} finds (C{VIRBY_PLAYED_LAUNCHD}):
        C{""} plays a system without launchd (the command is missing), C{"missing"} a job
        that is not loaded, C{"running:PID"}, C{"waiting"} (loaded, its socket waiting for a
        first connection), or C{"exited:CODE"}.
    @ivar firewall: the application firewall (C{VIRBY_PLAYED_FIREWALL}): C{"off"}, C{"on"},
        or C{"block-all"} (on, blocking every incoming connection).
    @ivar ssh_config: the Mac's ssh configuration (C{VIRBY_PLAYED_SSH_CONFIG}), a file that
        plays the C{/etc/ssh/ssh_config.d} the module installs; C{""}: this system's own.
    @ivar nix_machines: the file that plays the Mac's C{/etc/nix/machines}
        (C{VIRBY_PLAYED_NIX_MACHINES}); C{""}: the played Mac has none.  Nix itself is this
        system's, run for real (C{nix config show}), so C{NIX_CONF_DIR} and C{NIX_CONFIG}
        play its settings.
    """

    cpu: str
    macos: str
    rosetta: str
    launchd: str = ""
    firewall: str = "off"
    ssh_config: str = ""
    nix_machines: str = ""

    @classmethod
    def fromEnvironment(cls, environ: Mapping[str, str] | None = None) -> PlayedMac:
        environ = os.environ if environ is None else environ
        values = {
            name: environ.get(f"VIRBY_EMULATOR_{name}") or default
            for name, default in PLAYED_DEFAULTS.items()
        }
        return cls(
            cpu=values["CPU"],
            macos=values["MACOS"],
            rosetta=values["ROSETTA"],
            launchd=environ.get("VIRBY_PLAYED_LAUNCHD", ""),
            firewall=environ.get("VIRBY_PLAYED_FIREWALL") or "off",
            ssh_config=environ.get("VIRBY_PLAYED_SSH_CONFIG", ""),
            nix_machines=environ.get("VIRBY_PLAYED_NIX_MACHINES", ""),
        )

    @property
    def appleSilicon(self) -> bool:
        return self.cpu.startswith("Apple")

    @property
    def macosVersion(self) -> tuple[int, ...] | None:
        return parseVersion(self.macos)

    def run(self, argv: Sequence[str], timeout: float | None = None) -> str:
        if argv[0] in (SYSCTL, SW_VERS):
            answers = {
                CPU_BRAND: self.cpu,
                MACOS_VERSION: self.macos,
                ARM64: "1" if self.appleSilicon else None,
            }
            answer = answers.get(tuple(argv))
            if answer is None:
                raise HostCommandError(
                    f"{argv[-1]}: unknown oid" if argv[0] == SYSCTL else "not found"
                )
            return answer + "\n"
        if argv[0] == LAUNCHCTL:
            return self._launchctl(argv)
        if argv[0] == SOCKETFILTERFW:
            return self._socketfilterfw(argv)
        if argv[0] == SSH and self.ssh_config:
            return MacRunner().run(["ssh", "-F", self.ssh_config, *argv[1:]], timeout)
        linux = {LSOF: "lsof", SSH: "ssh", PS: "ps"}.get(argv[0], argv[0])
        return MacRunner().run([linux, *argv[1:]], timeout)

    def _launchctl(self, argv: Sequence[str]) -> str:
        """C{launchctl print system/LABEL}, in the layout launchd prints (tab-indented)."""
        if not self.launchd:
            raise HostCommandError(f"{LAUNCHCTL}: not found (the played Mac has no launchd)")
        if len(argv) != 3 or argv[1] != "print" or not argv[2].startswith("system/"):
            raise HostCommandError("Unrecognized subcommand", 64)
        label = argv[2].removeprefix("system/")
        if self.launchd == "missing":
            raise HostCommandError(
                f'Could not find service "{label}" in domain for system', NO_SUCH_SERVICE
            )
        kind, _, value = self.launchd.partition(":")
        lines = [
            f"system/{label} = {{",
            "\tactive count = 1" if kind == "running" else "\tactive count = 0",
            f"\tpath = /Library/LaunchDaemons/{label}.plist",
            "\ttype = LaunchDaemon",
            {"running": "\tstate = running", "waiting": "\tstate = waiting"}.get(
                kind, "\tstate = not running"
            ),
            "",
            "\tprogram = /bin/sh",
        ]
        if kind == "running":
            lines.append(f"\tpid = {value}")
        code = value if kind == "exited" else "(never exited)"
        lines += [f"\tlast exit code = {code}", "}"]
        return "\n".join(lines) + "\n"

    def _socketfilterfw(self, argv: Sequence[str]) -> str:
        on = self.firewall in ("on", "block-all")
        if list(argv[1:]) == ["--getglobalstate"]:
            return f"Firewall is {'enabled' if on else 'disabled'}. (State = {int(on)})\n"
        if list(argv[1:]) == ["--getblockall"]:
            blocking = self.firewall == "block-all"
            return f"Firewall has block all state set to {'enabled' if blocking else 'disabled'}.\n"
        raise HostCommandError(f"socketfilterfw: {' '.join(argv[1:])} is not played", 1)

    def exists(self, path: str) -> bool:
        return path == ROSETTA_RUNTIME and self.appleSilicon and self.rosetta == "installed"

    def readText(self, path: str) -> str:
        """The played machines file stands for the Mac's; every other file is this system's."""
        if path == NIX_MACHINES:
            if not self.nix_machines:
                raise FileNotFoundError(2, "No such file or directory", path)
            path = self.nix_machines
        return MacRunner().readText(path)

    def userId(self, name: str) -> int | None:
        """
        None: the played Mac's daemon runs as whoever started it, never as a user the
        module made, whatever users this system has.
        """
        return None


def defaultRunner() -> Runner:
    """The real Mac on macOS; elsewhere, the Mac the emulator plays."""
    return MacRunner() if sys.platform == "darwin" else PlayedMac.fromEnvironment()


@dataclass(frozen=True)
class Probe:
    """One question asked: the command (or file) and what came back."""

    asked: str
    answer: str


@dataclass(frozen=True)
class Verdict:
    """
    Whether the Mac can do something: C{ok} is C{None} when it could not be told.  C{why}
    says why in a few words, and C{fix} what a person can do about it, if anything.
    """

    ok: bool | None
    why: str
    fix: str | None = None

    @property
    def refused(self) -> bool:
        """Known not to work; C{None} (could not tell) is not a refusal."""
        return self.ok is False


@dataclass(frozen=True)
class HostFacts:
    """
    The facts, each C{None} when it could not be found out.

    @ivar cpu: the CPU brand string (C{sysctl machdep.cpu.brand_string}).
    @ivar appleSilicon: C{hw.optional.arm64} is 1.
    @ivar macos: the macOS version as numbers, e.g. C{(15, 1)}.
    @ivar rosetta_installed: Rosetta's translator is on disk.
    @ivar probes: every question asked, in order, with its answer.
    """

    cpu: str | None
    appleSilicon: bool | None
    macos: tuple[int, ...] | None
    rosetta_installed: bool | None
    probes: tuple[Probe, ...]

    @property
    def chipGeneration(self) -> int | None:
        """C{3} for "Apple M3 Pro"; C{None} for Intel or a name this does not know."""
        match = re.match(r"Apple M(\d+)\b", self.cpu or "")
        return int(match.group(1)) if match else None

    @property
    def macosText(self) -> str:
        return ".".join(map(str, self.macos)) if self.macos else "an unknown version"

    def nestedVirtualization(self) -> Verdict:
        """Apple M3 or later with macOS 15 or later (what C{vz} checks before C{--nested})."""
        generation = self.chipGeneration
        if self.appleSilicon is False:
            why = f"it needs Apple silicon, and this Mac has {self._cpu()}"
            return Verdict(False, why)
        if generation is None or self.macos is None:
            why = f"cannot tell whether {self._cpu()} on macOS {self.macosText} supports it"
            return Verdict(None, why)
        if generation < NESTED_MIN_CHIP:
            return Verdict(False, f"it needs Apple M3 or later, and this Mac has {self.cpu}")
        if self.macos < NESTED_MIN_MACOS:
            why = f"it needs macOS 15 or later, and this Mac runs macOS {self.macosText}"
            return Verdict(False, why)
        return Verdict(True, f"{self.cpu} on macOS {self.macosText} supports it")

    def rosetta(self) -> Verdict:
        """Rosetta's share for Linux needs Apple silicon, macOS 13 or later, and Rosetta."""
        if self.appleSilicon is False:
            return Verdict(
                False,
                f"Rosetta needs Apple silicon, and this Mac has {self._cpu()}",
                "turn rosetta off",
            )
        if self.macos is not None and self.macos < ROSETTA_MIN_MACOS:
            return Verdict(
                False,
                f"Rosetta for Linux VMs needs macOS 13 or later, and this Mac runs macOS "
                f"{self.macosText}",
                "update macOS or turn rosetta off",
            )
        if self.rosetta_installed is False:
            return Verdict(
                False, "Rosetta is not installed on this Mac", f"run `{INSTALL_ROSETTA}`"
            )
        if self.rosetta_installed is None or self.appleSilicon is None:
            return Verdict(None, "cannot tell whether Rosetta is installed")
        return Verdict(True, "Rosetta is installed")

    def _cpu(self) -> str:
        return self.cpu or "an unknown CPU"


def gather(runner: Runner | None = None) -> HostFacts:
    """Ask the host (through C{runner}, by default L{defaultRunner}) everything above."""
    runner = runner or defaultRunner()
    probes: list[Probe] = []

    def ask(argv: Sequence[str]) -> str | None:
        try:
            answer = runner.run(argv).strip()
        except HostCommandError as e:
            probes.append(Probe(" ".join(argv), f"failed: {e}"))
            return None
        probes.append(Probe(" ".join(argv), answer))
        return answer

    cpu = ask(CPU_BRAND) or None
    arm64 = ask(ARM64)
    version = ask(MACOS_VERSION)
    # On Intel the oid does not exist: that failure is itself the answer.
    appleSilicon = arm64.strip() == "1" if arm64 is not None else (False if cpu else None)
    rosetta: bool | None = None
    if appleSilicon:
        rosetta = runner.exists(ROSETTA_RUNTIME)
        probes.append(Probe(f"test -e {ROSETTA_RUNTIME}", "yes" if rosetta else "no"))
    return HostFacts(
        cpu=cpu,
        appleSilicon=appleSilicon,
        macos=parseVersion(version),
        rosetta_installed=rosetta,
        probes=tuple(probes),
    )


def parseVersion(text: str | None) -> tuple[int, ...] | None:
    """C{"14.6.1"} -> C{(14, 6, 1)}; C{None} for anything else."""
    if not text or not re.fullmatch(r"\d+(\.\d+)*", text.strip()):
        return None
    return tuple(int(part) for part in text.strip().split("."))


# -- what the Mac's commands print


def parseLaunchctl(text: str) -> dict[str, str]:
    """
    The job's own C{key = value} lines of C{launchctl print}: the least indented ones, first
    occurrence first, so the nested blocks (sockets, environment) cannot shadow them.
    """
    found: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        match = re.match(r"^(\s+)([a-z][a-z ]*?) = (.*)$", line)
        if not match:
            continue
        depth, key, value = len(match.group(1).expandtabs(1)), match.group(2), match.group(3)
        if key not in found or depth < found[key][0]:
            found[key] = (depth, value.strip())
    return {key: value for key, (_, value) in found.items()}


def parseLsof(text: str) -> list[tuple[int, str]]:
    """C{lsof -F pc} output: one C{p<pid>} line per process, then its C{c<command>}."""
    holders: list[tuple[int, str]] = []
    pid: int | None = None
    for line in text.splitlines():
        if line.startswith("p") and line[1:].isdigit():
            pid = int(line[1:])
            holders.append((pid, "?"))
        elif line.startswith("c") and pid is not None and holders and holders[-1][0] == pid:
            holders[-1] = (pid, line[1:])
    return holders


def parseNixConfig(text: str) -> dict[str, str]:
    """
    C{nix config show} (C{nix show-config} before Nix 2.20): one C{name = value} line a
    setting, the value as Nix would write it back (lists space-separated).
    """
    settings: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep and name and " " not in name:
            settings[name] = value.strip()
    return settings


@dataclass(frozen=True)
class Machine:
    """
    One line of a Nix machines file: the fields Nix's C{build-remote} reads, in its order
    (URI, systems, key, max jobs, speed factor, supported features, mandatory features,
    host key), C{-} standing for none.
    """

    uri: str
    systems: frozenset[str]
    supportedFeatures: frozenset[str]
    mandatoryFeatures: frozenset[str]

    @property
    def host(self) -> str:
        """C{ssh-ng://builder@virby-vm} -> C{virby-vm}."""
        rest = self.uri.partition("://")[2] or self.uri
        return rest.rpartition("@")[2]


def parseMachines(text: str) -> list[Machine]:
    """The machines of a file in the format nix-darwin and Determinate write (C{#} comments)."""
    found = []
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if not fields:
            continue
        fields += ["-"] * (8 - len(fields))

        def listed(value: str) -> frozenset[str]:
            return frozenset() if value == "-" else frozenset(value.split(","))

        found.append(Machine(fields[0], listed(fields[1]), listed(fields[5]), listed(fields[6])))
    return found


def parseSshOptions(text: str) -> dict[str, list[str]]:
    """C{ssh -G HOST}: one lower-case C{keyword value} line each, some keywords repeated."""
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        keyword, _, value = line.strip().partition(" ")
        if keyword:
            options.setdefault(keyword.lower(), []).append(value.strip())
    return options


def configOfCommandLine(commandLine: str) -> str | None:
    """The file a Virby command line names with C{--config FILE} (or C{--config=FILE})."""
    words = commandLine.split()
    for i, word in enumerate(words):
        if word == "--config" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--config="):
            return word.removeprefix("--config=")
    return None
