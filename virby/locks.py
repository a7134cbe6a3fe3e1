"""
Locks that the kernel releases when their holder dies: C{flock(2)} on a file held open.

A pid written into a file outlives its process.  The daemon used one (Twisted's
C{FilesystemLock}, judged by C{kill(pid, 0)}) and, after a crash or a power loss, the pid
in the working directory could belong to another process: the daemon then refused to start,
forever, until someone deleted the file by hand.  An flock has no state to go stale: it
lives exactly as long as some process holds the open file, and a dead process holds none.
The pid written into the file is for people (and error messages) only; nothing trusts it.

The file is also removed when a lock is released for good, so a daemon that stopped (or
failed to start) leaves nothing behind.  That is safe because L{FileLock.acquire} checks,
after locking, that the path still names the file it locked: a locker that opened the file
just before it was removed finds that out and tries again on the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator

from virby.errors import VirbyError
from virby.layout import PREPARE_FIX


class LockError(VirbyError):
    """The lock file cannot be used; the message names the path and the fix."""


class FileLock:
    """
    An exclusive, non-blocking lock on the file at C{path}, created on demand.

    @ivar path: the lock file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        """The locked file's descriptor; a child that inherits it holds the lock too."""
        if self._fd is None:
            raise ValueError(f"{self.path} is not locked")
        return self._fd

    def acquire(self) -> bool:
        """
        Take the lock if nobody holds it, without waiting, and write our pid into it.

        @return: C{False} when another process holds it.
        @raise LockError: when the file cannot be a lock (a directory, no permission).
        """
        if self._fd is not None:
            return True
        for _ in range(16):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                os.close(fd)
                raise LockError(f"cannot lock {self.path}: {e.strerror or e}") from None
            if self._stillNamed(fd):
                self._fd = fd
                self._note(fd)
                return True
            os.close(fd)
        raise LockError(f"cannot lock {self.path}: it keeps being replaced")

    def holder(self) -> str | None:
        """What the holder wrote into the file (its pid), for messages; C{None} if unknown."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            text = os.read(fd, 64).decode("ascii", "replace").strip()
        except OSError:
            return None
        finally:
            os.close(fd)
        return text if text.isdigit() else None

    def release(self, remove: bool = False) -> None:
        """
        Let go of the lock; with C{remove}, take the file away first (while still holding
        it, so no one can lock a file that is about to vanish and believe it theirs).
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(fd)

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(2):
            try:
                return os.open(self.path, flags, 0o600)
            except OSError as e:
                if e.errno == errno.ELOOP and _isSymlink(self.path):
                    # Junk (an older version's lock was a symlink): never follow it.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                if e.errno == errno.EISDIR:
                    raise LockError(
                        f"{self.path} is a directory, not a lock file: remove it"
                    ) from None
                raise LockError(f"cannot open {self.path}: {e.strerror or e}") from None
        raise LockError(f"cannot open {self.path}: a symlink keeps coming back")

    def _stillNamed(self, fd: int) -> bool:
        """The path still names the file locked (it was not removed or replaced meanwhile)."""
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _note(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _isSymlink(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def takeLock(path: str, error: type[VirbyError], busy: Callable[[FileLock], str]) -> FileLock:
    """
    The lock at C{path}, taken, or C{error} with one line: C{busy(lock)} when another process
    holds it, the fix when the file cannot be a lock (it is C{virby prepare}'s to repair).
    """
    lock = FileLock(path)
    try:
        acquired = lock.acquire()
    except LockError as e:
        raise error(f"{e}; {PREPARE_FIX}") from None
    if not acquired:
        raise error(busy(lock))
    return lock


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """
    Serialise concurrent runs on one directory (two activations, or a person and one), and
    the daemon's fresh disk (L{virby.daemon.freshdisk}) with them.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def lockedIfFree(path: str) -> Iterator[bool]:
    """
    The lock of L{locked}, taken only if nobody holds it: yields whether it was taken.  For
    work that may wait for a later chance (the daemon's retiring of the previous SSH keys,
    L{virby.rotation}) and must never wait for an activation to finish.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)
