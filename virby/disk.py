"""
The VM's disk files: copying a multi-gigabyte image cheaply and safely, and growing it.

A copy never appears half-written under its final name: it is made under a temporary name
in the destination's directory (ending in L{TEMP_SUFFIX}), flushed to disk, and renamed, so
a crash or a kill at any moment leaves either the old file or the complete new one.  A
leftover temporary file is garbage that the next C{virby prepare} removes.

The cheapest copy wins: an APFS clone on macOS (C{clonefile}), a reflink (C{FICLONE}) where a
Linux filesystem has one, and otherwise a sparse copy that reads only the data regions of the
source and writes no block that is all zeros, so a 100 GiB disk with 3 GiB in it costs 3 GiB.

This is plain blocking code.  Copying and growing disks runs in C{virby prepare} and in the
fresh disk's child process (L{virby.daemon.freshdisk}), never on the daemon's reactor.  The one
part the daemon runs on its reactor is L{writeAtomically} of a few bytes (the VM's pidfile
and MAC, once per boot; L{virby.runtime}): a write and two C{fsync}s of a tiny file, a few
milliseconds at most, worth it for a file that must never be found torn.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: Every temporary file Virby makes ends so; anything so named is safe to delete.
TEMP_SUFFIX = ".virby-tmp"

#: Linux's FICLONE ioctl, _IOW(0x94, 9, int): share all extents of one file with another.
FICLONE = 0x40049409

_CHUNK = 1024 * 1024
_ZEROS = bytes(_CHUNK)

# Why a clone can fail and a plain copy should be tried instead (other filesystem, no support).
_NO_CLONE = frozenset(
    {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
)


def temporaryName(path: str) -> str:
    """A fresh name beside C{path}, hidden, and recognisable as Virby's garbage after a crash."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsyncDirectory(path: str) -> None:
    """Make a rename in directory C{path} durable, so a power cut cannot undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """
    Yield a temporary name to build C{path}'s new content in; on success rename it over
    C{path} (after an fsync of the file and then of the directory), on failure delete it.
    """
    temporary = temporaryName(path)
    try:
        yield temporary
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsyncDirectory(os.path.dirname(path) or ".")


def writeAtomically(path: str, data: bytes, mode: int) -> None:
    """
    Replace C{path} with C{data} atomically: a crash leaves the old content or the new.  Fit
    for the reactor when C{data} is a few bytes (see above); never for more.
    """
    with replacing(path) as temporary:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)


def removeTemporaries(directory: str) -> list[str]:
    """Delete what an interrupted run left in C{directory}; return the names removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if entry.name.endswith(TEMP_SUFFIX) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def _clonefile(source: str, destination: str) -> bool:
    """macOS C{clonefile(2)}: an APFS copy-on-write clone.  False when it cannot clone here."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    result = libc.clonefile(os.fsencode(source), os.fsencode(destination), 0)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_CLONE:
        return False
    raise OSError(code, os.strerror(code), destination)


def _reflink(sourceFd: int, destinationFd: int) -> bool:
    """Linux C{FICLONE}: share extents (btrfs, XFS, bcachefs).  False when it cannot here."""
    try:
        fcntl.ioctl(destinationFd, FICLONE, sourceFd)
    except OSError as e:
        if e.errno in _NO_CLONE:
            return False
        raise
    return True


def _dataRegions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """
    The (start, end) ranges of C{fd} that may hold data, found with SEEK_DATA/SEEK_HOLE;
    the whole file when the filesystem cannot tell.
    """
    if not hasattr(os, "SEEK_DATA"):
        yield (0, size)
        return
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after position: the rest is a hole
                return
            if position == 0 and e.errno in (errno.EINVAL, errno.ENOTSUP):
                yield (0, size)
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield (start, end)
        position = end


def _sparseCopy(sourceFd: int, destinationFd: int, size: int) -> None:
    """Copy data regions only, leaving a hole for every chunk that is all zeros."""
    for start, end in _dataRegions(sourceFd, size):
        position = start
        while position < end:
            chunk = os.pread(sourceFd, min(_CHUNK, end - position), position)
            if not chunk:
                break
            if chunk != _ZEROS[: len(chunk)]:
                written = 0
                while written < len(chunk):
                    written += os.pwrite(destinationFd, chunk[written:], position + written)
            position += len(chunk)
    os.ftruncate(destinationFd, size)


def _reflinkFile(source: str, destination: str) -> bool:
    """L{_reflink} between paths; C{destination} is made, and left only when it worked."""
    sourceFd = os.open(source, os.O_RDONLY)
    try:
        destinationFd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            cloned = _reflink(sourceFd, destinationFd)
        finally:
            os.close(destinationFd)
    finally:
        os.close(sourceFd)
    if not cloned:
        os.unlink(destination)
    return cloned


#: A way to clone a file: C{(source, new destination) -> whether it cloned}.
Cloner = Callable[[str, str], bool]


def platformClone() -> tuple[str, Cloner] | None:
    """This system's copy-on-write clone, by name: APFS on macOS, reflink on Linux."""
    if sys.platform == "darwin":
        return ("clonefile", _clonefile)
    if sys.platform.startswith("linux"):
        return ("reflink", _reflinkFile)
    return None


def copy(source: str, destination: str, mode: int = 0o600, *, clone: bool = True) -> str:
    """
    Make C{destination} a copy of C{source} with permission C{mode}, replacing it atomically,
    by the cheapest method this system has (C{clone=False}: always the sparse copy).

    @return: the method used: C{"clonefile"}, C{"reflink"} or C{"sparse copy"}.
    """
    cloning = platformClone() if clone else None
    with replacing(destination) as temporary:
        if cloning is not None and cloning[1](source, temporary):
            os.chmod(temporary, mode)
            return cloning[0]
        sourceFd = os.open(source, os.O_RDONLY)
        try:
            destinationFd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                os.fchmod(destinationFd, mode)  # whatever the umask says
                _sparseCopy(sourceFd, destinationFd, os.fstat(sourceFd).st_size)
            finally:
                os.close(destinationFd)
        finally:
            os.close(sourceFd)
    return "sparse copy"


@dataclass(frozen=True)
class Resize:
    """What L{grow} found and did.  C{grown} is False when the file was already big enough."""

    before: int
    after: int
    grown: bool


def grow(path: str, size: int) -> Resize:
    """
    Extend C{path} to C{size} bytes (a sparse extension: costs nothing until the guest
    writes).  Never shrinks: cutting a disk image would cut the filesystem inside it.
    """
    before = os.stat(path).st_size
    if before >= size:
        return Resize(before=before, after=before, grown=False)
    os.truncate(path, size)
    return Resize(before=before, after=size, grown=True)
