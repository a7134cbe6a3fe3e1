"""The working directory's layout: one table in the code, the same in the docs, one check."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from virby import layout
from virby.config import ConfigError, fromMapping
from virby.layout import WorkingDirectoryError, checkWorkingDirectory

DOC = Path(__file__).resolve().parents[2] / "docs" / "working-directory.md"


def documented() -> set[tuple[str, str, str]]:
    """The rows of the doc's table: path, mode, maker."""
    rows = set()
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| `([^`]+)` \| (\w+) \| (\w+) \|", line)
        if match:
            rows.add((match.group(1).rstrip("/"), match.group(2), match.group(3)))
    return rows


@pytest.mark.repository
def test_the_doc_states_the_layout_the_code_uses() -> None:
    coded = {
        (entry.name, "umask" if entry.mode is None else f"{entry.mode:04o}", entry.maker)
        for entry in layout.ENTRIES
    }
    assert documented() == coded


def test_what_vfkit_makes_is_owner_only_through_the_umask() -> None:
    assert layout.DAEMON_UMASK & 0o077 == 0o077
    assert {e.name for e in layout.ENTRIES if e.mode is None} == {
        e.name for e in layout.ENTRIES if e.maker == "vfkit"
    }


def test_prepare_keeps_every_file_it_makes_at_its_mode() -> None:
    made = {e.name for e in layout.ENTRIES if e.maker == "prepare"} - {layout.SSHD_KEYS}
    assert set(layout.PREPARED_MODES) == made


def test_a_working_directory_must_leave_room_for_its_longest_socket() -> None:
    """control.sock is longer than vfkit.sock: the room left for vfkit.sock is not enough."""
    room = layout.MAX_UNIX_SOCKET_PATH - len("/control.sock")
    fits = "/" + "w" * (room - 1)
    assert len(fits + "/control.sock") == layout.MAX_UNIX_SOCKET_PATH
    assert fromMapping({"working-directory": fits}).working_directory == fits
    too_long = fits + "w"
    assert len(too_long + "/vfkit.sock") <= layout.MAX_UNIX_SOCKET_PATH
    with pytest.raises(ConfigError, match=r"control\.sock"):
        fromMapping({"working-directory": too_long})


def test_a_missing_directory_is_the_fix_prepare_gives(tmp_path: Path) -> None:
    with pytest.raises(WorkingDirectoryError) as caught:
        checkWorkingDirectory(str(tmp_path / "wd"))
    assert str(caught.value) == (
        f"working directory {tmp_path / 'wd'} is missing: {layout.PREPARE_FIX}"
    )
    assert checkWorkingDirectory(str(tmp_path / "wd"), absentOk=True) is None


def test_a_file_in_its_place_is_refused_by_every_caller(tmp_path: Path) -> None:
    (tmp_path / "wd").write_bytes(b"precious")
    for absentOk in (False, True):
        with pytest.raises(WorkingDirectoryError, match="exists and is not a directory"):
            checkWorkingDirectory(str(tmp_path / "wd"), absentOk=absentOk)
    assert (tmp_path / "wd").read_bytes() == b"precious"


def test_what_a_boot_needs_is_named(tmp_path: Path) -> None:
    with pytest.raises(WorkingDirectoryError) as caught:
        checkWorkingDirectory(str(tmp_path), layout.BOOT_NEEDS)
    assert caught.value.problem == f"{tmp_path / 'diff.img'} is missing"
    (tmp_path / "diff.img").write_bytes(b"")
    os.mkdir(tmp_path / "vm_sshd_keys")
    assert checkWorkingDirectory(str(tmp_path), layout.BOOT_NEEDS) is not None


def test_an_unwritable_directory_names_the_fix_for_who_is_asking(tmp_path, monkeypatch) -> None:
    """Root may write anywhere, so the refusal is driven through os.access, which decides it."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(WorkingDirectoryError) as daemon:
        checkWorkingDirectory(str(tmp_path))
    assert "with --owner set to the daemon's user" in str(daemon.value)
    with pytest.raises(WorkingDirectoryError) as prepare:
        checkWorkingDirectory(str(tmp_path), absentOk=True)
    assert prepare.value.fix == "run virby prepare as root"
    assert checkWorkingDirectory(str(tmp_path), writable=False) is not None


def test_a_read_only_file_system_is_named_not_blamed_on_the_user(tmp_path, monkeypatch) -> None:
    """EROFS: root cannot write there either, so "run it as root" would send a person astray."""
    real = os.statvfs

    class ReadOnly:
        def __init__(self, path: str) -> None:
            self.f_flag = real(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(WorkingDirectoryError) as caught:
        checkWorkingDirectory(str(tmp_path), absentOk=True)
    assert caught.value.problem == f"working directory {tmp_path} is on a read-only file system"
    assert caught.value.fix == 'mount it read-write, or set a "working-directory" on a writable one'
    assert checkWorkingDirectory(str(tmp_path), writable=False) is not None
