"""
Realising the VM image after activation, so that C{darwin-rebuild switch} builds no Linux
derivation.

The system holds the image's derivation, not its output (C{nix/module.nix}); C{virby
prepare --image-derivation DRV}, which the activation runs after nix-darwin's launchd step,
asks Nix to realise it with C{nix-store --realise DRV --add-root <wd>/image --indirect}: Nix
builds it (or substitutes it) through whatever builder it has for the image's system, the
build's progress goes to the switch's terminal, and the GC root in the working directory
keeps the image from Nix's garbage collector.

A failure is not an error here: the switch must still complete.  L{realise} returns the
cause in one line, and L{noImageParagraph} is what prepare prints for a person: the cause
and the ways forward.

Stage 0: when Nix fails for want of any builder for the image's system and the module
passed a L{Stage0} (nixpkgs' C{darwin.linux-builder}'s runner, unmodified so that it comes
from cache.nixos.org), L{realise} starts that VM as a temporary builder with keys of its
own under C{<wd>/stage0}, waits within a bound for its SSH banner, has Nix realise the
image once more through it (C{--builders}), then stops it and removes C{stage0}, whatever
happened.  docs/one-switch.md says what each step rests on in nixpkgs and Nix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from virby import keys
from virby.layout import IMAGE_DERIVATION, IMAGE_ROOT

#: How many of nix-store's last lines of output are kept to find the cause of a failure.
_TAIL = 40


@dataclass(frozen=True)
class Wanted:
    """
    The image the config names and the derivation that gives it.

    @ivar derivation: the C{.drv} store path.
    @ivar image: the image file inside the derivation's output (the config's C{image}).
    """

    derivation: str
    image: str

    @property
    def output(self) -> str:
        """The store path of the derivation's output, which holds the image."""
        return os.path.dirname(self.image)

    def encode(self) -> bytes:
        return f"{self.derivation}\n{self.image}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> Wanted | None:
        lines = data.decode("utf-8", "replace").split("\n")
        if len(lines) < 2 or not lines[0].endswith(".drv") or not lines[1].startswith("/"):
            return None
        return cls(lines[0], lines[1])


def recorded(workingDirectory: str) -> Wanted | None:
    """What the last activation recorded in L{IMAGE_DERIVATION}, or C{None}."""
    try:
        with open(os.path.join(workingDirectory, IMAGE_DERIVATION), "rb") as f:
            return Wanted.decode(f.read())
    except OSError:
        return None


def rooted(workingDirectory: str, wanted: Wanted) -> bool:
    """Whether the image is there and its GC root points at it: nothing to realise."""
    root = os.path.join(workingDirectory, IMAGE_ROOT)
    try:
        target = os.readlink(root)
    except OSError:
        return False
    return target == wanted.output and os.path.isfile(wanted.image)


#: Runs nix-store: the command line, where its stderr goes; returns its exit status and the
#: last lines of its stderr.
Runner = Callable[[Sequence[str], IO[str]], "tuple[int, list[str]]"]


def runShowingProgress(command: Sequence[str], progress: IO[str]) -> tuple[int, list[str]]:
    """
    Run C{command}, copying its stderr (Nix's build log and progress) to C{progress} line
    by line as it comes, and keep its last lines for the cause of a failure.
    """
    tail: list[str] = []
    with subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    ) as child:
        assert child.stderr is not None
        for line in child.stderr:
            progress.write(line)
            progress.flush()
            tail.append(line.rstrip("\n"))
            del tail[:-_TAIL]
    return child.returncode, tail


def _cause(status: int, tail: list[str]) -> str:
    """The last line Nix marked as an error, or else its exit status."""
    for line in reversed(tail):
        text = line.strip()
        if text.startswith("error:"):
            return text[len("error:") :].strip()
    return f"nix-store --realise exited with status {status}"


def realise(
    workingDirectory: str,
    wanted: Wanted,
    *,
    nixStore: str | None = None,
    run: Runner = runShowingProgress,
    progress: IO[str] | None = None,
    stage0: Stage0 | None = None,
    launch: Launcher | None = None,
    probe: Callable[[int], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """
    Realise C{wanted} with a GC root at C{<wd>/image}.

    @param nixStore: the nix-store program (default: the one on C{PATH}, which nix-darwin's
        activation sets to the system's Nix, or to the unmanaged one Determinate installs).
    @param stage0: the temporary builder to start when Nix has none for the image's system,
        or C{None} for none.
    @param launch: how stage 0's runner is started (default: L{launchRunner}).
    @param probe: whether an SSH server greets on a loopback port (default: L{answers}).
    @param sleep: how the wait for stage 0's SSH pauses between probes.
    @return: C{None} when the image is there, else the cause in one line.
    """
    program = nixStore or shutil.which("nix-store")
    if program is None:
        return "nix-store is not on PATH"
    progress = progress or sys.stderr
    root = os.path.join(workingDirectory, IMAGE_ROOT)
    command = [program, "--realise", wanted.derivation, "--add-root", root, "--indirect"]
    status, tail = run(command, progress)
    if status != 0 and stage0 is not None and noBuilder(tail):
        return _throughStage0(
            workingDirectory,
            wanted,
            command,
            stage0,
            run,
            progress,
            launch or launchRunner,
            probe or answers,
            sleep,
        )
    if status != 0:
        return _cause(status, tail)
    return _checkRoot(root, wanted)


def _checkRoot(root: str, wanted: Wanted) -> str | None:
    """The cause when the GC root Nix made does not give the configured image, else C{None}."""
    try:
        target = os.readlink(root)
    except OSError as e:
        return f"nix-store made no GC root at {root}: {e.strerror or e}"
    if target != wanted.output:
        return f"{wanted.derivation} gives {target}, not the configured image {wanted.image}"
    if not os.path.isfile(wanted.image):
        return f"{target} has no {os.path.basename(wanted.image)}"
    return None


def noBuilder(tail: Sequence[str]) -> bool:
    """
    Whether Nix failed because no builder, local or remote, can take the derivation: older
    Nix says "a 'SYSTEM' with features {...} is required to build", current Nix "Cannot
    build ... Reason: required system or feature not available".
    """
    text = "\n".join(tail)
    if "required system or feature not available" in text:
        return True
    return "with features {" in text and "is required to build" in text


#: The name of stage 0's directory in the working directory.
STAGE0 = "stage0"

#: The file name the guest's sshd reads the builder's authorized key from, in C{$KEYS}
#: (nixpkgs' C{nix-builder-vm.nix}: C{/var/keys/%u_ed25519.pub}, user C{builder}).
STAGE0_PUBLIC_KEY = "builder_ed25519.pub"


@dataclass(frozen=True)
class Stage0:
    """
    The temporary builder, as the module describes it (C{--stage0-*} of C{virby prepare}).

    @ivar runner: the runner's derivation (or output): nixpkgs' C{darwin.linux-builder}
        C{nixosConfig.system.build.vm}; its C{bin/run-*-vm} starts the VM.
    @ivar system: the system the VM builds for, as the machines line names it.
    @ivar hostKey: the VM's public host key, base64 as a machines line wants it.
    @ivar port: the loopback port its sshd answers on.
    @ivar host: the ssh host name Nix is given: an alias whose C{Host} block (the module's
        C{/etc/ssh/ssh_config.d}) names the port, which a machines line cannot.
    @ivar user: the user Nix logs in as.
    @ivar within: how long to wait for its SSH banner, in seconds of pauses between probes
        (a probe that is refused returns at once; one that hangs is cut after seconds).
    """

    runner: str
    system: str
    hostKey: str
    port: int = 31022
    host: str = "virby-stage0"
    user: str = "builder"
    within: float = 300.0

    def machine(self, privateKey: str) -> str:
        """Its line for Nix's C{builders}: one job, C{kvm} for the image's disk build."""
        return (
            f"ssh-ng://{self.user}@{self.host} {self.system} {privateKey} 1 1 "
            f"kvm,big-parallel,benchmark - {self.hostKey}"
        )


class Child(Protocol):
    """A started runner: whether it is still there, and how to stop it and its children."""

    def poll(self) -> int | None: ...

    def stop(self, grace: float) -> None: ...


#: Starts stage 0's runner: its command, its directory, the variables it adds, its log.
Launcher = Callable[[Sequence[str], str, "dict[str, str]", str], Child]


class _Group:
    """A runner started in a session of its own, stopped with its whole process group."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self, grace: float) -> None:
        """
        SIGTERM to the group, then, after the runner is gone or C{grace} seconds, SIGKILL to
        whatever of the group is left: QEMU under the runner's script leaves no orphan.
        """
        self._signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace)
        self._signal(signal.SIGKILL)
        self.process.wait()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


def launchRunner(command: Sequence[str], cwd: str, env: dict[str, str], log: str) -> Child:
    """Start the runner in C{cwd} in a session of its own, its console going to C{log}."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return _Group(process)


def answers(port: int, timeout: float = 2.0) -> bool:
    """Whether an SSH server greets on the loopback C{port}."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _runnerProgram(output: str) -> str | None:
    """The C{bin/run-*-vm} of the runner's output (nixpkgs' C{qemu-vm.nix} names it so)."""
    try:
        names = sorted(os.listdir(os.path.join(output, "bin")))
    except OSError:
        return None
    found = [n for n in names if n.startswith("run-") and n.endswith("-vm")]
    return os.path.join(output, "bin", found[0]) if found else None


def _throughStage0(
    workingDirectory: str,
    wanted: Wanted,
    command: list[str],
    stage0: Stage0,
    run: Runner,
    progress: IO[str],
    launch: Launcher,
    probe: Callable[[int], bool],
    sleep: Callable[[float], None],
) -> str | None:
    """
    Build the image through stage 0, and leave nothing of it behind: the VM stopped and
    C{<wd>/stage0} removed on every path.
    """

    def say(message: str) -> None:
        progress.write(f"virby prepare: stage 0: {message}\n")
        progress.flush()

    missing = f"no Linux builder for {stage0.system}"
    if probe(stage0.port):
        return (
            f"{missing} that Nix would use, yet an SSH server answers on port {stage0.port} "
            "(a linux-builder already?), so no temporary builder was started"
        )
    directory = os.path.join(workingDirectory, STAGE0)
    shutil.rmtree(directory, ignore_errors=True)
    child: Child | None = None
    say(f"{missing}: starting nixpkgs' linux-builder as a temporary builder")
    try:
        os.mkdir(directory, 0o700)
        os.mkdir(os.path.join(directory, "keys"), 0o700)
        os.mkdir(os.path.join(directory, "tmp"), 0o700)
        status, tail = run(
            [command[0], "--realise", stage0.runner, "--add-root",
             os.path.join(directory, "runner"), "--indirect"],
            progress,
        )  # fmt: skip
        if status != 0:
            return f"{missing}, and the temporary builder's runner: {_cause(status, tail)}"
        program = _runnerProgram(os.path.realpath(os.path.join(directory, "runner")))
        if program is None:
            return f"{missing}, and {stage0.runner} has no bin/run-*-vm to start"
        pair = keys.generate("virby-stage0")
        privateKey = os.path.join(directory, "builder_ed25519")
        fd = os.open(privateKey, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pair.private)
        with open(os.path.join(directory, "keys", STAGE0_PUBLIC_KEY), "w") as public:
            public.write(pair.public + "\n")
        os.chmod(os.path.join(directory, "keys"), 0o755)
        env = {
            "KEYS": os.path.join(directory, "keys"),
            "TMPDIR": os.path.join(directory, "tmp"),
            "USE_TMPDIR": "1",
        }
        child = launch([program], directory, env, os.path.join(directory, "console.log"))
        say(f"waiting up to {stage0.within:g} s for its SSH on port {stage0.port}")
        waited = 0.0
        while not probe(stage0.port):
            exited = child.poll()
            if exited is not None:
                return f"{missing}, and the temporary builder exited with status {exited}"
            if waited >= stage0.within:
                return (
                    f"{missing}, and the temporary builder did not answer on port "
                    f"{stage0.port} within {stage0.within:g} s"
                )
            sleep(1.0)
            waited += 1.0
        say("answering; building the image through it")
        status, tail = run(
            [*command, "--builders", stage0.machine(privateKey),
             "--option", "builders-use-substitutes", "true"],
            progress,
        )  # fmt: skip
        if status != 0:
            return f"through the temporary builder: {_cause(status, tail)}"
        return _checkRoot(os.path.join(workingDirectory, IMAGE_ROOT), wanted)
    except OSError as e:
        return f"{missing}, and the temporary builder: {e.strerror or e}"
    finally:
        if child is not None:
            child.stop(10.0)
        shutil.rmtree(directory, ignore_errors=True)
        say("stopped and removed" if child is not None else "removed")


def noImageParagraph(image: str, cause: str) -> str:
    """
    What prepare prints when the image could not be realised: the cause, that the switch is
    done anyway, and the ways forward (those of the README's "On a Mac").
    """
    return (
        f"no VM image yet: {cause}. The switch is complete, but the Virby VM cannot boot "
        f"until its image {image} exists; the daemon refuses boots until then, and "
        "`virby status` says why. Any one of these gets it: (1) nix-darwin's linux-builder: "
        "set nix.linux-builder.enable = true and switch; (2) a Linux machine that builds for "
        "the VM's system in nix.buildMachines (or Determinate's determinateNix.buildMachines); "
        "(3) the image built elsewhere (the system's config.system.build.virbyImage) and "
        "copied here with `nix copy`. Then run `sudo virby prepare` (the next switch tries "
        "again too)."
    )
