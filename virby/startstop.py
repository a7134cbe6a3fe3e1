"""
``virby start`` and ``virby stop [--force]``: boot the VM now, or stop it now, through the
daemon's control socket (L{virby.control}).

C{start} warms the VM up before a build and prints how long the boot took; it is a no-op
when the VM runs.  The idle clock and the on-demand rules go on as before: an on-demand VM
started with no build still stops after the ttl.

C{stop} frees the VM's memory now.  It is refused while connections are open (builds may be
running) unless C{--force}, which closes them.  An always-on VM stays stopped until a build
connects or C{virby start} (or a daemon restart) boots it again.

Short-lived commands: plain blocking calls, each bounded by a timeout that covers what the
daemon may take (a whole boot for C{start}).
"""

from __future__ import annotations

import sys
from typing import TextIO

from virby.config import Config
from virby.controlclient import DaemonDown, ask
from virby.layout import CONTROL_SOCKET
from virby.status import EXIT_DOWN

#: Beyond the daemon's own bounds: its reply must still come back.
MARGIN = 30.0
#: A stop takes at most 15 s (virby.vfkit.StopTimings); a fresh disk in the way is killed.
STOP_TIMEOUT = 60.0


def start_timeout(config: Config) -> float:
    """A boot may take start-timeout, and in ephemeral mode its fresh disk as much again."""
    return config.start_timeout * (2 if config.ephemeral else 1) + MARGIN


def run_start(config: Config, out: TextIO | None = None) -> int:
    """
    C{virby start}: 0 once the VM is ready, L{EXIT_DOWN} when the daemon is not running.

    @raise VirbyError: when the boot fails or the daemon refuses, with its one line.
    """
    out = out or sys.stdout
    try:
        reply = ask(config.path(CONTROL_SOCKET), "start", timeout=start_timeout(config))
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


def run_stop(config: Config, force: bool, out: TextIO | None = None) -> int:
    """
    C{virby stop [--force]}: 0 once the VM has stopped (or was not running).

    @raise VirbyError: when the daemon refuses (open connections without C{--force}).
    """
    out = out or sys.stdout
    try:
        reply = ask(config.path(CONTROL_SOCKET), "stop", force=force, timeout=STOP_TIMEOUT)
    except DaemonDown as e:
        out.write(f"Virby: {e}\n")
        return EXIT_DOWN
    if not reply.get("stopped"):
        out.write("VM was not running\n")
        return 0
    closed = reply.get("closed_connections") or 0
    also = f"; closed {closed} connection{'s' if closed != 1 else ''}" if closed else ""
    out.write(f"VM stopped{also}\n")
    return 0
