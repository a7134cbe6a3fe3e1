"""
``virby start`` and ``virby stop [--force]``: boot the VM now, or stop it now, through the
daemon's control socket (L{virby.daemon.control}).

C{start} warms the VM up before a build and prints how long the boot took; it is a no-op
when the VM runs.  The idle clock and the on-demand rules go on as before: an on-demand VM
started with no build still stops after the ttl.

An on-demand daemon is not running until launchd starts it: launchd holds the builder's
listening socket and starts the job when a connection waits on it (the plist's C{RunAtLoad}
is false), so after a reboot or a switch there is no control socket to ask.  When no daemon
answers (on-demand or not: launchd starts an always-on one that died the same way),
C{start} makes that first connection itself (L{knock}) and waits, on a deadline, for the daemon to
answer on its control socket.  The daemon takes the connection for a client: it counts it,
may begin a boot for it, reads its end at once and stops counting it, so it holds nothing
up; the boot it began is the one C{start} then waits for.  Where nothing listens on the
port (no launchd job), the daemon cannot be started this way, and C{start} says how to load
the job.

C{stop} frees the VM's memory now.  It is refused while connections are open (builds may be
running) unless C{--force}, which closes them.  An always-on VM stays stopped until a build
connects or C{virby start} (or a daemon restart) boots it again.  With no daemon running
there is nothing to stop: that is success, not a failure.

Short-lived commands: plain blocking calls, each bounded by a timeout that covers what the
daemon may take (a whole boot for C{start}).

While its C{start} waits, C{start} asks for C{status} on a second connection every half
second and prints each new phase of the boot as it passes (L{virby.cli.status.bootLine}), so
a boot is never minutes of silence.  The control protocol stays one request, one reply: the
command watches the reply's socket and asks for the status between two looks
(L{virby.cli.client.ask}'s C{whileWaiting}), on its one thread; a daemon that cannot say its
status only leaves the boot unnarrated.

Exit status: 0 done, 1 failed, L{EXIT_DOWN} (3) the daemon is not running, from C{start}
when it cannot be started; C{stop} needs no daemon to have nothing to stop.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from virby.cli.client import DAEMON_LOG, LOAD_FIX, DaemonDown, ask
from virby.cli.status import EXIT_DOWN, bootLine
from virby.config import Config
from virby.errors import VirbyError
from virby.layout import CONTROL_SOCKET

#: Beyond the daemon's own bounds: its reply must still come back.
MARGIN = 30.0
#: A stop takes at most 15 s (virby.daemon.vfkit.StopTimings); a fresh disk in the way is killed.
STOP_TIMEOUT = 60.0
#: How long C{start} waits for a daemon launchd starts on demand to answer: launchd starts
#: it at once, and Python and twistd take seconds, more on a cold and busy Mac.
WAKE_TIMEOUT = 60.0
#: How often the control socket is tried meanwhile.
WAKE_POLL = 0.2
#: The one connection that wakes the daemon: on loopback it is made at once or refused.
KNOCK_TIMEOUT = 5.0
#: Where the builder's port is reached, as C{ssh virby-vm} reaches it (L{virby.sshconfig}).
LOOPBACK = "127.0.0.1"
#: How often C{start} asks where the boot is while it waits, and how long one ask may take.
PROGRESS_POLL = 0.5
PROGRESS_TIMEOUT = 5.0


def startTimeout(config: Config) -> float:
    """A boot may take start-timeout, and in ephemeral mode its fresh disk as much again."""
    return config.start_timeout * (2 if config.ephemeral else 1) + MARGIN


def knock(port: int, timeout: float = KNOCK_TIMEOUT) -> None:
    """
    One connection to the builder's port, closed at once and in order (no reset): launchd
    starts an on-demand daemon when a connection waits on the socket it holds, and the
    daemon, once up, reads this one's end as a client that hung up.

    @raise OSError: when it cannot be made; C{ConnectionRefusedError} when nothing listens.
    """
    with socket.create_connection((LOOPBACK, port), timeout=timeout):
        pass


def runStart(
    config: Config,
    out: TextIO | None = None,
    *,
    knock: Callable[[int], None] = knock,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """
    C{virby start}: 0 once the VM is ready, L{EXIT_DOWN} when the daemon is not running and
    cannot be started (L{wake}).

    @param knock: makes the connection that has launchd start the daemon.
    @param clock: the deadline's clock; C{sleep} waits between tries.
    @raise VirbyError: when the boot fails or the daemon refuses, with its one line.
    """
    out = out or sys.stdout
    path, timeout = config.path(CONTROL_SOCKET), startTimeout(config)
    try:
        try:
            reply = startShowingProgress(path, timeout, out)
        except DaemonDown as down:
            reply = wake(config, down, timeout, out, knock=knock, clock=clock, sleep=sleep)
    except DaemonDown as e:
        out.write(f"Virby: {e}\n")
        return EXIT_DOWN
    where = f"{reply.get('vm_ip')}:{reply.get('vm_port')}"
    if reply.get("booted"):
        seconds = reply.get("boot_seconds")
        took = f" in {seconds:.1f}s" if isinstance(seconds, int | float) else ""
        out.write(f"VM running at {where}: booted{took}\n")
    else:
        out.write(f"VM already running at {where}\n")
    return 0


def startShowingProgress(
    path: str, timeout: float, out: TextIO, poll: float | None = None
) -> dict[str, Any]:
    """
    Ask the daemon at C{path} to start the VM, and while it boots print each new phase the
    daemon's status shows, once.

    @return: the daemon's reply to C{start}.
    @raise VirbyError: what asking for C{start} raised.
    """
    interval = PROGRESS_POLL if poll is None else poll
    shown: tuple[object, ...] | None = None

    def narrate() -> None:
        nonlocal shown
        try:
            status = ask(path, "status", timeout=PROGRESS_TIMEOUT).get("status")
        except VirbyError:
            return  # only the narration is lost
        if not isinstance(status, dict) or status.get("state") != "booting":
            return
        phase = (status.get("boot_phase"), status.get("boot_last_step"))
        if phase[0] is not None and phase != shown:
            shown = phase
            out.write(f"Boot: {bootLine(status)}\n")
            out.flush()

    return ask(path, "start", timeout=timeout, whileWaiting=narrate, every=interval)


def wake(
    config: Config,
    down: DaemonDown,
    timeout: float,
    out: TextIO,
    *,
    knock: Callable[[int], None] = knock,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """
    Have launchd start the daemon (one connection to the builder's port), then ask it to
    start the VM as soon as it answers on its control socket, within L{WAKE_TIMEOUT}.  A
    control socket that is missing or refuses (a dead daemon's, which the new one replaces)
    is tried again until then; anything else it answers is the answer.

    @param down: why the daemon could not be asked, for the message when it cannot be woken.
    @param timeout: how long the daemon may take over the start once it answers.
    @return: the daemon's reply to C{start}.
    @raise DaemonDown: when nothing listens on the port, or no daemon answered in time; its
        one line says which, and the fix.
    """
    where = f"{LOOPBACK}:{config.builderPort}"
    try:
        knock(config.builderPort)
    except ConnectionRefusedError:
        raise DaemonDown(
            f"{down}, and nothing listens on {where} to start it: load its launchd job: {LOAD_FIX}"
        ) from None
    except OSError as e:
        raise DaemonDown(
            f"{down}, and the connection to {where} that starts it failed "
            f"({e.strerror or str(e) or type(e).__name__}): run `sudo virby doctor`"
        ) from None
    path = config.path(CONTROL_SOCKET)
    deadline = clock() + WAKE_TIMEOUT
    while True:
        try:
            return startShowingProgress(path, timeout, out)
        except DaemonDown:
            left = deadline - clock()
            if left <= 0:
                raise DaemonDown(
                    f"the daemon did not answer on {path} within {WAKE_TIMEOUT:.0f}s of the "
                    f"connection to {where} that has launchd start it: read {DAEMON_LOG}, "
                    "and run `sudo virby doctor`"
                ) from None
            sleep(min(WAKE_POLL, left))


def runStop(config: Config, force: bool, out: TextIO | None = None) -> int:
    """
    C{virby stop [--force]}: 0 once the VM has stopped, or when it was not running; with no
    daemon running there is no VM to stop, and that is 0 as well.

    @raise VirbyError: when the daemon refuses (open connections without C{--force}).
    """
    out = out or sys.stdout
    try:
        reply = ask(config.path(CONTROL_SOCKET), "stop", force=force, timeout=STOP_TIMEOUT)
    except DaemonDown as e:
        why = "the daemon is not started yet (on-demand)" if config.on_demand else str(e)
        out.write(f"Virby: nothing to stop: {why}\n")
        return 0
    if not reply.get("stopped"):
        out.write("VM was not running\n")
        return 0
    closed = reply.get("closed_connections") or 0
    also = f"; closed {closed} connection{'s' if closed != 1 else ''}" if closed else ""
    out.write(f"VM stopped{also}\n")
    return 0
