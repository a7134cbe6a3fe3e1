"""
Ephemeral mode end to end: the real daemon makes a fresh diff.img from base.img before every
boot (in its child process), the emulated guest boots from it, and what the last run wrote
is gone.
"""

from __future__ import annotations

import os

import pytest

from virby.emulator.guest import readState

pytestmark = pytest.mark.e2e

GIB = 1024**3
#: Where a "build" writes into the disk while the VM runs: well inside the grown part.
MARK_AT = GIB // 2
MARK = b"left behind by a build"


def read_at(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_what_a_run_wrote_is_gone_after_a_stop_and_the_disk_is_grown(make_builder) -> None:
    builder = make_builder(ephemeral=True, ttl=2)
    diff = builder.wd / "diff.img"
    assert (builder.wd / "base.img").exists() and not diff.exists(), "prepare makes no diff.img"
    daemon = builder.start()

    first = builder.ssh("true")
    assert first.returncode == 0, first.stderr + daemon.text()
    daemon.wait_for_line(r"made a fresh diff\.img from base\.img")
    assert os.stat(diff).st_size == GIB
    assert readState(str(diff)).boots == 1
    with open(diff, "r+b") as f:  # what a build leaves on the VM's disk
        f.seek(MARK_AT)
        f.write(MARK)
    inode = os.stat(diff).st_ino

    daemon.wait_for_line(r"no connection for 2s: stopping the VM", timeout=30)
    daemon.wait_for_line(r"VM stopped", timeout=30)
    assert read_at(diff, MARK_AT, len(MARK)) == MARK, "nothing is made fresh before a boot"

    second = builder.ssh("echo", "again")
    assert second.returncode == 0, second.stderr + daemon.text()
    assert second.stdout == "again\n", "the keys reached the fresh guest"
    assert daemon.text().count("made a fresh diff.img") == 2
    assert os.stat(diff).st_ino != inode, "a new file, not the old one rewritten"
    assert read_at(diff, MARK_AT, len(MARK)) == bytes(len(MARK))
    assert os.stat(diff).st_size == GIB, "the fresh copy is grown to disk-size"
    assert readState(str(diff)).boots == 1, "the guest remembers no earlier boot"


def test_a_missing_base_image_fails_the_boot_with_one_line(make_builder) -> None:
    builder = make_builder(ephemeral=True)
    (builder.wd / "base.img").unlink()
    daemon = builder.start()
    result = builder.ssh("true")
    assert result.returncode != 0
    daemon.wait_for_line(
        r"boot failed: no fresh diff\.img: .*base\.img is missing: run `virby prepare"
    )
    assert builder.emulators() == [], "no vfkit without a disk"
    assert "is missing" in builder.status()["last_error"]
