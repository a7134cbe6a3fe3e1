"""
A child process the daemon waits for, bounded in time: the one way the reactor runs a
short program and reads what it printed.

A child that hangs (a C{ps} stuck on a busy Mac, a copy on a slow volume) must never hold a
boot forever, so every child gets a deadline, after which it is killed with SIGKILL and its
result says so.  Cancelling the result (the boot was given up) kills it too.  Only the tail
of its output is kept, so a chatty child cannot grow the daemon's memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from virby.reactors import IProcessReactor

#: What is kept of each of the child's outputs: its last bytes.
OUTPUT_LIMIT = 4096


@dataclass(frozen=True)
class Ended:
    """
    How a bounded child ended: its exit status (C{None} when a signal ended it), the signal,
    the tails of its outputs, and whether the deadline killed it.
    """

    code: int | None
    signal: int | None
    out: bytes
    err: bytes
    timedOut: bool


class _Bounded(ProcessProtocol):
    # Set by makeConnection, which spawnProcess calls before it returns.
    transport: IProcessTransport

    def __init__(self, result: Deferred[Ended], limit: int) -> None:
        self.result = result
        self._limit = limit
        self._out = b""
        self._err = b""
        self.timer: IDelayedCall | None = None
        self.timedOut = False

    def outReceived(self, data: bytes) -> None:
        self._out = (self._out + data)[-self._limit :]

    def errReceived(self, data: bytes) -> None:
        self._err = (self._err + data)[-self._limit :]

    def kill(self) -> None:
        with contextlib.suppress(ProcessExitedAlready):
            self.transport.signalProcess("KILL")

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.result.called:
            return  # cancelled: the caller has its answer already
        self.result.callback(
            Ended(
                code=getattr(reason.value, "exitCode", None),
                signal=getattr(reason.value, "signal", None),
                out=self._out,
                err=self._err,
                timedOut=self.timedOut,
            )
        )


def runBounded(
    reactor: IProcessReactor,
    executable: str,
    args: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    path: str | None = None,
    onTimeout: Callable[[], None] | None = None,
    limit: int = OUTPUT_LIMIT,
) -> Deferred[Ended]:
    """
    Run C{executable} with C{args} (its C{argv}, the program's name first) and no stdin.

    @param onTimeout: called when the deadline passes, before the child is killed (to log).
    @return: fires with L{Ended} once the child is gone, however it ended; fails with the
        C{OSError} of a child that could not be started.  Cancelling it kills the child.
    """
    protocol: _Bounded

    def cancel(d: Deferred[Ended]) -> None:
        protocol.kill()

    result: Deferred[Ended] = Deferred(cancel)
    protocol = _Bounded(result, limit)
    try:
        reactor.spawnProcess(
            protocol,
            executable,
            list(args),
            env=dict(env) if env is not None else None,
            path=path,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
    except OSError as e:
        return fail(e)
    protocol.transport.closeStdin()

    def expire() -> None:
        protocol.timedOut = True
        if onTimeout is not None:
            onTimeout()
        protocol.kill()

    protocol.timer = reactor.callLater(timeout, expire)
    return result
