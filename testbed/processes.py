"""
Real processes for the end-to-end tests and the benchmarks (the vfkit emulator, sshd, ssh,
twistd, nix): started, read line by line, waited for, and killed with all they started.
Waits are driven by events the processes report (a line on their output, their exit, a
socket accepting) and bounded by a deadline; nothing here sleeps.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import IO


class ProcessUnderTest:
    """
    A child process whose merged stdout/stderr is kept whole, so a failing test can show it,
    and can be waited on line by line.  It runs in its own session so that cleanup can kill
    everything it started.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        self.process = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            pass_fds=pass_fds,
        )
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), False)
        self.output = b""
        self._consumed = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_available(self, timeout: float) -> bool:
        """Read what the child wrote within C{timeout}; False once its output is closed."""
        stream = self.process.stdout
        assert stream is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)
            if not selector.select(max(timeout, 0)):
                return True
        chunk = stream.read()
        if chunk == b"":
            return False
        if chunk:
            self.output += chunk
        return True

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[bytes]:
        """
        Wait for output matching the regular expression C{pattern} after the last match.

        @raise AssertionError: with the whole output when it does not come in time.
        """
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self._consumed)
            if match:
                self._consumed = match.end()
                return match
            remaining = deadline - time.monotonic()
            more = remaining > 0 and self._read_available(remaining)
            if not more and regex.search(self.output, self._consumed) is None:
                raise AssertionError(
                    f"{pattern!r} not seen from {self.argv[0]} within {timeout}s "
                    f"(exit status {self.process.poll()}); output:\n{self.text()}"
                )

    def wait_for_count(self, pattern: str, count: int, timeout: float = 30.0) -> int:
        """
        Wait until the whole output holds C{count} lines matching C{pattern} (a multi-line
        regular expression), wherever they are: for events a test counts rather than
        follows, which L{wait_for_line}'s one cursor would skip.

        @raise AssertionError: with the whole output when they do not come in time.
        """
        regex = re.compile(pattern.encode(), re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            found = len(regex.findall(self.output))
            if found >= count:
                return found
            remaining = deadline - time.monotonic()
            if not (remaining > 0 and self._read_available(remaining)):
                if len(regex.findall(self.output)) >= count:
                    return count
                raise AssertionError(
                    f"{count} of {pattern!r} not seen from {self.argv[0]} within {timeout}s "
                    f"({found} seen, exit status {self.process.poll()}); output:\n{self.text()}"
                )

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and collect the rest of its output."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.argv[0]} still running after {timeout}s; output:\n{self.text()}"
            ) from None
        while self._read_available(0.5):
            pass
        return code

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def text(self) -> str:
        self._drain()
        return self.output.decode(errors="replace")

    def _drain(self) -> None:
        stream = self.process.stdout
        if stream is None or stream.closed:
            return
        try:
            chunk = stream.read()
        except (OSError, ValueError):
            return
        if chunk:
            self.output += chunk

    def kill_all(self) -> None:
        """Kill the process's whole session: cleanup that works even when a test failed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now on C{host}."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def pids_of(pattern: str) -> list[int]:
    """PIDs whose command line matches C{pattern}, read from /proc (Linux)."""
    regex = re.compile(pattern)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if regex.search(cmdline) and int(entry) != os.getpid():
            found.append(int(entry))
    return found


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """
    Wait until none of C{pids} exists, on their exit events (pidfd), not by polling;
    returns those still alive at the deadline.
    """
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(fd, selectors.EVENT_READ)
                if not selector.select(max(0.0, deadline - time.monotonic())):
                    alive.append(pid)
        finally:
            os.close(fd)
    return alive
