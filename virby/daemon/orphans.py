"""
A VM left running by a crashed daemon is stopped before the next boot: two VMs writing one
disk image would corrupt it.

Nothing here trusts a program's name.  A vfkit can be started through a wrapper (an
interpreter, a shell that C{exec}s a differently named file), and other tools on a Mac
(podman machine, CRC) run programs named C{vfkit} too.  Two facts are used instead:

  - C{<wd>/vm.lock} is locked by the daemon and inherited by the vfkit it starts
    (L{virby.daemon.vfkit.VfkitProcess.start}); the kernel keeps the lock exactly as long as any
    process holds that file open.  While it is held, a VM of this working directory is
    alive, whatever its pid or name, and no second one is booted.
  - C{<wd>/vfkit.pid} says which process to stop, and is believed only when that process's
    command line is this working directory's vfkit: its C{--restful-uri} names this
    directory's socket and its C{virtio-blk} disk is this C{diff.img}, which only our VM
    has.  The pidfile is kept until that process is really gone.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from virby.daemon.child import runBounded
from virby.daemon.rest import RestError, VfkitRestClient
from virby.errors import VirbyError, clip
from virby.layout import DIFF_IMAGE, REST_SOCKET, VFKIT_PIDFILE
from virby.logs import Logger
from virby.reactors import IProcessReactor, IVMReactor
from virby.runtime import removeQuietly

log = Logger()

#: BSD ps truncates the command to the terminal's width unless given -ww.
PS = "/bin/ps"
#: How long C{ps} may take: it answers in milliseconds, but one stuck on a loaded Mac must
#: not hold the boot that waits on it (the command line is then unknown, and the pid is
#: left alone, as one that cannot be read).
PS_TIMEOUT = 10.0


class OrphanError(VirbyError):
    """A VM of this working directory is alive and could not be stopped."""


def readPid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 2**31 else None


def isAlive(pid: int) -> bool:
    """Alive and not a zombie (a zombie orphan is gone in every way that matters)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def isOurVfkit(command: str | None, working_directory: str) -> bool:
    """
    Whether a command line (its arguments joined by spaces, as C{ps} prints them) is the
    vfkit of C{working_directory}: its REST socket and its disk are this directory's.
    Matched as whole words, so another directory whose name merely starts the same, or a
    path inside some other argument, does not count.
    """
    if not command:
        return False
    socket = re.escape(f"unix://{os.path.join(working_directory, REST_SOCKET)}")
    disk = re.escape(f"virtio-blk,path={os.path.join(working_directory, DIFF_IMAGE)}")
    return (
        re.search(rf"(?:^|\s){socket}(?=\s|$)", command) is not None
        and re.search(rf"(?:^|\s){disk}(?=[\s,]|$)", command) is not None
    )


async def commandLine(
    reactor: IProcessReactor, pid: int, proc: str | None = "/proc", timeout: float = PS_TIMEOUT
) -> str | None:
    """
    The process's arguments joined by spaces, or C{None} when it cannot be read: from
    C{/proc} on Linux, from C{ps -ww} elsewhere (a child process bounded by C{timeout}, so
    the reactor never waits on it, and a boot never waits on it for long).
    """
    if proc is not None and os.path.isdir(f"{proc}/self"):
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                raw = f.read(1024 * 1024)
        except OSError:
            return None
        parts = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        return " ".join(parts) or None
    try:
        ended = await runBounded(
            reactor,
            PS,
            [PS, "-ww", "-o", "command=", "-p", str(pid)],
            timeout=timeout,
            env=os.environ,
            limit=1024 * 1024,
        )
    except OSError as e:
        log.warn("cannot run {ps}: {why}", ps=PS, why=str(e))
        return None
    if ended.timedOut:
        log.warn("{ps} took longer than {timeout:.0f}s: killed it", ps=PS, timeout=timeout)
        return None
    text = ended.out.decode(errors="replace").strip()
    return text if ended.code == 0 and text else None


async def _goneWithin(
    reactor: IReactorTime, pid: int, seconds: float, alive: Callable[[int], bool]
) -> bool:
    """Poll (an orphan is not our child: there is no exit event to wait on)."""
    if not alive(pid):
        return True
    done: Deferred[bool] = Deferred()
    deadline = reactor.seconds() + seconds

    def check() -> None:
        if not alive(pid):
            loop.stop()
            done.callback(True)
        elif reactor.seconds() >= deadline:
            loop.stop()
            done.callback(False)

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(0.1, now=False)
    return await done


async def stopOrphan(
    reactor: IVMReactor,
    working_directory: str,
    grace: float = 10.0,
    *,
    alive: Callable[[int], bool] = isAlive,
    kill: Callable[[int, int], None] = os.kill,
    argv: Callable[[IProcessReactor, int], Awaitable[str | None]] = commandLine,
) -> int | None:
    """
    Stop the vfkit named by C{<wd>/vfkit.pid} if it is this working directory's: REST Stop
    (a clean guest power-off), then SIGTERM, then SIGKILL.

    @return: the pid stopped, or C{None} when there was nothing of ours to stop.
    @raise OrphanError: when it survives SIGKILL; the pidfile is kept, naming it.
    """
    pidfile = os.path.join(working_directory, VFKIT_PIDFILE)
    pid = readPid(pidfile)
    if pid is None or pid == os.getpid() or not alive(pid):
        removeQuietly(pidfile)
        return None
    command = await argv(reactor, pid)
    if not isOurVfkit(command, working_directory):
        log.warn(
            "{pidfile} names pid {pid}, which is not this working directory's vfkit "
            "({command}): leaving it alone",
            pidfile=pidfile,
            pid=pid,
            command=clip(command or "its command line cannot be read", 300),
        )
        removeQuietly(pidfile)
        return None
    log.warn("stopping vfkit (pid {pid}) left running by a previous daemon", pid=pid)
    socket = os.path.join(working_directory, REST_SOCKET)
    steps: list[tuple[str, float]] = [("TERM", 5.0), ("KILL", 2.0)]
    if os.path.exists(socket):
        try:
            await Deferred.fromCoroutine(VfkitRestClient(reactor, socket, 1.5).request("Stop"))
            steps.insert(0, ("", grace))
        except RestError as e:
            log.info("the leftover vfkit did not take Stop: {why}", why=str(e))
    for name, seconds in steps:
        if name:
            try:
                kill(pid, getattr(signal, f"SIG{name}"))
            except ProcessLookupError:
                break
        if await _goneWithin(reactor, pid, seconds, alive):
            break
    else:
        raise OrphanError(
            f"the VM left by a previous daemon (vfkit pid {pid}) survived SIGKILL and still "
            f"holds {os.path.join(working_directory, DIFF_IMAGE)}: no second VM is booted on it"
        )
    removeQuietly(pidfile)
    removeQuietly(socket)
    log.info("stopped the leftover vfkit (pid {pid})", pid=pid)
    return pid
