"""
C{virby prepare --image-derivation DRV} with the real C{nix-store} of Debian's C{nix-bin}:
the image realised through the builder Nix has (here the local machine, whose system the
derivation names), the GC root that keeps it from the garbage collector, nothing asked of
Nix once it is rooted, and a derivation no builder can take, which completes with the cause
and leaves the daemon's refusal line behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.nixenv import nix_environment
from tests.programs import VIRBY
from virby import layout

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("nix-store") is None, reason="nix-bin is not installed"),
]

DERIVATION = """
{ system, nonce }:
derivation {
  name = "virby-vm-image";
  inherit system nonce;
  builder = "/bin/sh";
  args = [ "-c" "echo building the image >&2; /bin/mkdir $out; echo image > $out/nixos.img" ];
}
"""


class Nix:
    """Nix calls with a configuration of the test's own (no cache, no build users)."""

    def __init__(self, root: Path) -> None:
        self.env = {**os.environ, **nix_environment(root)}
        self.expression = root / "image.nix"
        self.expression.write_text(DERIVATION)

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(command), capture_output=True, text=True, timeout=300, env=self.env
        )

    def instantiate(self, system: str) -> tuple[str, str]:
        """A new image derivation for C{system}, and the image file its output would hold."""
        nonce = os.urandom(8).hex()
        made = self.run("nix-instantiate", str(self.expression), "--argstr", "system", system,
                        "--argstr", "nonce", nonce)  # fmt: skip
        assert made.returncode == 0, made.stderr
        drv = made.stdout.strip()
        output = self.run("nix-store", "--query", "--outputs", drv).stdout.strip()
        return drv, f"{output}/nixos.img"

    def prepare(self, wd: Path, image: str, *extra: str, path: str | None = None):
        env = dict(self.env)
        if path is not None:
            env["PATH"] = path
        return subprocess.run(
            [*VIRBY, "prepare", "--working-directory", str(wd), "--image", image,
             "--disk-size", "1GiB", *extra],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip


@pytest.fixture
def nix(tmp_path: Path) -> Nix:
    return Nix(tmp_path)


def local_system(nix: Nix) -> str:
    shown = nix.run("nix-instantiate", "--eval", "--expr", "builtins.currentSystem")
    return shown.stdout.strip().strip('"')


def test_the_image_is_realised_and_rooted_so_the_collector_keeps_it(
    nix: Nix, tmp_path: Path
) -> None:
    drv, image = nix.instantiate(local_system(nix))
    assert not Path(image).exists()
    wd = tmp_path / "wd"
    done = nix.prepare(wd, image, "--image-derivation", drv)
    assert done.returncode == 0, done.stderr
    # Nix's progress went through to the terminal; no paragraph, no failure recorded.
    assert "building the image" in done.stderr and "no VM image yet" not in done.stderr
    assert os.readlink(wd / "image") == os.path.dirname(image)
    assert (wd / "base.img").read_bytes() == b"image\n"
    assert not (wd / "image-failure").exists()
    # Nix refuses to collect it (asked for this one path: the store is shared with others).
    collected = nix.run("nix-store", "--delete", os.path.dirname(image))
    assert collected.returncode != 0 and "still alive" in collected.stderr
    assert Path(image).exists(), "the GC root kept the image"
    # Without the root, the same request collects it: the root was what kept it.
    (wd / "image").unlink()
    assert nix.run("nix-store", "--delete", os.path.dirname(image)).returncode == 0
    assert not Path(image).exists()
    rerooted = nix.prepare(wd, image, "--image-derivation", drv)
    assert rerooted.returncode == 0, rerooted.stderr
    assert os.readlink(wd / "image") == os.path.dirname(image)
    # Rooted: a second run needs no Nix at all (none is on its PATH).
    again = nix.prepare(wd, image, "--image-derivation", drv, path="/nonexistent")
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""


def test_a_derivation_no_builder_takes_completes_with_the_cause(nix: Nix, tmp_path: Path) -> None:
    other = "aarch64-linux" if local_system(nix) != "aarch64-linux" else "x86_64-linux"
    drv, image = nix.instantiate(other)
    wd = tmp_path / "wd"
    done = nix.prepare(wd, image, "--image-derivation", drv)
    assert done.returncode == 0, done.stderr
    assert f"virby prepare: no VM image yet: a '{other}'" in done.stderr
    assert "The switch is complete" in done.stderr
    cause = (wd / "image-failure").read_text().strip()
    assert cause.startswith(f"a '{other}'") and "is required to build" in cause
    assert layout.noImageYet(str(wd)) == f"no image yet: {cause}; {layout.NO_IMAGE_FIX}"
    assert (wd / "ssh_known_hosts").exists() and not (wd / "base.img").exists()
    # A later prepare by hand, with no derivation given, tries the recorded one again.
    again = nix.prepare(wd, image)
    assert again.returncode == 0 and "no VM image yet" in again.stderr
