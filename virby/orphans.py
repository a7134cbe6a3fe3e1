"""
A vfkit left running by a crashed daemon is stopped before the next boot: two VMs writing
one disk image would corrupt it.  The pid comes from C{<wd>/vfkit.pid}, and is signalled
only after checking that it really is vfkit (pids are recycled; upstream signalled whatever
the file named).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutput

from virby.config import REST_SOCKET_NAME
from virby.logs import Logger
from virby.rest import RestError, VfkitRestClient
from virby.runtime import remove_quietly

log = Logger()

EMULATOR_NAMES = ("vfkit-emulator", "virby.emulator")


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def is_alive(pid: int) -> bool:
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


def is_vfkit(argv: list[str], executable: str) -> bool:
    """The command is vfkit (by the configured name or its own) or Virby's emulator."""
    if not argv:
        return False
    names = {os.path.basename(executable), "vfkit"}
    if os.path.basename(argv[0]) in names:
        return True
    return any(os.path.basename(arg) in EMULATOR_NAMES for arg in argv[:3])


async def command_line(reactor: Any, pid: int) -> list[str]:
    """The process's argv: /proc on Linux, ps(1) elsewhere (without blocking)."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            return []
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    output = await getProcessOutput(
        "/bin/ps", ["-o", "command=", "-p", str(pid)], env=dict(os.environ), reactor=reactor
    )
    return output.decode(errors="replace").split()


async def _gone_within(
    reactor: Any, pid: int, seconds: float, alive: Callable[[int], bool]
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


async def stop_orphan(
    reactor: Any,
    pidfile: str,
    vfkit_executable: str,
    grace: float = 10.0,
    *,
    alive: Callable[[int], bool] = is_alive,
    kill: Callable[[int, int], None] = os.kill,
    argv: Callable[[Any, int], Any] = command_line,
) -> int | None:
    """
    Stop the vfkit named by C{pidfile}, if there is one: REST Stop (a clean guest power-off),
    then SIGTERM, then SIGKILL.

    @return: the pid stopped, or C{None} when there was nothing to stop.
    """
    pid = read_pid(pidfile)
    directory = os.path.dirname(pidfile)
    if pid is None or pid == os.getpid() or not alive(pid):
        remove_quietly(pidfile)
        return None
    command = await argv(reactor, pid)
    if not is_vfkit(command, vfkit_executable):
        log.warn(
            "{pidfile} names pid {pid}, which is not vfkit ({command}): leaving it alone",
            pidfile=pidfile,
            pid=pid,
            command=" ".join(command) or "unknown",
        )
        remove_quietly(pidfile)
        return None
    log.warn("stopping vfkit (pid {pid}) left running by a previous daemon", pid=pid)
    socket = os.path.join(directory, REST_SOCKET_NAME)
    steps: list[tuple[str, float]] = [("TERM", 5.0), ("KILL", 2.0)]
    if os.path.exists(socket):
        try:
            await Deferred.fromCoroutine(VfkitRestClient(reactor, socket, 1.5).request("Stop"))
            steps.insert(0, ("", grace))
        except RestError:
            pass
    for name, seconds in steps:
        if name:
            try:
                kill(pid, getattr(signal, f"SIG{name}"))
            except ProcessLookupError:
                break
        if await _gone_within(reactor, pid, seconds, alive):
            break
    else:
        log.error("vfkit (pid {pid}) survived SIGKILL", pid=pid)
        return None
    remove_quietly(pidfile)
    remove_quietly(socket)
    log.info("stopped the leftover vfkit (pid {pid})", pid=pid)
    return pid
