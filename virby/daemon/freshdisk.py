"""
The fresh disk of C{ephemeral} mode: before every boot, C{diff.img} becomes a new copy of
C{base.img}, grown to C{disk-size}, so nothing a build left in the VM survives a stop.

The copy is a clone where the filesystem has one (APFS C{clonefile} on a Mac: no time and no
space), and otherwise a sparse copy, which reads every data block of the image and can take
a while.  The daemon must not block on it, so it runs here, in a child process:

    python -m virby.daemon.freshdisk WORKING-DIRECTORY SIZE-IN-BYTES

which prints one line saying what it did, or one line on stderr saying why it could not, and
exits 1.  L{makeFreshDisk} is the daemon's side: it spawns the child with the daemon's own
Python and import path, bounded in time (L{virby.daemon.child.runBounded}), and kills it
when the boot is given up.

The child takes the working directory's lock, the one C{virby prepare} holds while it
replaces C{base.img}, so a boot never clones an image that an activation is half-way
through writing; and it removes what a killed copy left (its temporary C{diff.img}) first.
The copy itself is atomic (L{virby.disk.copy}): a copy cut short leaves the old C{diff.img}.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from virby import disk
from virby.daemon.child import Ended, runBounded
from virby.errors import VirbyError
from virby.layout import BASE_IMAGE, DIFF_IMAGE, PREPARE_FIX, PRIVATE
from virby.logs import Logger
from virby.reactors import IProcessReactor

log = Logger()

#: What the daemon keeps of the child's output: its one line, and a little more.
OUTPUT_LIMIT = 4096


class FreshDiskError(VirbyError):
    """No fresh disk could be made; the message says why, in one line."""


# -- the child


def make(working_directory: str, size: int) -> str:
    """
    Replace C{diff.img} with a copy of C{base.img} grown to C{size} bytes (a bigger image is
    kept as it is: a disk is never shrunk).  Blocking: for the child process only.

    @return: what was done, in one line.
    @raise FreshDiskError: when it cannot be done.
    """
    from virby.locks import locked

    base = os.path.join(working_directory, BASE_IMAGE)
    diff = os.path.join(working_directory, DIFF_IMAGE)
    try:
        with locked(working_directory):
            if not os.path.isfile(base):
                raise FreshDiskError(f"{base} is missing: {PREPARE_FIX}")
            _removeLeftovers(working_directory)
            method = disk.copy(base, diff, PRIVATE)
            resize = disk.grow(diff, size)
    except FileNotFoundError as e:
        raise FreshDiskError(
            f"{e.filename or working_directory} is missing: {PREPARE_FIX}"
        ) from None
    except OSError as e:
        where = e.filename or diff
        raise FreshDiskError(
            f"cannot make a fresh {DIFF_IMAGE} from {BASE_IMAGE} at {where}: "
            f"{e.strerror or e}; free space on its volume or fix its permissions"
        ) from None
    return (
        f"made a fresh {DIFF_IMAGE} from {BASE_IMAGE} ({method}), "
        f"{resize.after} bytes{' (grown)' if resize.grown else ''}"
    )


def _removeLeftovers(working_directory: str) -> None:
    """The temporary C{diff.img} of a copy that was killed (only that: the rest is not ours)."""
    prefix = f".{DIFF_IMAGE}."
    for entry in os.scandir(working_directory):
        if entry.name.startswith(prefix) and entry.name.endswith(disk.TEMP_SUFFIX):
            os.unlink(entry.path)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if len(arguments) != 2 or not arguments[1].isdigit():
        sys.stderr.write(
            "usage: python -m virby.daemon.freshdisk WORKING-DIRECTORY SIZE-IN-BYTES\n"
        )
        return 2
    try:
        done = make(arguments[0], int(arguments[1]))
    except FreshDiskError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    sys.stdout.write(f"{done}\n")
    return 0


# -- the daemon's side


def childEnvironment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """
    The daemon's environment, with its import path as C{PYTHONPATH}, so the child imports
    this very Virby, as C{multiprocessing}'s spawn does: nixpkgs' wrapper of C{virbyd} puts
    the package's site directories on C{sys.path} inside the script, where a bare
    C{python -m} would not find them.
    """
    environ = dict(os.environ if environ is None else environ)
    environ["PYTHONPATH"] = os.pathsep.join(entry for entry in sys.path if entry)
    return environ


def _lastLine(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def makeFreshDisk(
    reactor: IProcessReactor,
    working_directory: str,
    size: int,
    timeout: float,
    executable: str = sys.executable,
) -> Deferred[str]:
    """
    Run the child (L{runBounded}); the result fires with its line, or fails with a
    L{FreshDiskError} (its own line, or the timeout).  Cancelling it (the boot was given up)
    kills the child.
    """

    def expired() -> None:
        log.warn("making a fresh disk took longer than {timeout:.0f}s: killing it", timeout=timeout)

    def judge(ended: Ended) -> str:
        if ended.timedOut:
            raise FreshDiskError(
                f"making a fresh {DIFF_IMAGE} took longer than {timeout:.0f}s "
                "(start-timeout); is the working directory's volume slow or full?"
            )
        if ended.code == 0:
            return _lastLine(ended.out) or f"made a fresh {DIFF_IMAGE}"
        why = _lastLine(ended.err)
        if not why:
            why = (
                f"killed by signal {ended.signal}"
                if ended.signal is not None
                else f"exited with status {ended.code}"
            )
        raise FreshDiskError(f"no fresh {DIFF_IMAGE}: {why}")

    def unstarted(failure: Failure) -> str:
        failure.trap(OSError)  # a cancellation passes on as it is
        raise FreshDiskError(f"cannot run {executable} to make a fresh disk: {failure.value}")

    started = runBounded(
        reactor,
        executable,
        [executable, "-m", "virby.daemon.freshdisk", working_directory, str(size)],
        timeout=timeout,
        env=childEnvironment(),
        path=working_directory,
        onTimeout=expired,
        limit=OUTPUT_LIMIT,
    )
    return started.addCallbacks(judge, unstarted)


if __name__ == "__main__":
    sys.exit(main())
