"""
The nix-darwin module refuses at evaluation, naming the option, what the daemon would refuse
at start.  The daemon's config loader (L{virby.config}) is the source of every bound: each
one is found here by asking the loader, never written down, and the Nix side
(C{nix/lib/bounds.nix}, through the module's option types and the checks of C{nix/lib/})
must take the value just inside it and refuse the value just outside.  The pure checks are
evaluated offline with C{nix-instantiate}; the option types inside a real nix-darwin
(L{tests.darwin_harness}).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

from tests.darwin_harness import ROOT, Pair, evaluate
from virby import layout
from virby.config import ConfigError, fromMapping

pytestmark = [
    pytest.mark.repository,
    pytest.mark.skipif(
        shutil.which("nix-instantiate") is None, reason="nix-instantiate is not installed (nix-bin)"
    ),
]

MIB = 1024 * 1024
GIB = 1024 * MIB
TIB = 1024 * GIB


def takes(key: str, value: object) -> bool:
    """Whether the daemon's loader takes C{value} for C{key}."""
    try:
        fromMapping({key: value})
    except ConfigError:
        return False
    return True


def greatest(accepted: Callable[[int], bool], inside: int) -> int:
    """The greatest C{n} that C{accepted} takes, from one it takes (it takes a range)."""
    assert accepted(inside)
    step = 1
    while accepted(inside + step):
        step *= 2
        assert step < 2**64, "no upper bound"
    low, high = inside + step // 2, inside + step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    return low


def least(accepted: Callable[[int], bool], inside: int) -> int:
    """The least C{n} that C{accepted} takes, from one it takes."""
    return -greatest(lambda n: accepted(-n), -inside)


def around(low: int, high: int) -> list[int]:
    """Just outside, just inside, at each end."""
    return [low - 1, low, high, high + 1]


def integer(key: str, inside: int) -> list[int]:
    accepted = lambda n: takes(key, n)  # noqa: E731
    return around(least(accepted, inside), greatest(accepted, inside))


def nixTakes(function: str, values: list) -> list[bool]:
    """Whether the Nix C{function} returns (without throwing) for each of C{values}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        json.dump(values, data)
        data.flush()
        expression = (
            f"map (v: (builtins.tryEval (builtins.deepSeq ({function} v) true)).success) "
            f"(builtins.fromJSON (builtins.readFile {data.name}))"
        )
        return evaluateExpression(expression)


def nixError(function: str, value: object) -> str:
    """The error the Nix C{function} throws for C{value}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        json.dump(value, data)
        data.flush()
        expression = f"{function} (builtins.fromJSON (builtins.readFile {data.name}))"
        with pytest.raises(RuntimeError) as caught:
            evaluateExpression(expression)
    return str(caught.value)


def evaluateExpression(expression: str) -> Any:
    command = ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode"]
    result = subprocess.run(
        [*command, "--expr", expression], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout)


def agree(key: str, function: str, values: list) -> list:
    """Check that Nix and the loader give each value the same verdict; what Nix refuses."""
    python = [takes(key, value) for value in values]
    nix = nixTakes(function, values)
    differ = [(v, p, n) for v, p, n in zip(values, python, nix, strict=True) if p != n]
    assert not differ, f"(value, the loader takes it, Nix takes it): {differ}"
    return [value for value, took in zip(values, nix, strict=True) if not took]


# -- the checks of nix/lib/, offline

SIZE = "(import ./nix/lib/size.nix)"
SHARES = "(import ./nix/lib/shared-dirs.nix)"


def memory_probes() -> list:
    low, _, high, _ = integer("memory", 6144)
    mib = around(low, high)
    strings = [f"{m}MiB" for m in mib] + [f"{m * 1024}KiB" for m in mib] + [str(m) for m in mib]
    strings += [f"{m * MIB}B" for m in mib]
    strings += [f"{m // 1024}GiB" for m in mib if m % 1024 == 0]
    strings += [f"{m // MIB}T" for m in mib if m % MIB == 0]
    strings += [f"{(high // MIB) + 1}TiB", " +1024 ", "-1024", "0001024", "0" * 30 + "2048"]
    strings += ["9" * 18 + "MiB", "9" * 19 + "MiB", "9" * 25, "1536KiB", "6TB", "x", ""]
    return [*mib, *strings]


def test_memory_is_bounded_as_the_daemon_bounds_it() -> None:
    refused = agree("memory", f"{SIZE}.memoryMiB", memory_probes())
    for value in refused[:4] + refused[-6:]:
        assert "services.virby.memory: " in nixError(f"{SIZE}.memoryMiB", value)


def disk_probes() -> list[str]:
    accepted = lambda n: takes("disk-size", str(n))  # noqa: E731
    low, high = least(accepted, 100 * GIB), greatest(accepted, 100 * GIB)
    sizes = [str(n) for n in around(low, high)] + [f"{n}B" for n in around(low, high)]
    sizes += [f"{n // MIB}MiB" for n in around(low, high) if n % MIB == 0]
    sizes += [f"{low // GIB}GiB", f"{low // MIB - 1}MiB", f"{high // TIB}TiB", f"{high // TIB}T"]
    sizes += [f"{high // TIB + 1}TiB", f"{high // GIB + 1}GiB", f"{high // MIB + 1}M"]
    sizes += ["0100GiB", "9" * 18 + "T", "9" * 20 + "G", "9" * 21, "100GB", "1.5G", "", "x"]
    return sizes


def test_disk_size_is_bounded_as_the_daemon_bounds_it() -> None:
    refused = agree("disk-size", f"{SIZE}.diskSize", disk_probes())
    for value in refused:
        assert "services.virby.diskSize: " in nixError(f"{SIZE}.diskSize", value)


def share_probes() -> list[dict[str, str]]:
    def tag(n: int) -> bool:
        return takes("shared-dirs", {"t" * n: "/x"})

    def count(n: int) -> bool:
        return takes("shared-dirs", {f"t{i}": "/x" for i in range(n)})

    def path(n: int) -> bool:
        return takes("shared-dirs", {"t": "/" + "p" * (n - 1)})

    longest, most, deepest = greatest(tag, 3), greatest(count, 1), greatest(path, 10)
    probes = [{"t" * n: "/x"} for n in (0, 1, longest, longest + 1)]
    probes += [{f"t{i}": "/x" for i in range(n)} for n in (most, most + 1)]
    probes += [{"t": "/" + "p" * (n - 1)} for n in (deepest, deepest + 1)]
    # Bytes, not characters: "é" is two.
    probes += [{"t": "/" + "é" * ((deepest - 1) // 2)}, {"t": "/" + "é" * ((deepest + 1) // 2)}]
    probes += [{f"a{chr(c)}b": "/x"} for c in [*range(0x20, 0x7F), 0xE9, 0x3000]]
    probes += [{"t": f"/a{chr(c)}b"} for c in [*range(1, 0x20), 0x7F, 0x80, 0xE9, 0x3000]]
    probes += [{name: "/x"} for name in (layout.SSHD_KEYS_TAG, layout.ROSETTA_TAG, "Rosetta")]
    reserved = evaluateExpression("(import ./nix/lib/bounds.nix).reservedTags")
    probes += [{name: "/x"} for name in reserved]
    probes += [{"t": p} for p in ("", " ", "relative/dir", " /x", "/a,b", "/", "/Users/me/src")]
    return probes


def test_shared_directories_are_bounded_as_the_daemon_bounds_them() -> None:
    refused = agree("shared-dirs", SHARES, share_probes())
    for value in refused[:12]:
        assert "services.virby.sharedDirectories: " in nixError(SHARES, value)


def test_the_daemons_config_from_the_options_loads_at_each_bound() -> None:
    """What nix/lib/config.nix writes for values just inside the bounds, the loader takes."""
    bounds = evaluateExpression("import ./nix/lib/bounds.nix")
    options = {
        "cores": bounds["cores"]["max"],
        "memory": bounds["memory"]["max"],
        "diskSize": "64TiB",
        "port": bounds["port"]["min"],
        "onDemand": {"enable": True, "ttl": bounds["ttl"]["max"] // 60},
        "rosetta": False,
        "nestedVirtualization": False,
        "sharedDirectories": {"t" * bounds["shareTagBytes"]: "/" + "p" * (bounds["pathBytes"] - 1)},
        "debug": False,
        "allowUserSsh": False,
        "ephemeral": False,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        json.dump(options, data)
        data.flush()
        document = evaluateExpression(
            f"import ./nix/lib/config.nix {{ cfg = builtins.fromJSON (builtins.readFile "
            f'{data.name}); image = "/nix/store/0000-image/nixos.img"; '
            'vfkit = "/nix/store/0000-vfkit/bin/vfkit"; }'
        )
    config = fromMapping(document)
    assert config.ttl == 365 * 24 * 3600 and config.disk_size == 64 * TIB


# -- the module's option types, inside nix-darwin


def module_cases() -> dict[str, tuple[str, dict, bool]]:
    """Per case: the option it sets, the services.virby it is, and whether the loader agrees."""
    cases: dict[str, tuple[str, dict, bool]] = {}

    def case(option: str, virby: dict, key: str, value: object) -> None:
        cases[f"{option}-{len(cases)}"] = (option, virby, takes(key, value))

    for option, key, inside in (("cores", "cores", 8), ("port", "port", 31222)):
        for n in integer(key, inside):
            case(option, {option: n}, key, n)
    low, _, high, _ = integer("ttl", 10800)
    for minutes in around(-(-low // 60), high // 60):
        case("onDemand.ttl", {"onDemand": {"enable": True, "ttl": minutes}}, "ttl", minutes * 60)
    for mib in integer("memory", 6144):
        case("memory", {"memory": mib}, "memory", mib)
        case("memory", {"memory": f"{mib}MiB"}, "memory", f"{mib}MiB")
    for size in disk_probes()[:4]:
        case("diskSize", {"diskSize": size}, "disk-size", size)
    for dirs in share_probes()[:8]:
        case("sharedDirectories", {"sharedDirectories": dirs}, "shared-dirs", dirs)
    return cases


def test_the_module_takes_what_the_daemon_takes_and_refuses_the_rest(pair: Pair) -> None:
    cases = module_cases()
    harness = {name: {"virby": {"enable": True, **virby}} for name, (_, virby, _) in cases.items()}
    verdicts = evaluate(pair, harness, attribute="verdicts")
    differ = [(harness[n], took) for n, (_, _, took) in cases.items() if verdicts[n] != took]
    assert not differ, f"(case, the loader takes it) where the module disagrees: {differ}"
    shown = set()
    for name, (option, _, took) in cases.items():
        if took or option in shown:
            continue
        shown.add(option)
        with pytest.raises(RuntimeError) as caught:
            evaluate(pair, {name: harness[name]}, attribute="checked")
        assert f"services.virby.{option}" in str(caught.value), str(caught.value)[-400:]
    assert shown == {o for o, _, took in cases.values() if not took}
