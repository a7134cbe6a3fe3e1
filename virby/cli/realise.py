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
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

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
) -> str | None:
    """
    Realise C{wanted} with a GC root at C{<wd>/image}.

    @param nixStore: the nix-store program (default: the one on C{PATH}, which nix-darwin's
        activation sets to the system's Nix, or to the unmanaged one Determinate installs).
    @return: C{None} when the image is there, else the cause in one line.
    """
    program = nixStore or shutil.which("nix-store")
    if program is None:
        return "nix-store is not on PATH"
    root = os.path.join(workingDirectory, IMAGE_ROOT)
    status, tail = run(
        [program, "--realise", wanted.derivation, "--add-root", root, "--indirect"],
        progress or sys.stderr,
    )
    if status != 0:
        return _cause(status, tail)
    try:
        target = os.readlink(root)
    except OSError as e:
        return f"nix-store made no GC root at {root}: {e.strerror or e}"
    if target != wanted.output:
        return f"{wanted.derivation} gives {target}, not the configured image {wanted.image}"
    if not os.path.isfile(wanted.image):
        return f"{target} has no {os.path.basename(wanted.image)}"
    return None


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
