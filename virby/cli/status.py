"""
``virby status``: ask the daemon what it is doing and tell a person (or, with ``--json``, a
program).

This is a short-lived command, not the daemon: a plain blocking socket with a timeout is the
right tool here.

Exit status: 0 the daemon answered, 1 it cannot be asked, L{EXIT_DOWN} (3) it is not
running.  An on-demand daemon that launchd has not started yet is not running either, and is
reported so, with the 3 of any daemon that is not running (as C{systemctl status} reports a
socket-activated service that waits for its first connection): what differs is the line,
which says that this is how it rests and what starts it.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from virby.cli.client import RESTART_FIX, DaemonDown, ask
from virby.config import Config
from virby.errors import VirbyError
from virby.installed import describeChanges
from virby.layout import CONTROL_SOCKET, noImageYet

#: Exit status when the daemon is not running, as ``systemctl status`` does for inactive.
EXIT_DOWN = 3


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """
    Read the daemon's status document from its control socket.

    @raise DaemonDown: when no daemon listens there.
    @raise VirbyError: when one does but cannot be read (permissions, garbage).
    """
    status = ask(path, "status", timeout=timeout).get("status")
    if not isinstance(status, dict):
        raise VirbyError(f"the daemon at {path} answered something that is not a status")
    return status


def notRunning(config: Config, down: DaemonDown) -> str:
    """
    Why no daemon answers, in one line: an on-demand daemon rests that way until the first
    connection has launchd start it; any other should be running, and the line gives the fix.
    """
    if config.on_demand:
        return (
            "the daemon is not started yet (on-demand): the first connection to the builder's "
            "port (a build, `ssh virby-vm`, or `sudo virby start`) starts it"
        )
    return f"{down}: start it with {RESTART_FIX}"


def duration(seconds: float | None) -> str:
    """C{9000} -> C{"2h 30m"}: precise enough for a person, short enough to scan."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def size(count: int) -> str:
    """C{1536} -> C{"1.5 KiB"}: bytes as a person reads them."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def render(status: dict[str, Any], noImage: str | None = None) -> str:
    """The status as a few aligned lines."""
    state = status.get("state", "unknown")
    lines = [
        (
            "Daemon",
            f"running (pid {status.get('daemon_pid', '?')}, "
            f"up {duration(status.get('daemon_uptime'))})",
        )
    ]
    if state == "running":
        vm = (
            f"running at {status.get('vm_ip')}:{status.get('vm_port')} "
            f"(vfkit pid {status.get('vfkit_pid')}), up {duration(status.get('uptime'))}"
        )
    elif state == "booting":
        vm = f"booting (vfkit pid {status.get('vfkit_pid') or '-'})"
    else:
        vm = state
    lines.append(("VM", vm))
    if state == "booting" and status.get("boot_phase") is not None:
        lines.append(("Boot", bootLine(status)))
    boots = _boots(status)
    if boots is not None:
        lines.append(("Last boot", boots))
    lines.append(
        (
            "Connections",
            f"{status.get('active_connections', 0)} active, "
            f"{status.get('waiting_connections', 0)} waiting for the VM",
        )
    )
    if status.get("bytes_to_guest") is not None:
        lines.append(
            (
                "Traffic",
                f"{size(status['bytes_to_guest'])} to the guest, "
                f"{size(status.get('bytes_from_guest') or 0)} back",
            )
        )
    if status.get("renewing"):
        changed = status.get("renewing_for")
        what = (
            describeChanges([str(c) for c in changed])
            if isinstance(changed, list) and changed
            else "what is installed"
        )
        lines.append(("Renewing", f"to its {what}: the daemon restarts once no connection is open"))
    lines.append(("Idle stop", _idle(status)))
    if status.get("restart_in") is not None:
        lines.append(("Restart", f"in {duration(status['restart_in'])}"))
    lines.append(("Listening", ", ".join(status.get("listening") or []) or "-"))
    lines.append(("Last error", status.get("last_error") or "none"))
    if noImage is not None:
        lines.append(("Image", noImage))
    lines += [("Warning", warning) for warning in status.get("warnings") or []]
    width = max(len(name) for name, _ in lines) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in lines)


def bootLine(status: dict[str, Any]) -> str:
    """
    Where a boot is, from the status document: what it waits for and the time it has had
    against start-timeout, then what happened last (C{virby start} prints the same line).
    """
    waiting = status.get("boot_waiting_for") or status.get("boot_phase")
    elapsed = status.get("boot_elapsed")
    limit = status.get("start_timeout")
    took = f"{duration(elapsed)} of {duration(limit)}" if limit else duration(elapsed)
    line = f"{waiting}, {took}"
    if status.get("boot_last_step"):
        line += f" (last: {status['boot_last_step']})"
    return line


def _boots(status: dict[str, Any]) -> str | None:
    """The last boot's time, and the median of the last few when there were more."""
    last = status.get("last_boot_seconds")
    if last is None:
        return None
    text = f"{last:.1f}s"
    count, median = status.get("recent_boots"), status.get("recent_boot_median_seconds")
    if isinstance(count, int) and count > 1 and median is not None:
        text += f" (median {median:.1f}s of the last {count})"
    return text


def _idle(status: dict[str, Any]) -> str:
    if not status.get("on_demand"):
        return "never (always-on)"
    if status.get("idle_stop_in") is not None:
        return f"in {duration(status['idle_stop_in'])} (ttl {duration(status.get('ttl'))})"
    if status.get("state") == "running":
        return f"after {duration(status.get('ttl'))} without connections"
    return "-"


def run(config: Config, asJson: bool, out: TextIO = sys.stdout) -> int:
    """
    C{virby status}: 0 when the daemon answered, L{EXIT_DOWN} when it is not running (an
    on-demand one not started yet too), 1 when it cannot be asked (e.g. a user who may not
    open the control socket).  With C{--json} every outcome is one JSON document, so a
    program never has to parse an error line; when the daemon is down, its C{"on_demand"}
    says whether that is how it rests.

    @raise VirbyError: when the daemon cannot be asked, unless C{asJson}.
    """
    path = config.path(CONTROL_SOCKET)
    try:
        status = query(path)
    except DaemonDown as e:
        why = notRunning(config, e)
        if asJson:
            document = {"state": "down", "on_demand": config.on_demand, "reason": why}
            out.write(json.dumps(document) + "\n")
        else:
            out.write(f"Virby: {why}\n")
        return EXIT_DOWN
    except VirbyError as e:
        if not asJson:
            raise
        out.write(json.dumps({"state": "unknown", "reason": str(e)}) + "\n")
        return 1
    if asJson:
        out.write(json.dumps(status, sort_keys=True, indent=2) + "\n")
    else:
        # Said before any boot is asked for (an on-demand daemon has not tried one yet).
        out.write(render(status, noImageYet(config.working_directory)) + "\n")
    return 0
