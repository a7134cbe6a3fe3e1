"""
launchd's socket-activated job, played on Linux for the end-to-end tests.

The nix-darwin module has launchd hold the builder's listening socket (C{Sockets.Listener})
and run the daemon with it; when the daemon exits, launchd keeps the socket, connections
wait in its listen queue, and launchd starts the daemon again: at once for an always-on
job (C{KeepAlive}), at the next waiting connection for an on-demand one, and never sooner
than C{ThrottleInterval} (10 s unless set) after the previous start.  Renewing the VM rests
on exactly that, and C{systemd-socket-activate}, which runs its command once, cannot play
it.

This module is two things:

  - the supervisor itself, a small program (C{python -m testbed.supervisor}): it binds and
    listens on a loopback TCP port, keeps that socket for its whole life, and runs the
    daemon with it by systemd's protocol (fd 3, C{LISTEN_FDS=1}, C{LISTEN_PID} the
    daemon's own pid), which the daemon adopts with C{listen = systemd:domain=INET:index=0};
    it reports each start and exit as one line on its output, which the daemon shares;
  - L{Supervisor}, the tests' handle on it: it starts the program as a
    L{ProcessUnderTest}, reads the port it bound, waits for starts and exits, and stops it
    with everything it started.

The supervisor is a process of its own, not an object in the test's process, so that it
respawns the daemon while the test blocks on something else (an ssh session, a build) and
so that killing its process group kills the daemon too.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from testbed.processes import ProcessUnderTest, wait_gone

#: launchd's default C{ThrottleInterval}: a job is not started more than once in 10 s.
THROTTLE = 10.0
#: The seconds a stopping daemon gets between SIGTERM and SIGKILL: the VM's graceful stop
#: fits in it.
GRACE = 30.0
#: launchctl listens with C{listen(fd, -1)}, the system's largest queue; Python takes no
#: negative backlog, so ask for C{SOMAXCONN}, which Linux caps the same way.
BACKLOG = socket.SOMAXCONN
#: The name launchd knows the socket by, in the plist and in C{listen = launchd:...}.
SOCKET_NAME = "Listener"
#: Lines the supervisor reports, each prefixed so they stand out in the daemon's log.
PREFIX = "supervisor: "

#: C{sh} as the job's first program: it knows its own pid (C{$$}) before it becomes the
#: daemon by C{exec}, which is how systemd's C{LISTEN_PID} can name the daemon itself.  The
#: socket is named too (C{LISTEN_FDNAMES}), as Twisted adopts only named sockets.
WRAPPER = 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES="$1"; shift; exec "$@" 3<&{fd} {fd}<&-'


def report(line: str) -> None:
    """One line on the shared output, in one write so the daemon's lines never split it."""
    os.write(1, (PREFIX + line + "\n").encode())


def listen(host: str, port: int) -> socket.socket:
    """
    The job's socket, bound and listening, on a descriptor from 4 to 9: above 3, where the
    daemon finds it, so the wrapper's redirection does not close what it copies; one digit,
    as C{dash} reads no other in a redirection.
    """
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bound.bind((host, port))
    bound.listen(BACKLOG)
    moved = fcntl.fcntl(bound.fileno(), fcntl.F_DUPFD_CLOEXEC, 4)
    bound.close()
    if moved > 9:
        raise SystemExit(f"no descriptor from 4 to 9 is free for the socket (got {moved})")
    return socket.socket(fileno=moved)


class Job:
    """
    One launchd job: its socket, its command, and the rule for starting it again.
    Blocking by design: it is the whole of its own process.
    """

    def __init__(
        self, held: socket.socket, command: Sequence[str], keepAlive: bool, throttle: float
    ) -> None:
        self.held = held
        self.command = list(command)
        self.keepAlive = keepAlive
        self.throttle = throttle
        self.child: subprocess.Popen[bytes] | None = None
        self.lastStart: float | None = None
        self.stopping = False
        self.wakeRead, wakeWrite = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeWrite)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        """Stop at the next wake-up: the loop, not the handler, ends the child."""
        self.stopping = True

    def run(self) -> int:
        """Start, watch and restart the daemon until asked to stop; then stop it."""
        while not self.stopping:
            if self.child is None:
                self._startWhenDue()
            else:
                self._watchChild()
        self._stopChild()
        self.held.close()
        report("stopped")
        return 0

    def _wait(self, fd: int | None, timeout: float | None) -> bool:
        """Wait for C{fd} to be readable, a signal, or C{timeout}: whether C{fd} is ready."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.wakeRead, selectors.EVENT_READ)
            if fd is not None:
                selector.register(fd, selectors.EVENT_READ)
            ready = selector.select(timeout)
        with contextlib.suppress(BlockingIOError):
            os.read(self.wakeRead, 512)
        return any(key.fd == fd for key, _ in ready)

    def _startWhenDue(self) -> None:
        """
        launchd's rule for a job that is not running: an on-demand job waits for a
        connection in the socket's queue; either kind waits out the throttle.
        """
        if not self.keepAlive:
            report("waiting for a connection")
            if not self._wait(self.held.fileno(), None):
                return
        if self.lastStart is not None:
            due = self.lastStart + self.throttle - time.monotonic()
            if due > 0:
                report(f"throttled: starting in {due:.1f}s")
                self._wait(None, due)
                if self.stopping or time.monotonic() < self.lastStart + self.throttle:
                    return
        self._start()

    def _start(self) -> None:
        fd = self.held.fileno()
        argv = ["/bin/sh", "-c", WRAPPER.format(fd=fd), "job", SOCKET_NAME, *self.command]
        self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(fd,))
        self.lastStart = time.monotonic()
        # CLOCK_MONOTONIC is the machine's, so a test can hold two starts to the throttle.
        report(f"started pid {self.child.pid} at {self.lastStart:.3f}")

    def _watchChild(self) -> None:
        assert self.child is not None
        pidfd = os.pidfd_open(self.child.pid)
        try:
            if self._wait(pidfd, None):
                self._reap()
        finally:
            os.close(pidfd)

    def _reap(self) -> None:
        assert self.child is not None
        status = self.child.wait()
        report(f"pid {self.child.pid} exited with status {status}")
        self.child = None

    def _stopChild(self) -> None:
        """SIGTERM, as launchd stops a job; SIGKILL after L{GRACE}, as launchd does too."""
        if self.child is None:
            return
        self.child.terminate()
        try:
            self.child.wait(GRACE)
        except subprocess.TimeoutExpired:
            self.child.kill()
        self._reap()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.supervisor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--keep-alive", action="store_true", help="always on (KeepAlive)")
    parser.add_argument("--throttle", type=float, default=THROTTLE, help="ThrottleInterval")
    parser.add_argument("command", nargs="+")
    options = parser.parse_args(argv)
    held = listen(options.host, options.port)
    host, port = held.getsockname()
    report(f"listening on {host}:{port} (backlog {BACKLOG})")
    job = Job(held, options.command, options.keep_alive, options.throttle)
    return job.run()


@dataclass(frozen=True)
class Start:
    """One start of the daemon: its pid and when (C{time.monotonic()}, the machine's)."""

    pid: int
    at: float


@dataclass(frozen=True)
class Exit:
    """One exit of the daemon: its pid and status (negative: killed by that signal)."""

    pid: int
    status: int


STARTED = re.compile(rf"^{PREFIX}started pid (\d+) at ([\d.]+)$", re.MULTILINE)
EXITED = re.compile(rf"^{PREFIX}pid (\d+) exited with status (-?\d+)$", re.MULTILINE)


class Supervisor:
    """
    The tests' handle on a supervisor program: what it bound, what it started, and its
    stop.  Its output is the daemon's too, so a test reads the daemon's log through it.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        keepAlive: bool,
        throttle: float = THROTTLE,
        port: int = 0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "testbed.supervisor", "--port", str(port),
                "--throttle", str(throttle), *(["--keep-alive"] if keepAlive else []),
                "--", *command]  # fmt: skip
        self.process = ProcessUnderTest(argv, env=env, cwd=cwd)
        bound = self.process.wait_for_line(rf"{PREFIX}listening on [\d.]+:(\d+)", timeout=30)
        self.port = int(bound.group(1))

    def starts(self) -> list[Start]:
        """Each start, in order."""
        return [Start(int(pid), float(at)) for pid, at in STARTED.findall(self.process.text())]

    def exits(self) -> list[Exit]:
        """Each exit, in order."""
        return [Exit(int(pid), int(code)) for pid, code in EXITED.findall(self.process.text())]

    def waitStarts(self, count: int, timeout: float = 60.0) -> list[Start]:
        """Wait until the daemon has been started C{count} times; the starts."""
        self.process.wait_for_count(STARTED.pattern, count, timeout)
        return self.starts()

    def waitExits(self, count: int, timeout: float = 60.0) -> list[Exit]:
        """Wait until the daemon has exited C{count} times; the exits."""
        self.process.wait_for_count(EXITED.pattern, count, timeout)
        return self.exits()

    def text(self) -> str:
        return self.process.text()

    def stop(self, timeout: float = GRACE + 10) -> int:
        """
        Stop the supervisor (it stops the daemon and closes the socket); its status.  Then
        kill what is left of its process group and check that every daemon it started is
        gone, so that a test that passes left nothing behind.
        """
        self.process.signal(signal.SIGTERM)
        try:
            status = self.process.wait_exit(timeout)
        finally:
            self.process.kill_all()
        left = wait_gone([self.process.pid, *(start.pid for start in self.starts())], timeout=10)
        assert left == [], f"still running after the supervisor stopped: {left}"
        return status


if __name__ == "__main__":
    raise SystemExit(main())
