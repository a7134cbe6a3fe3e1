"""
C{virby prepare} when the image is not built yet: it has Nix realise the image's derivation
with a GC root in the working directory, and when that fails, the switch still completes,
with the cause recorded for the daemon and a paragraph for a person.  Nix is played by a
L{FakeNix} here; tests/e2e/test_realise_e2e.py runs the real nix-store.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pytest

from virby import cli, layout
from virby.cli import prepare, realise
from virby.config import MIB, Config
from virby.errors import VirbyError

DISK = 8 * MIB


class FakeNix:
    """
    C{nix-store --realise DRV --add-root ROOT --indirect}, played: it writes its progress
    where it is told, and either makes the output and the root or fails with Nix's words.
    """

    def __init__(self, output: Path, error: str | None = None) -> None:
        self.output = output
        self.error = error
        self.calls: list[list[str]] = []

    def __call__(self, command: Sequence[str], progress: IO[str]) -> tuple[int, list[str]]:
        self.calls.append(list(command))
        progress.write("building '/nix/store/x-virby-vm-image.drv'...\n")
        if self.error is not None:
            return 1, ["building '/nix/store/x-virby-vm-image.drv'...", f"error: {self.error}"]
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "nixos.img").write_bytes(b"an image" + bytes(4096))
        root = command[command.index("--add-root") + 1]
        os.symlink(str(self.output), root)
        return 0, []


@pytest.fixture
def output(tmp_path: Path) -> Path:
    return tmp_path / "store" / "abc-virby-vm-image"


@pytest.fixture
def config(tmp_path: Path, output: Path) -> Config:
    return Config(
        working_directory=str(tmp_path / "wd"),
        image=str(output / "nixos.img"),
        disk_size=DISK,
    )


DRV = "/nix/store/xyz-virby-vm-image.drv"
NO_BUILDER = (
    "a 'aarch64-linux' with features {} is required to build '/nix/store/x.drv', but I am "
    "a 'aarch64-darwin' with features {benchmark, big-parallel, nixos-test}"
)


def run(config: Config, nix: FakeNix, **kwargs) -> list[str]:
    said: list[str] = []
    prepare.prepare(config, run=nix, explain=said.append, **kwargs)
    return said


def test_a_missing_image_is_realised_with_a_gc_root_and_then_prepared(config, output) -> None:
    nix = FakeNix(output)
    assert run(config, nix, derivation=DRV) == []
    wd = Path(config.working_directory)
    assert nix.calls == [
        [nix.calls[0][0], "--realise", DRV, "--add-root", str(wd / "image"), "--indirect"]
    ]
    assert os.readlink(wd / "image") == str(output)
    assert (wd / "base.img").read_bytes() == (output / "nixos.img").read_bytes()
    assert (wd / "diff.img").exists() and prepare.keysConsistent(config)
    assert prepare.recordedImage(config) == config.image
    assert (wd / "image-derivation").read_text() == f"{DRV}\n{config.image}\n"
    assert not (wd / "image-failure").exists()
    assert layout.noImageYet(str(wd)) is None


def test_an_image_already_realised_and_rooted_asks_nix_nothing(config, output) -> None:
    run(config, FakeNix(output), derivation=DRV)
    again = FakeNix(output)
    assert run(config, again, derivation=DRV) == []
    assert again.calls == []


def test_a_failed_realisation_completes_with_the_cause_and_the_ways_forward(config, output) -> None:
    nix = FakeNix(output, error=NO_BUILDER)
    said = run(config, nix, derivation=DRV)
    wd = Path(config.working_directory)
    assert len(said) == 1
    paragraph = said[0]
    assert paragraph.startswith(f"no VM image yet: {NO_BUILDER}. The switch is complete")
    for way in ("nix.linux-builder.enable = true", "nix.buildMachines", "nix copy"):
        assert way in paragraph
    assert "sudo virby prepare" in paragraph and "\n" not in paragraph
    # The directory and keys are there for the daemon; no disk, and the cause is kept.
    assert prepare.keysConsistent(config)
    assert not (wd / "base.img").exists() and not (wd / "diff.img").exists()
    assert (wd / "image-failure").read_text() == f"{NO_BUILDER}\n"
    assert layout.noImageYet(str(wd)) == f"no image yet: {NO_BUILDER}; {layout.NO_IMAGE_FIX}"
    assert (wd / "image-derivation").read_text() == f"{DRV}\n{config.image}\n"


def test_a_later_prepare_by_hand_tries_the_recorded_derivation_again(config, output) -> None:
    run(config, FakeNix(output, error=NO_BUILDER), derivation=DRV)
    nix = FakeNix(output)
    assert run(config, nix) == []
    assert nix.calls[0][1:3] == ["--realise", DRV]
    wd = Path(config.working_directory)
    assert (wd / "base.img").exists() and not (wd / "image-failure").exists()


def test_no_realise_records_the_derivation_and_leaves_the_build_to_later(config, output) -> None:
    nix = FakeNix(output)
    assert run(config, nix, derivation=DRV, realise=False) == []
    wd = Path(config.working_directory)
    assert nix.calls == []
    assert (wd / "image-derivation").read_text() == f"{DRV}\n{config.image}\n"
    assert "not built yet" in (wd / "image-failure").read_text()


def test_a_new_image_not_built_yet_keeps_the_old_images_disks(config, output, tmp_path) -> None:
    """The VM of the old image may be the very builder that builds the new one."""
    run(config, FakeNix(output), derivation=DRV)
    wd = Path(config.working_directory)
    before = {name: (wd / name).read_bytes() for name in ("base.img", "diff.img")}
    keysBefore = (wd / "ssh_known_hosts").read_bytes()
    newer = Config(
        working_directory=config.working_directory,
        image=str(tmp_path / "store" / "def-virby-vm-image" / "nixos.img"),
        disk_size=DISK,
    )
    run(newer, FakeNix(output), derivation="/nix/store/def-virby-vm-image.drv", realise=False)
    assert {name: (wd / name).read_bytes() for name in before} == before
    assert (wd / "ssh_known_hosts").read_bytes() == keysBefore
    assert prepare.recordedImage(newer) == config.image
    assert layout.noImageYet(str(wd)) is None


def test_a_derivation_giving_another_path_is_a_cause_not_a_crash(config, tmp_path) -> None:
    said = run(config, FakeNix(tmp_path / "store" / "other"), derivation=DRV)
    assert "gives" in said[0] and "not the configured image" in said[0]


def test_a_missing_image_without_a_derivation_is_still_refused(config) -> None:
    with pytest.raises(VirbyError, match=r"^image: cannot use .*: No such file or directory"):
        prepare.prepare(config)
    assert not Path(config.working_directory).exists()


def test_nix_store_not_on_path_is_a_cause(config, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    cause = realise.realise(config.working_directory, realise.Wanted(DRV, str(config.image)))
    assert cause == "nix-store is not on PATH"


def test_nix_stores_progress_goes_through_and_its_last_error_is_the_cause(tmp_path) -> None:
    script = tmp_path / "nix-store"
    script.write_text(
        "#!/bin/sh\necho 'building x...' >&2\necho 'error: first' >&2\n"
        "echo 'error: builder for x failed' >&2\necho trailing >&2\nexit 1\n"
    )
    script.chmod(0o755)
    shown = io.StringIO()
    cause = realise.realise(
        str(tmp_path),
        realise.Wanted(DRV, "/nix/store/abc-image/nixos.img"),
        nixStore=str(script),
        progress=shown,
    )
    assert cause == "builder for x failed"
    assert shown.getvalue() == (
        "building x...\nerror: first\nerror: builder for x failed\ntrailing\n"
    )


def test_the_command_line_completes_without_an_image(
    config, capsys, monkeypatch, short_tmp
) -> None:
    """What the activation runs: exit 0, and the paragraph on stderr."""
    monkeypatch.setenv("PATH", "/nonexistent")
    code = cli.main(
        [
            "prepare",
            "--working-directory",
            str(short_tmp / "wd"),
            "--image",
            str(config.image),
            "--image-derivation",
            "/nonexistent/x.drv",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "virby prepare: no VM image yet: nix-store is not on PATH. The switch is complete" in err
