"""
The fresh disk of C{ephemeral} mode: before every boot, C{diff.img} becomes a new copy of
C{base.img}, grown to C{disk-size}, so nothing a build left in the VM survives a stop.

The copy is a clone where the filesystem has one (APFS C{clonefile} on a Mac: no time and no
space), and otherwise a sparse copy, which reads every data block of the image and can take
a while.  The daemon must not block on it, so it runs here, in a child process:

    python -m virby.daemon.freshdisk WORKING-DIRECTORY SIZE-IN-BYTES

which prints one line saying what it did, or one line on stderr saying why it could not, and
exits 1.  L{makeFreshDisk} is the daemon's side: it spawns the child with the daemon's own
Python and import path, bounds it with a timeout, and kills it when the boot is given up.

The child takes the working directory's lock, the one C{virby prepare} holds while it
replaces C{base.img}, so a boot never clones an image that an activation is half-way
through writing; and it removes what a killed copy left (its temporary C{diff.img}) first.
The copy itself is atomic (L{virby.disk.copy}): a copy cut short leaves the old C{diff.img}.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from virby import disk
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


class _FreshDiskProtocol(ProcessProtocol):
    # Set by makeConnection, which spawnProcess calls before it returns.
    transport: IProcessTransport

    def __init__(self, result: Deferred[str], timeout: float) -> None:
        self.result = result
        self._timeout = timeout
        self._out = b""
        self._err = b""
        self.timer: IDelayedCall | None = None
        self.timedOut = False

    def outReceived(self, data: bytes) -> None:
        self._out = (self._out + data)[-OUTPUT_LIMIT:]

    def errReceived(self, data: bytes) -> None:
        self._err = (self._err + data)[-OUTPUT_LIMIT:]

    def kill(self) -> None:
        with contextlib.suppress(ProcessExitedAlready):
            self.transport.signalProcess("KILL")

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.result.called:
            return
        if self.timedOut:
            self.result.errback(
                FreshDiskError(
                    f"making a fresh {DIFF_IMAGE} took longer than {self._timeout:.0f}s "
                    "(start-timeout); is the working directory's volume slow or full?"
                )
            )
            return
        code = getattr(reason.value, "exitCode", None)
        if code == 0:
            self.result.callback(_lastLine(self._out) or f"made a fresh {DIFF_IMAGE}")
            return
        why = _lastLine(self._err)
        if not why:
            sig = getattr(reason.value, "signal", None)
            why = f"killed by signal {sig}" if sig is not None else f"exited with status {code}"
        self.result.errback(FreshDiskError(f"no fresh {DIFF_IMAGE}: {why}"))


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
    Run the child; the result fires with its line, or fails with a L{FreshDiskError} (its
    own line, or the timeout).  Cancelling it (the boot was given up) kills the child.
    """
    protocol: _FreshDiskProtocol

    def cancel(d: Deferred[str]) -> None:
        protocol.kill()

    result: Deferred[str] = Deferred(cancel)
    protocol = _FreshDiskProtocol(result, timeout)
    try:
        reactor.spawnProcess(
            protocol,
            executable,
            [executable, "-m", "virby.daemon.freshdisk", working_directory, str(size)],
            env=childEnvironment(),
            path=working_directory,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
    except OSError as e:
        return fail(FreshDiskError(f"cannot run {executable} to make a fresh disk: {e}"))
    protocol.transport.closeStdin()

    def expire() -> None:
        protocol.timedOut = True
        log.warn("making a fresh disk took longer than {timeout:.0f}s: killing it", timeout=timeout)
        protocol.kill()

    protocol.timer = reactor.callLater(timeout, expire)
    return result


if __name__ == "__main__":
    sys.exit(main())
