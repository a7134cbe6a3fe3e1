"""
The emulated guest's guardian: the process that *is* the VM's inside.

It starts sshd as its child and, as a child subreaper, inherits every process sshd forks
(OpenSSH sessions call setsid, so a process-group kill would miss them).  When told to power
off (SIGTERM), or when the emulator dies (even by SIGKILL: the kernel sends the parent-death
signal), it kills every descendant and exits.  No guest process outlives its VM.

Run as ``python -m virby.emulator.guardian PARENT_PID SSHD_ARGV...``.  It is a tiny
stand-alone process with nothing to multiplex, so it simply waits for signals.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def descendants(root: int) -> list[int]:
    """Every process below C{root}, read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _killAll() -> None:
    """SIGKILL everything below us until nothing is left, reaping as we go."""
    for _ in range(50):
        living = descendants(os.getpid())
        if not living:
            return
        for pid in living:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != parent:
        return 0
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sshd = subprocess.Popen(command) if command else None
    # Block the signals we wait for only now: a blocked mask would be inherited by sshd.
    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    while not stopping:
        received = signal.sigwait(watched)
        _reap()
        if received in (signal.SIGTERM, signal.SIGINT):
            break
        if sshd is not None and sshd.poll() is not None:
            break
    _killAll()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
