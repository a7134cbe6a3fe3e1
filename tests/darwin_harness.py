"""
Evaluating services.virby inside real nix-darwin: where the checkouts are, and running
C{nix/tests/darwin.nix} over many cases in one C{nix-instantiate}.

The checkouts come from the environment, so that nothing of nix-darwin or nixpkgs is copied
into this repository (C{.ci/run} unpacks snapshots and sets them):

- C{VIRBY_NIX_DARWIN}, C{VIRBY_NIXPKGS_LIB}: nix-darwin's master branch and a nixpkgs (or
  nixpkgs.lib) checkout of the same age, the folder holding C{lib/};
- C{VIRBY_NIX_DARWIN_25_05}, C{VIRBY_NIXPKGS_LIB_25_05}: the 25.05 release pair;
- C{VIRBY_DETERMINATE}: Determinate's repository, for its nix-darwin module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "nix" / "tests" / "darwin.nix"


@dataclass(frozen=True)
class Pair:
    """A nix-darwin branch and the nixpkgs lib it is released with."""

    name: str
    darwin_variable: str
    lib_variable: str

    def missing(self) -> str | None:
        """Why this pair cannot be evaluated here, or C{None} when it can."""
        if shutil.which("nix-instantiate") is None:
            return "nix-instantiate is not installed (Debian's nix-bin)"
        for variable, what, inside in (
            (self.darwin_variable, "a nix-darwin checkout", "modules/module-list.nix"),
            (self.lib_variable, "a nixpkgs checkout holding lib/", "lib/default.nix"),
        ):
            value = os.environ.get(variable)
            if not value:
                return f"{variable} is not set: it names {what} ({self.name}); see nix/README.md"
            if not (Path(value) / inside).is_file():
                return f"{variable}={value} is not {what}: it has no {inside}"
        return None

    @property
    def darwin(self) -> Path:
        return Path(os.environ[self.darwin_variable])

    @property
    def lib(self) -> Path:
        return Path(os.environ[self.lib_variable]) / "lib"


PAIRS = [
    Pair("master", "VIRBY_NIX_DARWIN", "VIRBY_NIXPKGS_LIB"),
    Pair("25.05", "VIRBY_NIX_DARWIN_25_05", "VIRBY_NIXPKGS_LIB_25_05"),
]


def determinate() -> Path | None:
    """Determinate's checkout, when C{VIRBY_DETERMINATE} names one."""
    value = os.environ.get("VIRBY_DETERMINATE")
    if value and (Path(value) / "modules" / "nix-darwin" / "default.nix").is_file():
        return Path(value)
    return None


def arguments(pair: Pair, cases: dict) -> list[str]:
    """The C{nix-instantiate} arguments that hand C{cases} to the harness for C{pair}."""
    args = ["--arg", "nixDarwin", str(pair.darwin), "--arg", "nixpkgsLib", str(pair.lib)]
    found = determinate()
    if found is not None:
        args += ["--arg", "determinate", str(found)]
    return [*args, "--argstr", "cases", json.dumps(cases)]


def evaluate(pair: Pair, cases: dict, attribute: str = "results", readonly: bool = True) -> dict:
    """Evaluate C{attribute} of the harness for all C{cases} at once, as JSON."""
    command = ["nix-instantiate", "--eval", "--strict", "--json"]
    # Read-only computes store paths without writing anything into the store; otherwise the
    # derivations and the sources they name are written there, as nix-build would.
    command.append("--readonly-mode" if readonly else "--read-write-mode")
    command += [str(HARNESS), "-A", attribute, *arguments(pair, cases)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{result.stderr}")
    return json.loads(result.stdout)
