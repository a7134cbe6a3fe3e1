"""
Kill C{virby prepare} with SIGKILL in the middle of copying a big image, then run it again:
the working directory must end complete and consistent, and the kill must not have damaged
the state that was there before.

The moment to kill is seen from outside: the copy's temporary file appearing and growing.
Polling is paced by waiting on the process's own output, so the wait ends at once if it
exits, and is bounded by a deadline.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from testbed.processes import ProcessUnderTest
from virby import disk
from virby.cli import prepare
from virby.config import Config

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
DATA = 256 * MIB


def big_image(path: Path) -> None:
    """A 1 GiB sparse image with 256 MiB of real data blocks, in two regions."""
    chunk = bytes(range(256)) * (MIB // 256)
    with open(path, "wb") as f:
        f.truncate(1024 * MIB)
        for region in (0, 512 * MIB):
            f.seek(region)
            for _ in range(DATA // 2 // MIB):
                f.write(chunk)


def run_prepare(image: Path, wd: Path) -> ProcessUnderTest:
    return ProcessUnderTest(
        [sys.executable, "-m", "virby.cli", "prepare", "--image", str(image),
         "--working-directory", str(wd), "--disk-size", "4GiB"],
    )  # fmt: skip


def temporaries(wd: Path) -> list[Path]:
    return [p for p in wd.glob("*") if p.name.endswith(disk.TEMP_SUFFIX)]


def kill_while_copying(process: ProcessUnderTest, wd: Path, timeout: float = 60.0) -> Path:
    """SIGKILL the run as soon as its copy's temporary file holds data; return that file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        growing = [p for p in temporaries(wd) if p.stat().st_blocks > 0]
        if growing:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait_exit(30)
            return growing[0]
        if process.process.poll() is not None:
            break
        process._read_available(0.005)
    raise AssertionError(f"no copy in progress was seen; output:\n{process.text()}")


def small_files(wd: Path) -> dict[str, bytes]:
    """The content of the keys and the record: everything but the disks and temporaries."""
    return {
        p.name: p.read_bytes()
        for p in [*wd.glob("*"), *wd.glob("vm_sshd_keys/*")]
        if p.is_file() and p.suffix != ".img" and not p.name.endswith(disk.TEMP_SUFFIX)
    }


def finish(image: Path, wd: Path) -> None:
    rerun = run_prepare(image, wd)
    try:
        assert rerun.wait_exit(300) == 0, rerun.text()
    finally:
        rerun.kill_all()
    config = Config(working_directory=str(wd), image=str(image))
    assert prepare.recordedImage(config) == str(image)
    assert prepare.keysConsistent(config)
    assert temporaries(wd) == [] and temporaries(wd / "vm_sshd_keys") == []
    assert os.stat(wd / "diff.img").st_size == 4096 * MIB
    with open(image, "rb") as source, open(wd / "diff.img", "rb") as copy:
        for offset in range(0, os.stat(image).st_size, 64 * MIB):
            assert source.read(64 * MIB) == copy.read(64 * MIB), offset
    assert (wd / "base.img").stat().st_size == image.stat().st_size


def test_a_run_killed_during_the_first_copy_is_finished_by_the_next(tmp_path: Path) -> None:
    image = tmp_path / "nixos.img"
    big_image(image)
    wd = tmp_path / "wd"
    first = run_prepare(image, wd)
    try:
        partial = kill_while_copying(first, wd)
    finally:
        first.kill_all()
    assert partial.exists()  # it really died mid-copy
    assert not (wd / "base.img").exists() and not (wd / "image-path").exists()
    finish(image, wd)


def test_a_run_killed_while_switching_images_keeps_the_old_state(tmp_path: Path) -> None:
    old = tmp_path / "old.img"
    old.write_bytes(b"old image" * 1000)
    wd = tmp_path / "wd"
    setup = run_prepare(old, wd)
    try:
        assert setup.wait_exit(120) == 0, setup.text()
    finally:
        setup.kill_all()
    before = small_files(wd)
    diff_before = (wd / "diff.img").stat().st_ino

    image = tmp_path / "new.img"
    big_image(image)
    switch = run_prepare(image, wd)
    try:
        kill_while_copying(switch, wd)
    finally:
        switch.kill_all()
    assert (wd / "diff.img").stat().st_ino == diff_before
    assert small_files(wd) == before
    finish(image, wd)
