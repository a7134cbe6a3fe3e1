"""flock-based locks: released by the kernel with their holder, never fooled by a pid."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from virby.locks import FileLock, LockError


def test_one_holder_at_a_time_and_the_pid_is_noted(tmp_path) -> None:
    path = str(tmp_path / "daemon.lock")
    first, second = FileLock(path), FileLock(path)
    assert first.acquire() and first.held
    assert not second.acquire() and not second.held
    assert second.holder() == str(os.getpid())
    first.release(remove=True)
    assert not os.path.exists(path)
    assert second.acquire()
    second.release()
    assert os.path.exists(path), "released without remove keeps the file"


def test_a_pid_in_the_file_means_nothing(tmp_path) -> None:
    path = tmp_path / "daemon.lock"
    path.write_text(f"{os.getppid()}\n")
    lock = FileLock(str(path))
    assert lock.acquire(), "a live pid in an unlocked file is no lock"
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release(remove=True)


def test_the_kernel_releases_the_lock_of_a_dead_process(tmp_path) -> None:
    path = str(tmp_path / "daemon.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from virby.locks import FileLock\n"
         f"assert FileLock({path!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert not FileLock(path).acquire()
    finally:
        holder.kill()
        holder.wait(30)
    assert FileLock(path).acquire(), "SIGKILL left a file, but no lock"


def test_a_symlink_is_replaced_never_followed(tmp_path) -> None:
    target = tmp_path / "elsewhere"
    os.symlink(str(target), tmp_path / "daemon.lock")
    lock = FileLock(str(tmp_path / "daemon.lock"))
    assert lock.acquire()
    assert not target.exists() and not os.path.islink(tmp_path / "daemon.lock")


def test_a_directory_is_one_clear_error(tmp_path) -> None:
    (tmp_path / "daemon.lock").mkdir()
    with pytest.raises(LockError, match="is a directory, not a lock file: remove it"):
        FileLock(str(tmp_path / "daemon.lock")).acquire()


def test_a_lock_taken_on_a_file_removed_meanwhile_is_retaken(tmp_path, monkeypatch) -> None:
    """The race removal opens: a locker that opened the old file locks the new one."""
    path = str(tmp_path / "daemon.lock")
    lock = FileLock(path)
    real_open = lock._open
    calls: list[int] = []

    def open_then_lose_the_race() -> int:
        fd = real_open()
        if not calls:
            os.unlink(path)  # the previous holder releases with remove, after our open
        calls.append(fd)
        return fd

    monkeypatch.setattr(lock, "_open", open_then_lose_the_race)
    assert lock.acquire()
    assert len(calls) == 2 and os.path.exists(path)
    assert os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino


def test_the_directory_lock_is_taken_only_if_free_and_never_waited_for(tmp_path) -> None:
    from virby.locks import locked, lockedIfFree

    with locked(str(tmp_path)), lockedIfFree(str(tmp_path)) as held:
        assert held is False
    with lockedIfFree(str(tmp_path)) as held:
        assert held is True
        with lockedIfFree(str(tmp_path)) as again:
            assert again is False, "held by the first"
    with lockedIfFree(str(tmp_path)) as held:
        assert held is True, "let go at the end of the block"
