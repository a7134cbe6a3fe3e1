"""
The daemon's log file, opened again after it was rotated.

Under launchd the daemon's stdout and stderr are C{/var/log/virbyd.log}, opened by launchd
before the daemon runs (C{StandardOutPath}, C{StandardErrorPath}).  The daemon cannot rotate
that file itself (it runs as C{_virby}, and C{/var/log} is root's), so macOS's C{newsyslog}
does, from the entry the nix-darwin module installs in C{/etc/newsyslog.d}: it renames the
file and creates an empty one in its place.  Left alone, the daemon would go on writing into
the renamed file, and once that is deleted, into nothing at all.

So the daemon notices: every minute (L{LogFile.watch}, on the reactor's clock) it compares the
file its stdout writes to with the file the path names now, and when they differ it opens the
path again and puts the new file under the same descriptors (C{dup2}), so every writer
(twistd's observer on C{sys.stdout}, a traceback on C{sys.stderr}) moves with it.  SIGHUP asks
for the same at once.  The entry tells newsyslog to send no signal: a signal needs a pid file,
and a pid file left by a daemon that crashed (an on-demand daemon is not restarted until the
next build) could name another process by then, which SIGHUP would kill.

The path is the one the descriptor had when the daemon started: after the rename, the
descriptor itself names the renamed file.

A log the daemon has to create itself (newsyslog made none) is given L{LOG_MODE}, as
newsyslog's entry and the activation script make it: the daemon's umask (C{077}, so that what
vfkit makes is owner-only) would otherwise leave it readable by C{_virby} alone, and the log
is promised readable by everyone.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from virby.logs import Logger

log = Logger()

#: How often the daemon checks whether its log was rotated: lines written in between go to
#: the renamed file, which newsyslog keeps.
CHECK_INTERVAL = 60.0

#: The mode of a log the daemon creates: readable by everyone, whatever the umask.
LOG_MODE = 0o644

#: macOS's fcntl command that names the file an open descriptor refers to (sys/fcntl.h).
_F_GETPATH = 50
#: macOS's MAXPATHLEN: the buffer F_GETPATH fills.
_MAXPATHLEN = 1024


def openedPath(fd: int) -> str | None:
    """
    The path of the regular file open at C{fd}, when it still names that file; C{None} for
    a pipe, a terminal, or a file since renamed or deleted.
    """
    try:
        opened = os.fstat(fd)
    except OSError:
        return None
    if not stat.S_ISREG(opened.st_mode):
        return None
    path = _pathOf(fd)
    if path is None:
        return None
    try:
        named = os.stat(path)
    except OSError:
        return None
    if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
        return None
    return path


def _pathOf(fd: int) -> str | None:
    """Ask the kernel: F_GETPATH on macOS, the /proc link on Linux."""
    if sys.platform == "darwin":
        import fcntl

        try:
            command = getattr(fcntl, "F_GETPATH", _F_GETPATH)
            answer = fcntl.fcntl(fd, command, bytes(_MAXPATHLEN))
        except OSError:
            return None
        return os.fsdecode(answer.split(b"\0", 1)[0])
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@dataclass(frozen=True)
class LogFile:
    """
    The file the daemon logs to, and the descriptors that write into it.

    @ivar path: what to open again; C{None} when the log is not a file (a pipe, a terminal:
        run by hand or under a test), and then there is nothing to reopen.
    @ivar descriptors: the descriptors to move to the new file, each with the stream that
        writes through it (flushed first, so no line goes to the wrong file).
    """

    path: str | None
    descriptors: Sequence[tuple[int, IO[str]]]

    @classmethod
    def ofStandardStreams(cls) -> LogFile:
        """stdout's file, and stderr too when it is the same file (as launchd opens them)."""
        path = openedPath(1)
        descriptors: list[tuple[int, IO[str]]] = [(1, sys.stdout)]
        if path is not None and _sameFile(1, 2):
            descriptors.append((2, sys.stderr))
        return cls(path, descriptors)

    def rotated(self) -> bool:
        """Whether the path no longer names the file the log is written to."""
        if self.path is None or not self.descriptors:
            return False
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return not _sameFile(self.descriptors[0][0], named)

    def reopen(self, why: str) -> bool:
        """
        Open the path again (creating it if the rotator has not) and move the descriptors
        to it.  On failure the daemon keeps writing where it did, and says why.
        """
        if self.path is None:
            log.info("{why}: the log is not a file, so there is nothing to reopen", why=why)
            return False
        try:
            fd = _openForAppend(self.path)
        except OSError as e:
            log.error(
                "{why}: cannot reopen the log {path}: {reason}; still writing to the old file",
                why=why,
                path=self.path,
                reason=e.strerror or str(e),
            )
            return False
        try:
            for target, stream in self.descriptors:
                stream.flush()
                os.dup2(fd, target)
        finally:
            os.close(fd)
        log.info("{why}: reopened the log {path}", why=why, path=self.path)
        return True

    def reopenIfRotated(self) -> None:
        if self.rotated():
            self.reopen("the log was rotated")

    def watch(self, clock: IReactorTime, interval: float = CHECK_INTERVAL) -> LoopingCall:
        """Check every C{interval} seconds, from the first interval on; stop the call to end."""
        check = LoopingCall(self.reopenIfRotated)
        check.clock = clock
        stopped = check.start(interval, now=False)
        stopped.addErrback(lambda failure: log.failure("the log's rotation check stopped", failure))
        return check


def _openForAppend(path: str) -> int:
    """
    Open C{path} to append to it.  A file this call creates gets L{LOG_MODE} set explicitly,
    since the umask trims the mode C{open} is given; a file that exists keeps the mode its
    maker (newsyslog, the activation script) chose.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, LOG_MODE)
    except FileExistsError:
        return os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.fchmod(fd, LOG_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def _sameFile(fd: int, other: int | os.stat_result) -> bool:
    """Whether C{fd} is open on the same file as descriptor or stat result C{other}."""
    try:
        first = os.fstat(fd)
        second = os.fstat(other) if isinstance(other, int) else other
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
