"""
The VM image's NixOS configuration (C{nix/image.nix}), evaluated with nixpkgs' real lib and
module system for each nixpkgs the fixtures name (L{tests.darwin_harness}), through
C{nix/tests/image.nix}: NixOS' own modules are not here, so what is checked is what the image
asks of them, option by option, as read against nixpkgs' source.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.darwin_harness import ROOT, Pair
from virby.emulator.guest import IMAGE_SSHD_SETTINGS, imageSshdSettings

HARNESS = ROOT / "nix" / "tests" / "image.nix"
KEYS_MOUNT = "/run/virby-sshd-keys"

pytestmark = [
    pytest.mark.repository,
    pytest.mark.skipif(
        shutil.which("nix-instantiate") is None, reason="nix-instantiate is not installed (nix-bin)"
    ),
]


def image(pair: Pair, generate_host_keys: bool = True, extra_config: dict | None = None) -> dict:
    """What the image sets, with or without sshd's C{generateHostKeys} declared."""
    command = [
        "nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode", str(HARNESS),
        "--arg", "nixpkgsLib", str(pair.lib),
        "--arg", "generateHostKeys", "true" if generate_host_keys else "false",
        "--argstr", "extraConfig", json.dumps(extra_config or {}),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def configured(pair: Pair) -> dict:
    return image(pair)


def test_a_newer_sshd_module_generates_no_host_key(configured: dict) -> None:
    """
    With hostKeys empty, nixpkgs' sshd-keygen unit would have an empty script and so no
    ExecStart, which systemd refuses; where sshd's module declares generateHostKeys (nixpkgs
    since late 2025), turning it off leaves the unit out altogether.
    """
    sshd = configured["sshd"]
    assert sshd["hostKeys"] == []
    assert sshd["generateHostKeys"] is False
    assert sshd["keygenUnit"] is None, "nothing is defined for a unit the module leaves out"


def test_an_older_sshd_module_gets_its_keygen_unit_masked(pair: Pair) -> None:
    """Before generateHostKeys, the option must not be set (it does not exist): the unit is
    masked instead."""
    sshd = image(pair, generate_host_keys=False)["sshd"]
    assert sshd["generateHostKeys"] is None
    assert sshd["keygenUnit"] == {"enable": False}


def test_the_guest_sshd_takes_the_shared_settings(configured: dict) -> None:
    """The settings the emulated guest takes too, and root may not log in to the VM."""
    shared = json.loads((ROOT / "virby" / IMAGE_SSHD_SETTINGS).read_text())
    assert shared == imageSshdSettings()
    assert configured["sshd"]["settings"] == {**shared, "PermitRootLogin": "no"}


def test_networkd_from_extra_config_is_refused_in_one_line(pair: Pair, configured: dict) -> None:
    """networkd sends a DUID as DHCP client id: bootpd would record no MAC to find."""
    assert configured["failedAssertions"] == []
    refused = image(pair, extra_config={"networking": {"useNetworkd": True}})["failedAssertions"]
    assert len(refused) == 1 and "\n" not in refused[0]
    assert "networking.useNetworkd" in refused[0] and "DUID" in refused[0]


def test_nixpkgs_source_stays_out_of_the_image(pair: Pair, configured: dict) -> None:
    """No channel, no registry entry, no NIX_PATH: each would put nixpkgs' source in the
    closure, and a builder evaluates nothing.  A user may still ask for them."""
    assert configured["channel"] is False
    assert configured["nixpkgsFlake"] == {"setFlakeRegistry": False, "setNixPath": False}
    asked = {"nixpkgs": {"flake": {"setFlakeRegistry": True, "setNixPath": True}}}
    assert image(pair, extra_config=asked)["nixpkgsFlake"] == asked["nixpkgs"]["flake"]


def test_the_installer_tools_are_left_out(configured: dict) -> None:
    assert configured["disableInstallerTools"] is True


# -- the key unit's script, run as systemd runs it (NixOS puts `set -e` before it)


def run_key_script(script: str, tmp_path: Path, **fail: bool) -> subprocess.CompletedProcess:
    """
    The unit's script with its mount point moved under C{tmp_path} and the commands that
    need root (mount, umount, install, mv) played by stand-ins that succeed, or fail when
    asked, and record that they ran.
    """
    mount = tmp_path / "keys"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("mount", "umount", "install", "mv"):
        stand_in = bin_dir / command
        code = 1 if fail.get(command) else 0
        stand_in.write_text(f'#!/bin/sh\necho "{command} $*" >> "$RAN"\nexit {code}\n')
        stand_in.chmod(0o755)
    body = "set -e\n" + script.replace(KEYS_MOUNT, str(mount))
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "RAN": str(tmp_path / "ran")}  # fmt: skip
    return subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=30, env=env)


def test_a_clean_up_that_fails_does_not_fail_the_unit(configured: dict, tmp_path: Path) -> None:
    """The keys are installed: an unmount that fails is said, and sshd still starts."""
    ran = run_key_script(configured["keyScript"], tmp_path, umount=True)
    assert ran.returncode == 0, ran.stderr
    assert "cannot unmount" in ran.stderr
    assert (tmp_path / "ran").read_text().splitlines()[-1].startswith("umount ")


def test_a_failed_install_fails_the_unit_and_still_cleans_up(
    configured: dict, tmp_path: Path
) -> None:
    ran = run_key_script(configured["keyScript"], tmp_path, install=True)
    assert ran.returncode != 0
    assert any(line.startswith("umount ") for line in (tmp_path / "ran").read_text().splitlines())
    assert not (tmp_path / "keys").exists(), "the mount point is removed"


def test_a_clean_run_leaves_no_mount_point(configured: dict, tmp_path: Path) -> None:
    ran = run_key_script(configured["keyScript"], tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""
    assert not (tmp_path / "keys").exists()
