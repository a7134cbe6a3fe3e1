"""
The switch builds no Linux derivation: for every option set the nix-darwin tests use, the
system's derivation, written to the store as C{darwin-rebuild} would, has the image's
derivation nowhere among the input derivations it reaches, while the image's C{.drv} file is
in the system's closure, so that activation can realise it on the Mac; and so is the
derivation of stage 0's runner, nixpkgs' linux-builder VM.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.darwin_harness import PAIRS, ROOT, Pair, determinate, evaluate
from tests.e2e.test_nix_activation import SYSTEMS
from tests.unit.test_nix_darwin import ALL, CASES, DETERMINATE_CASES, REFUSED

pytestmark = pytest.mark.e2e

NIX = ["--extra-experimental-features", "nix-command"]


def reachable_inputs(derivations: dict, start: str) -> set[str]:
    """Every derivation whose output C{start} needs, through inputDrvs alone."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for drv in derivations[todo.pop()]["inputDrvs"]:
            if drv not in seen:
                seen.add(drv)
                todo.append(drv)
    return seen


@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: pair.name)
def test_the_system_has_the_images_derivation_but_not_its_output(pair: Pair) -> None:
    why = pair.missing()
    if why is not None:
        pytest.skip(why)
    if shutil.which("nix") is None:
        pytest.skip("nix is not installed (Debian's nix-bin)")
    cases = dict(CASES)
    if determinate() is not None:
        cases.update(DETERMINATE_CASES)
    cases.update({f"activation-{name}": case for name, case in SYSTEMS.items()})
    names = sorted(n for n in cases if n not in REFUSED)
    results = evaluate(pair, {n: cases[n] for n in names}, readonly=False)
    checked = 0
    for name in names:
        got = results[name]
        if got["image"] is None:
            assert ALL.get(name, {}).get("virby", {}).get("enable") is not True
            continue
        toplevel, image = got["drvPath"], got["image"]["drvPath"]
        shown = subprocess.run(
            ["nix", *NIX, "show-derivation", "-r", toplevel],
            capture_output=True, text=True, timeout=300, cwd=ROOT, check=True,
        )  # fmt: skip
        derivations = json.loads(shown.stdout)
        inputs = reachable_inputs(derivations, toplevel)
        assert image not in inputs, f"{name}: the switch would build the image"
        assert len(inputs) > 10, f"{name}: the walk found the system's inputs"
        closure = subprocess.run(
            ["nix-store", "--query", "--requisites", toplevel],
            capture_output=True, text=True, timeout=300, check=True,
        ).stdout.split()  # fmt: skip
        assert image in closure, f"{name}: activation could not realise the image"
        # Stage 0's runner (nixpkgs' linux-builder), whose closure is Linux, is held the same way.
        runner = got["stage0Runner"]
        if ALL.get(name, {}).get("virby", {}).get("stage0", True):
            assert runner is not None, name
        if runner is not None:
            assert runner not in inputs, f"{name}: the switch would build stage 0's runner"
            assert runner in closure, f"{name}: prepare could not realise stage 0's runner"
        checked += 1
    assert checked >= len(names) - 2
