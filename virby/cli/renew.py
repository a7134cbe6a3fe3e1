"""
Asking the running daemon to move to what C{virby prepare} made: the control request
C{renew} (L{virby.wire}).

prepare ends with it, in the activation and when run by hand.  The daemon compares what is
installed (its config, the image and keys, and the Virby package this command runs from)
with what it started with; when
something changed, it serves on with the VM that runs until no connection is open, then
exits, and launchd starts it anew on what is installed (L{virby.daemon.service}).  So a
switch that brings a new image cuts no build: the old VM finishes what it runs, new builds
use it meanwhile (the previous keys stay valid until the next boot), and the next boot is
the new image.

Never an error for prepare: a daemon that is not running has nothing to move (it starts on
what is installed), and any other answer is one line for the person at the switch.
"""

from __future__ import annotations

from typing import Any

from virby.cli.client import DaemonDown, ask
from virby.config import Config
from virby.errors import VirbyError
from virby.installed import describeChanges, packageDirectory
from virby.layout import CONTROL_SOCKET
from virby.wire import LAUNCHD_LABEL, Refused

#: A renewal is answered at once: the daemon only decides, it does not wait for anything.
RENEW_TIMEOUT = 10.0


def askToRenew(config: Config) -> str | None:
    """
    Ask the daemon to renew; the line to show the person, or C{None} when there is nothing
    to say (no daemon running, or one that already runs what is installed).
    """
    try:
        reply = ask(
            config.path(CONTROL_SOCKET),
            "renew",
            package=packageDirectory(),
            timeout=RENEW_TIMEOUT,
        )
    except DaemonDown:
        return None  # it starts on what is installed
    except Refused as e:
        if "unknown command 'renew'" in str(e):
            return (
                "the running daemon is too old to move to the new image by itself: "
                f"`sudo launchctl kickstart -k system/{LAUNCHD_LABEL}` restarts it (cutting "
                "any build running through it)"
            )
        return f"the daemon did not renew: {e}"
    except VirbyError as e:
        return f"could not ask the daemon to renew: {e}"
    return describeRenewal(reply)


def describeRenewal(reply: dict[str, Any]) -> str | None:
    """The daemon's reply to C{renew} as one line, or C{None} when it had nothing to do."""
    if not reply.get("renewing"):
        return None
    changed = reply.get("changed")
    what = describeChanges([str(c) for c in changed]) if isinstance(changed, list) else "update"
    if reply.get("now"):
        return f"the daemon moves to its {what} now: no connection is open"
    count = reply.get("open_connections")
    if isinstance(count, int) and count > 0:
        plural = "s" if count != 1 else ""
        return (
            f"the daemon moves to its {what} once its {count} open connection{plural} "
            "end (no build is cut; new builds use the running VM meanwhile)"
        )
    return f"the daemon moves to its {what} once the VM's boot or stop under way is done"
