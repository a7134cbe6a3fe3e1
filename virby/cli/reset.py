"""
C{virby reset [--force]}: stop the VM and make C{diff.img}, its writable disk, anew from
C{base.img}, grown to C{disk-size}: what to do when the VM's own state is broken (a full or
damaged disk, a guest that no longer boots) and nothing in it is worth keeping.

Who may do it: the working directory is the daemon's own and owner-only, so, like
C{virby prepare}, reset runs as root (C{sudo virby reset}).  The new disk is given to the
owner of C{base.img} (the daemon's user, as prepare leaves it), since vfkit opens it for
writing as that user.

What keeps it safe:

  - the VM is stopped through the daemon's control socket, as C{virby stop} stops it, and
    refused while connections are open (builds may be running) unless C{--force}, which
    closes them; with no daemon running there is nothing to stop;
  - C{vm.lock} is then taken (L{virby.layout.VM_LOCK}, which vfkit holds for its life): a
    VM still running on the disk (a daemon's that boots again at once, or one a dead daemon
    left) refuses the reset, and while reset holds it no boot can begin on the disk;
  - the copy runs under the working directory's lock (L{virby.locks.locked}), the one
    C{virby prepare} and the daemon's fresh disk take, so none of them races it;
  - the copy is atomic (L{virby.disk.copy}): a reset cut short leaves the old disk.

The VM is not booted again: the next build (or C{virby start}) boots it on the new disk.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from virby import disk
from virby.cli.client import DaemonDown, NotAllowed, ask
from virby.cli.startstop import STOP_TIMEOUT
from virby.config import MIB, Config
from virby.errors import VirbyError
from virby.layout import (
    BASE_IMAGE,
    CONTROL_SOCKET,
    DIFF_IMAGE,
    PREPARE_FIX,
    PRIVATE,
    VM_LOCK,
    checkWorkingDirectory,
    readOnly,
)
from virby.locks import FileLock, LockError, locked
from virby.wire import Refused

#: The fix when this user may not write the working directory.
SUDO_FIX = "run `sudo virby reset` (the working directory is the daemon's own)"


class ResetError(VirbyError):
    """The disk cannot be reset; the message names the cause and the fix."""


def runReset(
    config: Config,
    force: bool,
    out: TextIO | None = None,
    askDaemon: Callable[..., dict[str, Any]] = ask,
) -> int:
    """
    C{virby reset [--force]}: 0 once C{diff.img} is new.

    @param askDaemon: L{virby.cli.client.ask}, or a stand-in.
    @raise VirbyError: when it cannot be done, in one line; the disk is left as it was.
    """
    out = out or sys.stdout
    _checkWritable(config)
    stopped = _stopVM(config, force, askDaemon)
    method, size = remakeDisk(config)
    out.write(
        f"Virby: {stopped}; made {DIFF_IMAGE} anew from {BASE_IMAGE} ({method}), "
        f"{_size(size)}; the next build (or `virby start`) boots it\n"
    )
    return 0


def _checkWritable(config: Config) -> None:
    """Before the VM is stopped: a reset that cannot write the disk must not stop it."""
    wd = config.working_directory
    checkWorkingDirectory(wd, writable=False)
    if not readOnly(wd) and not os.access(wd, os.W_OK | os.X_OK):
        raise ResetError(f"cannot write {wd} as uid {os.getuid()}: {SUDO_FIX}")
    checkWorkingDirectory(wd, (BASE_IMAGE,))


def _stopVM(config: Config, force: bool, askDaemon: Callable[..., dict[str, Any]]) -> str:
    """Stop the VM through the daemon, as C{virby stop} does; say what happened."""
    try:
        reply = askDaemon(config.path(CONTROL_SOCKET), "stop", force=force, timeout=STOP_TIMEOUT)
    except DaemonDown:
        return "no daemon is running"
    except NotAllowed:
        raise ResetError(f"only root may ask the daemon to stop the VM: {SUDO_FIX}") from None
    except Refused as e:
        why = str(e).replace("`virby stop --force`", "`virby reset --force`")
        raise ResetError(f"the VM was not stopped, so its disk is kept: {why}") from None
    if not reply.get("stopped"):
        return "the VM was not running"
    closed = reply.get("closed_connections") or 0
    also = f" and closed {closed} connection{'s' if closed != 1 else ''}" if closed else ""
    return f"stopped the VM{also}"


def remakeDisk(config: Config) -> tuple[str, int]:
    """
    Replace C{diff.img} with a copy of C{base.img} grown to C{disk-size}, holding C{vm.lock}
    (no VM runs on the disk, none can boot) and the working directory's lock.

    @return: how it was copied (L{virby.disk.copy}), and its size in bytes.
    @raise ResetError: when a VM still holds the disk, or the copy fails.
    """
    wd = config.working_directory
    base, diff = config.path(BASE_IMAGE), config.path(DIFF_IMAGE)
    vmLock = FileLock(config.path(VM_LOCK))
    try:
        if not vmLock.acquire():
            holder = vmLock.holder()
            raise ResetError(
                f"a VM still runs on {diff} ({f'pid {holder}' if holder else 'a process'} "
                f"holds {vmLock.path}): stop it with `virby stop`, then reset again"
            )
    except LockError as e:
        raise ResetError(f"{e}; {PREPARE_FIX}") from None
    try:
        owner = os.stat(base)
        # The daemon's user opens the lock when it boots next: a lock file this run just
        # made must be its, not root's.
        _giveTo(vmLock.fileno(), owner)
        with locked(wd):
            method = disk.copy(base, diff, PRIVATE)
            _giveTo(diff, owner)
            resize = disk.grow(diff, config.disk_size)
    except FileNotFoundError as e:
        raise ResetError(f"{e.filename or base} is missing: {PREPARE_FIX}") from None
    except OSError as e:
        raise ResetError(
            f"cannot make {diff} anew from {BASE_IMAGE}: {e.strerror or e}; free space on "
            "its volume or fix its permissions, and reset again"
        ) from None
    finally:
        vmLock.release()
    return method, resize.after


def _giveTo(target: str | int, owner: os.stat_result) -> None:
    """Give a file (by path or descriptor) the owner of C{owner}, when it differs."""
    info = os.stat(target)
    if (info.st_uid, info.st_gid) != (owner.st_uid, owner.st_gid):
        os.chown(target, owner.st_uid, owner.st_gid)


def _size(n: int) -> str:
    for unit, factor in (("TiB", 1024 * 1024 * MIB), ("GiB", 1024 * MIB), ("MiB", MIB)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"
