"""
Asking the daemon over its control socket (the wire format is L{virby.wire}'s): one request
line, one reply line.  Used by the short-lived commands (C{virby status}, C{start}, C{stop},
C{doctor}), never by the daemon: a plain blocking socket with a timeout is the right tool,
and no reactor is loaded.

A full accept queue is waited out, not reported: Linux refuses a unix socket's connect with
C{EAGAIN} while the daemon's queue is full (a hundred commands asking at once), and macOS
with C{ECONNREFUSED}; a command may block, so it tries again (L{_connect}).

A daemon from before the protocol wrote its status document to every connection at once,
without reading, and closed: the reply is read to the end whatever the request did.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
from collections.abc import Callable
from time import monotonic, sleep
from typing import Any

from virby.errors import VirbyError
from virby.wire import LAUNCHD_LABEL, MAX_REPLY, encodeRequest, parseReply

#: The daemon's launchd job (L{LAUNCHD_LABEL}, as C{nix/module.nix} names it), and where
#: launchd sends its output: the fixes of every command that asks the daemon name them.
LAUNCHD_PLIST = f"/Library/LaunchDaemons/{LAUNCHD_LABEL}.plist"
DAEMON_LOG = "/var/log/virbyd.log"
#: The fix when the job is loaded but its daemon is not running (or is stuck).
RESTART_FIX = f"sudo launchctl kickstart -k system/{LAUNCHD_LABEL}, and read {DAEMON_LOG}"
#: The fix when launchd has no such job, so nothing holds the builder's port.
LOAD_FIX = f"sudo launchctl bootstrap system {LAUNCHD_PLIST} (or darwin-rebuild switch)"


class DaemonDown(VirbyError):
    """Nothing answers on the control socket."""


class NotAllowed(VirbyError):
    """The control socket is there, but this user may not open it (only root and the daemon's
    user may)."""


def ask(
    path: str,
    command: str,
    *,
    force: bool = False,
    package: str | None = None,
    timeout: float = 5.0,
    whileWaiting: Callable[[], object] | None = None,
    every: float = 0.5,
) -> dict[str, Any]:
    """
    Send one request and return the daemon's reply (its C{"ok": true} document).

    @param timeout: how long the daemon may take: a start waits for a whole boot.
    @param whileWaiting: called every C{every} seconds while the reply has not come (to
        narrate a boot by asking for the status on another connection); its time counts
        against C{timeout}.
    @raise DaemonDown: when no daemon listens at C{path}.
    @raise NotAllowed: when this user may not open the socket.
    @raise Refused: when the daemon answered with an error.
    @raise VirbyError: for anything else (garbage, a timeout), in one line.
    """
    waiting = None if whileWaiting is None else (whileWaiting, every)
    raw = _exchange(path, command, encodeRequest(command, force, package), timeout, waiting)
    return parseReply(raw, command, path)


def _exchange(
    path: str,
    command: str,
    request: bytes,
    timeout: float,
    waiting: tuple[Callable[[], object], float] | None = None,
) -> bytes:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            deadline = monotonic() + timeout
            _connect(s, path, deadline)
            # A daemon from before the protocol may have answered and closed already.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(request)
            if waiting is not None:
                _waitForReply(s, deadline, *waiting)
            chunks = _readReply(s, path)
    except FileNotFoundError:
        raise DaemonDown(f"the daemon is not running (no control socket at {path})") from None
    except ConnectionRefusedError:
        raise DaemonDown(f"the daemon is not running (stale control socket at {path})") from None
    except PermissionError:
        raise NotAllowed(
            f"only root may ask the daemon (its control socket {path} is owner-only): "
            f"run `sudo virby {command}`"
        ) from None
    except TimeoutError:
        raise VirbyError(f"the daemon did not answer on {path} within {timeout:.0f}s") from None
    except BlockingIOError:
        raise VirbyError(
            f"the daemon at {path} is too busy to take a connection within {timeout:.0f}s: "
            "try again, or read its log"
        ) from None
    except ConnectionResetError:
        raise VirbyError(f"the daemon at {path} closed the connection without a reply") from None
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise DaemonDown(f"the daemon is not running (no control socket at {path})") from None
        raise VirbyError(f"cannot reach the daemon at {path}: {e.strerror or e}") from None
    return b"".join(chunks)


#: The first and the longest pause between two connects to a full accept queue.
FIRST_RETRY = 0.005
LONGEST_RETRY = 0.1
#: How long a refused connect is tried again: macOS refuses a connect to a unix socket whose
#: accept queue is full (C{ECONNREFUSED}, where Linux says C{EAGAIN}), and so does a socket
#: a dead daemon left, which is rare (a daemon that stops removes its socket) and is then
#: said to be down this much later.
REFUSED_GRACE = 1.0


def _connect(s: socket.socket, path: str, deadline: float) -> None:
    """
    Connect, waiting while the daemon's accept queue is full, until C{deadline}
    (L{monotonic}); a refusal is tried again for L{REFUSED_GRACE} at most.

    @raise BlockingIOError: when the queue stayed full until the deadline.
    @raise ConnectionRefusedError: when the socket refused for L{REFUSED_GRACE}.
    """
    pause = FIRST_RETRY
    refusedUntil = min(deadline, monotonic() + REFUSED_GRACE)
    while True:
        try:
            s.connect(path)
            return
        except (BlockingIOError, ConnectionRefusedError) as e:
            until = deadline if isinstance(e, BlockingIOError) else refusedUntil
            left = until - monotonic()
            if left <= 0:
                raise
        sleep(min(pause, left))
        pause = min(pause * 2, LONGEST_RETRY)


def _waitForReply(
    s: socket.socket, deadline: float, whileWaiting: Callable[[], object], every: float
) -> None:
    """
    Until the reply starts to arrive, call C{whileWaiting} every C{every} seconds: one
    thread, the reply's socket watched with C{select} between the calls.

    @raise TimeoutError: when nothing came by C{deadline} (L{monotonic}).
    """
    while True:
        left = deadline - monotonic()
        if left <= 0:
            raise TimeoutError
        readable, _, _ = select.select([s], [], [], min(every, left))
        if readable:
            return
        whileWaiting()


def _readReply(s: socket.socket, path: str) -> list[bytes]:
    """
    Everything up to the daemon's close.  A daemon from before the protocol closes without
    reading the request, which Linux reports as a reset after the reply it sent: a reset
    once the reply is in counts as the close it is.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            if chunks:
                return chunks
            raise
        if not chunk:
            return chunks
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY:
            raise VirbyError(f"the daemon at {path} answered more than a reply")
