"""
vfkit, the hypervisor process: its command line, its console, and how it is stopped.

The daemon runs one vfkit at a time (the lifecycle sees to that).  The guest's serial
console goes to C{<wd>/serial.log} (C{virtio-serial,logFilePath=...}), never to vfkit's
stdio: C{virtio-serial,stdio} makes vfkit put its stdin into raw mode with C{tcgetattr}
(vfkit C{pkg/vf/virtio.go}, C{setRawMode}), which fails on the pipe a supervised vfkit
gets, so the VM would never start.  vfkit truncates the file at each start; the last lines
explain a failed boot or a dead VM, and only the file's tail is ever read.  vfkit's own log
comes on stderr and goes to the daemon's log.  Its exit is noticed the moment it happens,
through C{processEnded}, not by polling.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from virby import layout
from virby.config import Config
from virby.daemon.lifecycle import ExitInfo
from virby.daemon.observers import OneShot
from virby.daemon.rest import RestDropped, RestError, VfkitRestClient
from virby.disk import writeAtomically
from virby.errors import VirbyError, oneLine
from virby.locks import FileLock
from virby.logs import Logger
from virby.reactors import IVMReactor
from virby.runtime import removeQuietly
from virby.vfkitflags import HostPlan, vfkitArguments

log = Logger()

#: Console lines kept in memory when vfkit ends, for the message about its end.
CONSOLE_LINES = 50
#: How much of the console's end is read for its last lines: a console that grew to
#: gigabytes costs the reactor no more than a small one.
TAIL_BYTES = 16 * 1024


def readTail(path: str, lines: int, limit: int = TAIL_BYTES) -> list[str]:
    """
    The last C{lines} lines of the file at C{path}, reading at most C{limit} bytes from its
    end; C{[]} when there is no such file.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - limit)
            f.seek(start)
            data = f.read(limit)
    except OSError:
        return []
    text = data.decode(errors="replace").split("\n")
    if start > 0:
        text = text[1:]  # the first line was cut by the seek
    if text and text[-1] == "":
        text.pop()
    return [line.rstrip("\r") for line in text][-lines:] if lines > 0 else []


@dataclass(frozen=True)
class ExitStatus:
    """
    How vfkit ended: an exit code, or the signal that killed it, and the last error vfkit
    itself reported (its own words say why far better than "status 1").
    """

    code: int | None
    signal: int | None
    message: str | None = None

    @classmethod
    def fromReason(cls, reason: Failure, message: str | None = None) -> ExitStatus:
        value = reason.value
        return cls(getattr(value, "exitCode", None), getattr(value, "signal", None), message)

    def describe(self) -> str:
        if self.signal is not None:
            how = f"was killed by signal {self.signal}"
        else:
            how = f"exited with status {self.code}"
        if self.message and (self.signal is not None or self.code != 0):
            how += f" (vfkit: {self.message})"
        return how


_LOGRUS_LEVEL = re.compile(r'(?:^|\s)level=("?)(\w+)\1')
_LOGRUS_MESSAGE = re.compile(r'(?:^|\s)msg=("(?:[^"\\]|\\.)*"|\S+)')


def vfkitError(line: str) -> str | None:
    """
    The error in one line of vfkit's stderr, if it reports one: a logrus line at level
    error, fatal or panic (its C{msg}), or a bare line (not logrus's).  The error vfkit
    exits with comes through cobra instead (L{VfkitProtocol}).
    """
    text = line.strip()
    level = _LOGRUS_LEVEL.search(text)
    if level is None:
        return text[:300] or None
    if level.group(2).lower() not in ("error", "fatal", "panic"):
        return None
    found = _LOGRUS_MESSAGE.search(text)
    if found is None:
        return text[:300]
    message = found.group(1)
    if message.startswith('"'):
        try:
            message = json.loads(message)
        except ValueError:
            message = message.strip('"')
    return oneLine(message)[:300] or None


class VfkitProtocol(ProcessProtocol):
    """
    Logs what vfkit writes (its log on stderr, anything on stdout) and reports its exit at
    once.  The guest's console is not here: it is in C{serial.log}.

    vfkit ends on every error its command returns the way cobra does: C{Error: <why>}, then
    the whole usage text, then C{<why>} again (cmd/vfkit/root.go C{Execute}); a VM that
    fails while running ends so too, with no logrus line (C{virtualization error: ...},
    cmd/vfkit/main.go).  The first line is the one that matters, and is the exit's reason;
    the usage text goes to the debug log and the repeated line is dropped.
    """

    def __init__(self) -> None:
        self._partial = {1: b"", 2: b""}
        self._inUsage = False
        self._refusal: str | None = None
        self.status: ExitStatus | None = None
        self.lastError: str | None = None
        self._ended: OneShot[ExitStatus] = OneShot()

    def outReceived(self, data: bytes) -> None:
        for line in self._lines(1, data):
            self._logVfkit(line)

    def errReceived(self, data: bytes) -> None:
        for line in self._lines(2, data):
            self._logVfkit(line)

    def _lines(self, fd: int, data: bytes) -> Iterable[str]:
        buffered = self._partial[fd] + data
        *complete, self._partial[fd] = buffered.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r").decode(errors="replace")

    def _logVfkit(self, line: str) -> None:
        if line.startswith("Error: "):
            self._refusal = line[len("Error: ") :]
            self.lastError = oneLine(self._refusal)[:300] or self.lastError
            self._inUsage = False
            log.warn("vfkit: {line}", line=line)
            return
        if line == "Usage:" or (self._inUsage and _usageLine(line)):
            self._inUsage = True
            log.debug("vfkit: {line}", line=line)
            return
        self._inUsage = False
        if not line.strip() or line == self._refusal:
            return
        self.lastError = vfkitError(line) or self.lastError
        lowered = line.lower()
        if "level=error" in lowered or "level=fatal" in lowered or "error" in lowered:
            log.warn("vfkit: {line}", line=line)
        else:
            log.info("vfkit: {line}", line=line)

    def processEnded(self, reason: Failure) -> None:
        for rest in self._partial.values():
            if rest:
                self._logVfkit(rest.decode(errors="replace"))
        self._partial = {1: b"", 2: b""}
        self.status = ExitStatus.fromReason(reason, self.lastError)
        self._ended.fire(self.status)

    def whenEnded(self) -> Deferred[ExitStatus]:
        """A new Deferred for each caller, so no caller can swallow another's result."""
        return self._ended.observe()


@dataclass(frozen=True)
class StopTimings:
    """
    Each step of a graceful stop is bounded; together they fit in launchd's 20 s between
    SIGTERM and SIGKILL with room to spare (at most 15 s).
    """

    rest_timeout: float = 1.5
    acpi: float = 7.0
    hard: float = 1.5
    term: float = 2.0
    kill: float = 1.0


class StateRequests(Protocol):
    """How the stop sequence asks vfkit for a state (L{VfkitRestClient}, over its socket)."""

    async def request(self, state: str) -> None: ...


class VfkitProcess:
    """
    One running vfkit, as the lifecycle drives it.

    @ivar mac: the MAC of the VM's network device, which its DHCP lease is found by.
    """

    def __init__(
        self,
        reactor: IVMReactor,
        config: Config,
        protocol: VfkitProtocol,
        transport: IProcessTransport,
        rest: StateRequests,
        timings: StopTimings = StopTimings(),
        vmLock: FileLock | None = None,
        *,
        mac: str,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self.mac = mac
        self.protocol = protocol
        self._transport = transport
        self.rest = rest
        self._timings = timings
        self._vmLock = vmLock
        self.pid: int = transport.pid
        self._stopping: OneShot[ExitInfo | None] | None = None
        self._finalConsole: list[str] | None = None
        protocol.whenEnded().addCallback(self._cleanUp)

    @classmethod
    def start(
        cls,
        reactor: IVMReactor,
        config: Config,
        executable: str,
        mac: str,
        timings: StopTimings = StopTimings(),
        plan: HostPlan | None = None,
        vmLock: FileLock | None = None,
    ) -> VfkitProcess:
        """
        Spawn vfkit.  Checks first what a boot needs, so a vanished working directory is one
        clear error, not a vfkit complaint in the log.  The last run's console is removed
        first: a vfkit that fails before it opens the file must not show the old one.

        @param vmLock: the working directory's VM lock, held; vfkit inherits it (as fd 3,
            which it ignores) so that the lock lives as long as the VM, even if this daemon
            dies first (L{virby.daemon.orphans}).
        """
        layout.checkWorkingDirectory(config.working_directory, layout.BOOT_NEEDS)
        removeQuietly(config.path(layout.REST_SOCKET))
        removeQuietly(config.path(layout.SERIAL_LOG))
        create = not os.path.exists(config.path(layout.EFI_STORE))
        nested = plan.nested if plan is not None else None
        args = vfkitArguments(config, executable, mac, create, nested)
        protocol = VfkitProtocol()
        log.info("starting {command}", command=" ".join(args))
        transport = reactor.spawnProcess(
            protocol,
            executable,
            args,
            env=dict(os.environ),
            path=config.working_directory,
            childFDs={0: "w", 1: "r", 2: "r", **({3: vmLock.fileno()} if vmLock else {})},
        )
        pidfile = config.path(layout.VFKIT_PIDFILE)
        try:
            try:
                writeAtomically(pidfile, str(transport.pid).encode(), layout.PUBLIC)
            except OSError as e:
                raise VfkitStartError(
                    f"cannot record vfkit's pid: {_writeFailure(pidfile, e)}"
                ) from None
            rest = VfkitRestClient(reactor, config.path(layout.REST_SOCKET), timings.rest_timeout)
            return cls(reactor, config, protocol, transport, rest, timings, vmLock, mac=mac)
        except BaseException:
            _abandon(protocol, transport)
            raise

    @property
    def ended(self) -> Deferred[ExitStatus]:
        """A new Deferred that fires with the L{ExitStatus} when vfkit exits."""
        return self.protocol.whenEnded()

    def consoleTail(self, n: int = 20) -> list[str]:
        """The console's last C{n} lines: from C{serial.log}, or as it was when vfkit ended."""
        if self._finalConsole is not None:
            return self._finalConsole[-n:] if n > 0 else []
        return readTail(self._config.path(layout.SERIAL_LOG), n)

    def stop(self) -> Deferred[ExitInfo | None]:
        """
        Power the guest off: ACPI Stop, then HardStop, then SIGTERM, then SIGKILL, each
        step bounded and skipped at once when it cannot be made.  Concurrent calls share
        one sequence, and each gets its own Deferred of its outcome.
        """
        if self._stopping is None:
            stopping: OneShot[ExitInfo | None] = OneShot()
            self._stopping = stopping
            Deferred.fromCoroutine(self._stopSequence()).addBoth(stopping.fire)
        return self._stopping.observe()

    async def _stopSequence(self) -> ExitInfo | None:
        """
        Only vfkit's exit says it stopped.  A step vfkit does not take (its API unreachable,
        silent, or refusing) is logged and the next step follows at once, so a hung vfkit,
        or one whose API is not up yet, never holds a stop for the whole ACPI grace.
        """
        t = self._timings
        if await self._ask("Stop", t.acpi):
            return self.protocol.status
        if await self._ask("HardStop", t.hard):
            return self.protocol.status
        for signal, grace in (("TERM", t.term), ("KILL", t.kill)):
            if self.protocol.status is not None:
                return self.protocol.status
            log.warn(
                "vfkit (pid {pid}) is still running: sending SIG{signal}",
                pid=self.pid,
                signal=signal,
            )
            self._signal(signal)
            if await self._exitWithin(grace):
                return self.protocol.status
        log.error("vfkit (pid {pid}) survived SIGKILL", pid=self.pid)
        return self.protocol.status

    async def _ask(self, state: str, grace: float) -> bool:
        """Whether vfkit exited within C{grace} seconds of taking C{state}."""
        if self.protocol.status is not None:
            return True
        try:
            await Deferred.fromCoroutine(self.rest.request(state))
        except RestDropped:
            # vfkit exits the instant the VM is off, often before it answers (HardStop);
            # a connection dropped on any request means it is going: its exit comes soon.
            return await self._exitWithin(min(grace, self._timings.hard))
        except RestError as e:
            if self.protocol.status is None:
                log.warn(
                    "vfkit (pid {pid}) did not take {state}: {why}; going on at once",
                    pid=self.pid,
                    state=state,
                    why=str(e),
                )
            return self.protocol.status is not None
        if await self._exitWithin(grace):
            return True
        log.warn(
            "vfkit (pid {pid}) took {state} but was still running {grace:g}s later",
            pid=self.pid,
            state=state,
            grace=grace,
        )
        return False

    async def _exitWithin(self, seconds: float) -> bool:
        if self.protocol.status is not None:
            return True
        waiting = self.protocol.whenEnded()
        waiting.addTimeout(seconds, self._reactor)
        try:
            await waiting
        except (TimeoutError, CancelledError):
            return False
        return True

    def _signal(self, name: str) -> None:
        with contextlib.suppress(ProcessExitedAlready):
            self._transport.signalProcess(name)

    def kill(self) -> None:
        """SIGKILL now."""
        self._signal("KILL")

    def _cleanUp(self, status: ExitStatus) -> ExitStatus:
        """
        Remove the runtime files, if they are still this process's, and let go of our copy
        of the VM lock.  The console's tail is kept in memory first (the lifecycle reads it to
        say why the VM died); the file itself stays only with C{debug}.
        """
        self._finalConsole = readTail(self._config.path(layout.SERIAL_LOG), CONSOLE_LINES)
        if self._vmLock is not None:
            lock, self._vmLock = self._vmLock, None
            lock.release()
        pidfile = self._config.path(layout.VFKIT_PIDFILE)
        try:
            with open(pidfile, encoding="ascii") as f:
                ours = f.read().strip() == str(self.pid)
        except OSError:
            ours = False
        if ours:
            removeQuietly(pidfile)
            removeQuietly(self._config.path(layout.REST_SOCKET))
            if not self._config.debug:
                removeQuietly(self._config.path(layout.SERIAL_LOG))
        log.info("vfkit (pid {pid}) {how}", pid=self.pid, how=status.describe())
        return status


class VfkitStartError(VirbyError):
    """vfkit was spawned, but what must follow failed: it was killed, and says why."""


def _writeFailure(path: str, error: OSError) -> str:
    """Why C{path} could not be written, in words that say what to fix."""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device holding {path}: free some space there"
    if error.errno == errno.EDQUOT:
        return f"the disk quota is used up on the device holding {path}: free some space there"
    if error.errno == errno.EROFS:
        return f"the file system holding {path} is read-only"
    return f"cannot write {path}: {error.strerror or error}"


def _abandon(protocol: VfkitProtocol, transport: IProcessTransport) -> None:
    """
    A vfkit whose start failed after it was spawned: nothing else will ever stop it, and
    it holds the VM lock it inherited, so it is killed now.  The reactor reaps it through
    its protocol (its exit is logged), and the lock dies with it.
    """
    pid = transport.pid  # the transport forgets it once the process is reaped
    log.warn("killing vfkit (pid {pid}): its start failed", pid=pid)
    protocol.whenEnded().addCallback(
        lambda status: log.info("vfkit (pid {pid}) {how}", pid=pid, how=status.describe())
    )
    with contextlib.suppress(ProcessExitedAlready):
        transport.signalProcess("KILL")


def _usageLine(line: str) -> bool:
    """A line of cobra's usage text: indented, blank, or a heading such as C{Flags:}."""
    return not line.strip() or line[:1].isspace() or line.rstrip().endswith(":")
