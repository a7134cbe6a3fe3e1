"""Copying and growing the VM's disk files: content kept, holes kept, never half-written."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virby import disk

MIB = 1024 * 1024
#: This system's own choice, kept before any test (or the macOS sandbox mode) replaces it.
PLATFORM_CLONE = disk.platformClone


@pytest.fixture
def reflink_platform(monkeypatch) -> None:
    """Copy as on Linux, whatever this system is: the reflink, then the sparse copy."""
    monkeypatch.setattr(disk, "platformClone", lambda: ("reflink", disk._reflinkFile))


def sparse_file(path: Path, size: int, blocks: dict[int, bytes]) -> bytes:
    """Make a sparse file with data at the given offsets; return its whole content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in blocks.items():
            f.seek(offset)
            f.write(data)
    return path.read_bytes()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_copy_keeps_content_and_holes(tmp_path: Path) -> None:
    source = tmp_path / "image"
    content = sparse_file(source, 64 * MIB, {5 * MIB: os.urandom(MIB), 40 * MIB + 7: b"x" * 99})
    method = disk.copy(str(source), str(tmp_path / "copy"))
    assert method in ("reflink", "sparse copy", "clonefile")
    assert (tmp_path / "copy").read_bytes() == content
    assert allocated(tmp_path / "copy") < 8 * MIB


def test_sparse_copy_makes_holes_of_written_zeros(tmp_path: Path) -> None:
    source = tmp_path / "image"
    source.write_bytes(bytes(16 * MIB) + b"data" + bytes(MIB))
    assert allocated(source) >= 16 * MIB
    assert disk.copy(str(source), str(tmp_path / "copy"), clone=False) == "sparse copy"
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    assert allocated(tmp_path / "copy") <= 2 * MIB


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(0, 5 * MIB),
    blocks=st.dictionaries(st.integers(0, 5 * MIB), st.binary(min_size=1, max_size=70000)),
)
def test_sparse_copy_is_exact_for_any_layout(tmp_path: Path, size: int, blocks) -> None:
    source = tmp_path / "image"
    content = sparse_file(source, size, blocks)
    copy = tmp_path / "copy"
    assert disk.copy(str(source), str(copy), clone=False) == "sparse copy"
    assert copy.read_bytes() == content


def test_copy_sets_the_mode_whatever_the_umask(tmp_path: Path) -> None:
    (tmp_path / "image").write_bytes(b"x")
    old = os.umask(0)
    try:
        disk.copy(str(tmp_path / "image"), str(tmp_path / "copy"), 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "copy").st_mode) == 0o600


def test_copy_replaces_the_destination_with_a_new_file(tmp_path: Path) -> None:
    (tmp_path / "image").write_bytes(b"new")
    (tmp_path / "copy").write_bytes(b"old content")
    inode = os.stat(tmp_path / "copy").st_ino
    disk.copy(str(tmp_path / "image"), str(tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == b"new"
    assert os.stat(tmp_path / "copy").st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "image"]


def test_a_failed_copy_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "image").write_bytes(b"new" * 1000)
    (tmp_path / "copy").write_bytes(b"old")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk, "_sparseCopy", full)
    with pytest.raises(OSError):
        disk.copy(str(tmp_path / "image"), str(tmp_path / "copy"), clone=False)
    assert (tmp_path / "copy").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "image"]


@pytest.mark.usefixtures("reflink_platform")
def test_reflink_falls_back_when_the_filesystem_cannot_clone(tmp_path: Path, monkeypatch) -> None:
    def unsupported(fd, request, arg):
        assert request == disk.FICLONE
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(fcntl, "ioctl", unsupported)
    (tmp_path / "image").write_bytes(b"abc")
    assert disk.copy(str(tmp_path / "image"), str(tmp_path / "copy")) == "sparse copy"
    assert (tmp_path / "copy").read_bytes() == b"abc"


@pytest.mark.usefixtures("reflink_platform")
def test_reflink_errors_other_than_unsupported_are_not_hidden(tmp_path: Path, monkeypatch) -> None:
    def failing(fd, request, arg):
        raise OSError(errno.EIO, "i/o error")

    monkeypatch.setattr(fcntl, "ioctl", failing)
    (tmp_path / "image").write_bytes(b"abc")
    with pytest.raises(OSError):
        disk.copy(str(tmp_path / "image"), str(tmp_path / "copy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]


@pytest.mark.parametrize(
    ("platform", "method"), [("linux", "reflink"), ("darwin", "clonefile"), ("freebsd", None)]
)
def test_each_system_clones_its_own_way(monkeypatch, platform, method) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    chosen = PLATFORM_CLONE()
    assert (chosen[0] if chosen else None) == method


def test_clonefile_is_used_on_macos(tmp_path: Path, monkeypatch) -> None:
    def clone(source, destination):
        Path(destination).write_bytes(Path(source).read_bytes())
        return True

    monkeypatch.setattr(disk, "platformClone", PLATFORM_CLONE)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(disk, "_clonefile", clone)
    (tmp_path / "image").write_bytes(b"abc")
    assert disk.copy(str(tmp_path / "image"), str(tmp_path / "copy"), 0o600) == "clonefile"
    assert (tmp_path / "copy").read_bytes() == b"abc"
    assert stat.S_IMODE(os.stat(tmp_path / "copy").st_mode) == 0o600


def test_a_clone_that_fails_leaves_no_temporary_and_the_copy_goes_on(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(disk, "platformClone", lambda: ("clonefile", lambda s, d: False))
    (tmp_path / "image").write_bytes(b"abc")
    assert disk.copy(str(tmp_path / "image"), str(tmp_path / "copy")) == "sparse copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "image"]


def test_remove_temporaries_removes_only_virby_temporaries(tmp_path: Path) -> None:
    leftover = disk.temporaryName(str(tmp_path / "base.img"))
    Path(leftover).write_bytes(b"half")
    (tmp_path / "diff.img").write_bytes(b"keep")
    (tmp_path / "notes.tmp").write_bytes(b"keep")
    assert disk.removeTemporaries(str(tmp_path)) == [os.path.basename(leftover)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff.img", "notes.tmp"]
    assert disk.removeTemporaries(str(tmp_path / "missing")) == []


def test_grow_extends_sparsely_and_keeps_content(tmp_path: Path) -> None:
    path = tmp_path / "diff.img"
    path.write_bytes(b"filesystem")
    resize = disk.grow(str(path), 64 * MIB)
    assert resize == disk.Resize(before=10, after=64 * MIB, grown=True)
    assert os.stat(path).st_size == 64 * MIB
    assert path.read_bytes()[:10] == b"filesystem"
    assert allocated(path) < MIB


def test_grow_never_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "diff.img"
    path.write_bytes(b"x" * 4096)
    mtime = os.stat(path).st_mtime_ns
    assert disk.grow(str(path), 100) == disk.Resize(before=4096, after=4096, grown=False)
    assert disk.grow(str(path), 4096).grown is False
    assert path.read_bytes() == b"x" * 4096
    assert os.stat(path).st_mtime_ns == mtime
