"""
The daemon's log is reopened after newsyslog renamed it: new lines go to the new file, the
old file keeps what was written before, and a failure leaves the daemon writing where it was.
The daemon notices the rotation itself, on its clock, or at once on SIGHUP.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from virby.daemon.logfile import CHECK_INTERVAL, LOG_MODE, LogFile, openedPath
from virby.layout import DAEMON_UMASK


def descriptor(path: Path) -> int:
    """A descriptor open on C{path} as launchd opens StandardOutPath: append, create."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def write(fd: int, text: str) -> None:
    os.write(fd, text.encode())


@pytest.fixture
def stdout(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """C{virbyd.log}, and a descriptor standing for the daemon's stdout on it."""
    log = tmp_path / "virbyd.log"
    fd = descriptor(log)
    yield log, fd
    os.close(fd)


def logFileOf(log: Path, fd: int) -> LogFile:
    """
    The log as the daemon takes it at start: the path C{fd} has now, and C{fd}.  The path is
    the one the test opened: the kernel's own naming of it (L{openedPath}) has tests of its
    own, Linux's through C{/proc} and the Mac's through C{F_GETPATH}.
    """
    return LogFile(str(log), [(fd, io.StringIO())])


@pytest.mark.linux
def test_a_regular_file_is_named_by_its_path(stdout) -> None:
    log, fd = stdout
    assert openedPath(fd) == str(log)


@pytest.mark.linux
def test_a_renamed_file_is_named_by_its_new_name_so_the_path_is_taken_at_start(stdout) -> None:
    log, fd = stdout
    os.rename(log, log.with_name("virbyd.log.0"))
    log.touch()
    assert openedPath(fd) == str(log.with_name("virbyd.log.0"))


def test_a_pipe_has_no_path_to_reopen() -> None:
    reader, writer = os.pipe()
    try:
        assert openedPath(writer) is None
    finally:
        os.close(reader)
        os.close(writer)


@pytest.mark.linux
def test_a_deleted_file_has_no_path_to_reopen(stdout) -> None:
    log, fd = stdout
    os.unlink(log)
    assert openedPath(fd) is None


def test_after_a_rotation_new_lines_go_to_the_new_file(tmp_path: Path, logged) -> None:
    log, rotated = tmp_path / "virbyd.log", tmp_path / "virbyd.log.0"
    out, err = descriptor(log), descriptor(log)
    stream = io.StringIO()
    logFile = LogFile(str(log), [(out, stream), (err, stream)])
    try:
        write(out, "before\n")
        os.rename(log, rotated)  # newsyslog: rename, then a new file, then SIGHUP
        log.touch()
        write(out, "in between\n")
        assert logFile.reopen("SIGHUP")
        write(out, "after, from stdout\n")
        write(err, "after, from stderr\n")
    finally:
        os.close(out)
        os.close(err)
    assert rotated.read_text() == "before\nin between\n"
    assert log.read_text() == "after, from stdout\nafter, from stderr\n"
    assert logged == [f"SIGHUP: reopened the log {log}"]


def test_a_log_newsyslog_did_not_recreate_is_created_readable_by_all(stdout) -> None:
    """The daemon runs under umask 077, and the log it makes is still 0644, as promised."""
    log, out = stdout
    logFile = logFileOf(log, out)
    os.rename(log, log.with_name("virbyd.log.0"))
    previous = os.umask(DAEMON_UMASK)
    try:
        assert logFile.reopen("SIGHUP")
    finally:
        os.umask(previous)
    write(out, "after\n")
    assert log.read_text() == "after\n"
    assert oct(log.stat().st_mode & 0o777) == oct(LOG_MODE) == oct(0o644)


def test_a_log_newsyslog_recreated_keeps_the_mode_it_was_given(stdout) -> None:
    """newsyslog's entry names the mode; the daemon does not second-guess it."""
    log, out = stdout
    logFile = logFileOf(log, out)
    os.rename(log, log.with_name("virbyd.log.0"))
    log.touch(mode=0o600)
    log.chmod(0o640)
    assert logFile.reopen("SIGHUP")
    assert oct(log.stat().st_mode & 0o777) == oct(0o640)


def test_a_log_that_cannot_be_opened_keeps_the_old_file(tmp_path: Path, logged) -> None:
    folder = tmp_path / "log"
    folder.mkdir()
    log = folder / "virbyd.log"
    out = descriptor(log)
    logFile = logFileOf(log, out)
    try:
        os.rename(log, tmp_path / "virbyd.log.0")
        folder.rmdir()
        assert not logFile.reopen("SIGHUP")
        write(out, "still here\n")
    finally:
        os.close(out)
    assert (tmp_path / "virbyd.log.0").read_text() == "still here\n"
    assert logged == [
        f"SIGHUP: cannot reopen the log {log}: No such file or directory; "
        "still writing to the old file"
    ]


def test_without_a_file_there_is_nothing_to_reopen(logged) -> None:
    assert not LogFile(None, []).reopen("SIGHUP")
    assert logged == ["SIGHUP: the log is not a file, so there is nothing to reopen"]


@pytest.mark.linux
def test_stdout_and_stderr_are_both_moved_only_when_they_share_the_file(tmp_path: Path) -> None:
    """As launchd opens them: StandardOutPath and StandardErrorPath are the same file."""
    program = (
        "from virby.daemon.logfile import LogFile; f = LogFile.ofStandardStreams(); "
        "print(f.path, [fd for fd, _ in f.descriptors])"
    )
    log, other = tmp_path / "virbyd.log", tmp_path / "other.log"
    for stderr, moved in [(log, [1, 2]), (other, [1])]:
        with open(log, "ab") as out, open(stderr, "ab") as err:
            subprocess.run([sys.executable, "-c", program], stdout=out, stderr=err, check=True)
        assert log.read_text().splitlines()[-1] == f"{log} {moved}"


def test_on_macos_the_kernel_is_asked_with_f_getpath(stdout, monkeypatch) -> None:
    """fcntl(fd, F_GETPATH, buf) fills a MAXPATHLEN buffer with a NUL-terminated path."""
    import fcntl

    log, fd = stdout
    asked: list[tuple[int, int, int]] = []

    def getpath(fd: int, command: int, buffer: bytes) -> bytes:
        asked.append((fd, command, len(buffer)))
        return os.fsencode(log) + b"\0" * (len(buffer) - len(os.fsencode(log)))

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(fcntl, "fcntl", getpath)
    assert openedPath(fd) == str(log)
    assert asked == [(fd, getattr(fcntl, "F_GETPATH", 50), 1024)]


def test_the_clock_finds_the_rotation_and_the_new_file_gets_the_lines(stdout, logged) -> None:
    log, out = stdout
    rotated = log.with_name("virbyd.log.0")
    logFile = logFileOf(log, out)
    clock = Clock()
    check = logFile.watch(clock)
    try:
        clock.advance(CHECK_INTERVAL)
        assert not logFile.rotated() and logged == [], "nothing to do before a rotation"
        os.rename(log, rotated)  # newsyslog: rename, then a new file, no signal
        log.touch()
        write(out, "before the check\n")
        assert logFile.rotated()
        clock.advance(CHECK_INTERVAL)
        write(out, "after the check\n")
        assert not logFile.rotated()
    finally:
        check.stop()
    assert rotated.read_text() == "before the check\n"
    assert log.read_text() == "after the check\n"
    assert logged == [f"the log was rotated: reopened the log {log}"]


def test_a_rotation_that_made_no_new_file_counts(stdout) -> None:
    log, out = stdout
    logFile = logFileOf(log, out)
    os.rename(log, log.with_name("virbyd.log.0"))
    assert logFile.rotated()
    assert not LogFile(None, [(out, io.StringIO())]).rotated(), "no path, nothing to check"


def test_a_check_that_breaks_is_logged_not_lost(logged) -> None:
    class Broken(LogFile):
        def rotated(self) -> bool:
            raise OSError("the disk went away")

    clock = Clock()
    Broken("/nowhere", []).watch(clock)
    clock.advance(CHECK_INTERVAL)
    assert logged == ["the log's rotation check stopped"]
