"""
The VM's lifecycle: when to boot it, who waits for it, when to stop it.

This is the one place that decides.  It is an explicit state machine because every bug
upstream had lived in the gaps between states: two connections at cold start each booting
a VM, an idle timer armed on every close, a connection accepted while a stop was in flight
and then frozen, a stop that left the runner unable to start again.  Here each event is a
method, each state names what is allowed in it, and an illegal transition raises.

    STOPPED --boot--> BOOTING --ready--> RUNNING --idle/shutdown--> STOPPING --> STOPPED
       ^                 |                  |                                     |
       +----failed/died--+-------died-------+                        (waiters? boot again)

Connections never wait on anything but L{Lifecycle.whenReady}: one boot serves every
connection that arrives while it is under way, and a connection that arrives while a stop is
in flight waits for the stop and then for the next boot.

A person can also ask (C{virby start}, C{virby stop}, through the control socket):
L{Lifecycle.startNow} is one more waiter, so it shares a boot under way and is a no-op when
the VM runs, and the idle clock runs after it as after any boot (an on-demand VM warmed up
with no build still stops after the ttl).  L{Lifecycle.stopNow} is refused while
connections are open unless forced (then they are closed), cancels a boot under way, and
leaves the VM stopped: in always-on mode too, it is not restarted until a connection or a
C{virby start} boots it again (a pending crash restart is cancelled), since the point of
stopping it was to free its memory now.
"""

from __future__ import annotations

import enum
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from virby.errors import VirbyError
from virby.logs import Logger

log = Logger()

#: Always-on restarts after a crash wait 1, 2, 4 ... seconds, never more than this.
MAX_RESTART_DELAY = 60.0


class State(enum.Enum):
    STOPPED = "stopped"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    SHUTDOWN = "shutdown"


_ALLOWED: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.BOOTING, State.SHUTDOWN}),
    State.BOOTING: frozenset({State.RUNNING, State.STOPPING, State.STOPPED, State.SHUTDOWN}),
    State.RUNNING: frozenset({State.STOPPING, State.STOPPED, State.SHUTDOWN}),
    State.STOPPING: frozenset({State.STOPPED, State.SHUTDOWN}),
    State.SHUTDOWN: frozenset(),
}


class IllegalTransition(Exception):
    """A bug: the machine was asked to move between states that do not connect."""


class VMUnavailable(VirbyError):
    """The VM could not serve a waiting connection (boot failed, VM died, daemon stopping)."""


class VMBusy(VirbyError):
    """A stop was refused: connections are open and it was not forced."""


@dataclass(frozen=True)
class StartOutcome:
    """What L{Lifecycle.startNow} did: C{booted} is False when the VM was already running."""

    booted: bool
    address: tuple[str, int]
    boot_seconds: float | None


@dataclass(frozen=True)
class StopOutcome:
    """What L{Lifecycle.stopNow} did: C{stopped} is False when no VM was running or booting."""

    stopped: bool
    closed: int


class ExitInfo(Protocol):
    def describe(self) -> str: ...


class VirtualMachine(Protocol):
    """One running hypervisor process, as the lifecycle sees it."""

    pid: int
    ended: Deferred[Any]

    def consoleTail(self, n: int = 20) -> list[str]: ...

    def stop(self) -> Deferred[Any] | Coroutine[Any, Any, Any]: ...


class Guest(Protocol):
    """
    A guest whose sshd answers, as L{Hypervisor.waitReady} reports it.  It may hold the
    probe's open connection for the first waiter to claim; L{release} closes what is left
    once every waiter has had its turn.
    """

    @property
    def address(self) -> tuple[str, int]: ...

    def release(self) -> None: ...


class Hypervisor(Protocol):
    """How the lifecycle starts VMs and learns that one is ready."""

    def spawn(self) -> Deferred[VirtualMachine]:
        """Start a VM; fails with a L{VirbyError} when it cannot be started."""

    def waitReady(self, vm: VirtualMachine) -> Deferred[Guest]:
        """The guest once its SSH answers; cancellable; fails on timeout."""


class Connection(Protocol):
    """A spliced client connection, as far as the lifecycle cares."""

    def abort(self, why: str) -> None: ...


@dataclass(frozen=True)
class Snapshot:
    """What C{virby status} shows.  Times are seconds; C{None} where they do not apply."""

    state: str
    on_demand: bool
    vm_ip: str | None
    vm_port: int | None
    vfkit_pid: int | None
    uptime: float | None
    active_connections: int
    waiting_connections: int
    idle_stop_in: float | None
    restart_in: float | None
    last_boot_seconds: float | None
    last_error: str | None
    boots: int


class Lifecycle:
    """
    The state machine.  Inputs: L{start}, L{whenReady}, L{connectionOpened},
    L{connectionClosed}, L{shutdown}, and the VM's own events (ready, failed, ended).

    @param ttl: idle seconds before an on-demand VM is stopped.
    @param onDemand: boot at the first connection; otherwise boot at L{start} and restart
        after a crash with exponential backoff.
    """

    def __init__(
        self, clock: IReactorTime, hypervisor: Hypervisor, *, onDemand: bool, ttl: float
    ) -> None:
        self._clock = clock
        self._hypervisor = hypervisor
        self._onDemand = onDemand
        self._ttl = ttl
        self._state = State.STOPPED
        self._vm: VirtualMachine | None = None
        self._guest: Guest | None = None
        self._waiters: list[Deferred[Guest]] = []
        self._connections: set[Connection] = set()
        self._boot: Deferred[None] | None = None
        self._stopping: Deferred[Any] | None = None
        self._idleTimer: IDelayedCall | None = None
        self._restartTimer: IDelayedCall | None = None
        self._failures = 0
        self._bootStartedAt: float | None = None
        self._readyAt: float | None = None
        self._lastBootSeconds: float | None = None
        self._lastError: str | None = None
        self._boots = 0
        self._stoppedWaiters: list[Deferred[None]] = []

    # -- inputs

    @property
    def state(self) -> State:
        return self._state

    def start(self) -> None:
        """The daemon is up: an always-on VM boots now."""
        if not self._onDemand and self._state is State.STOPPED:
            self._startBoot()

    def whenReady(self) -> Deferred[Guest]:
        """
        The guest, now if the VM is running, else after the boot this call may start.
        Cancelling the result withdraws the wait and nothing else.
        """
        if self._state is State.RUNNING:
            assert self._guest is not None
            return succeed(self._guest)
        if self._state is State.SHUTDOWN:
            return fail(VMUnavailable("the daemon is shutting down"))
        waiter: Deferred[Guest] = Deferred(self._withdraw)
        self._waiters.append(waiter)
        if self._state is State.STOPPED:
            self._startBoot()
        return waiter

    def connectionOpened(self, connection: Connection) -> None:
        """Any open connection stops the idle clock."""
        self._connections.add(connection)
        self._cancelIdleTimer()

    def connectionClosed(self, connection: Connection) -> None:
        """The last connection to close starts the idle clock."""
        self._connections.discard(connection)
        self._armIdleTimerIfIdle()

    def shutdown(self) -> Deferred[None]:
        """Stop serving: fail the waiters, stop the VM gracefully, close what is left."""
        return Deferred.fromCoroutine(self._shutdown())

    def startNow(self) -> Deferred[StartOutcome]:
        """
        Boot now and fire once the VM is ready (C{virby start}); at once when it runs.  It
        is one more waiter: it shares a boot under way, and cancelling it withdraws only it.
        """
        if self._state is State.RUNNING:
            assert self._guest is not None
            return succeed(StartOutcome(False, self._guest.address, self._lastBootSeconds))
        if self._state is not State.SHUTDOWN:
            log.info("asked to start the VM")
        waiting = self.whenReady()
        return waiting.addCallback(
            lambda guest: StartOutcome(True, guest.address, self._lastBootSeconds)
        )

    def stopNow(self, force: bool = False) -> Deferred[StopOutcome]:
        """
        Stop the VM now (C{virby stop}) and fire once it has stopped.  Refused with
        L{VMBusy} while connections are open, unless C{force}, which closes them; anything
        waiting for a boot is told the VM was stopped.  A boot under way is given up.
        """
        if self._state is State.SHUTDOWN:
            return fail(VMUnavailable("the daemon is shutting down"))
        open_ = len(self._connections)
        if open_ and not force:
            return fail(
                VMBusy(
                    f"{open_} connection{'s are' if open_ != 1 else ' is'} open (a build may "
                    "be running): `virby stop --force` closes them"
                )
            )
        self._cancelRestartTimer()
        how = "virby stop --force" if force else "virby stop"
        if force:
            self._abortConnections(f"the VM was stopped ({how})")
        if self._state is State.STOPPED:
            return succeed(StopOutcome(False, open_ if force else 0))
        log.info("asked to stop the VM{forced}", forced=" (forced)" if force else "")
        self._failWaiters(f"the VM was stopped ({how})")
        done: Deferred[None] = Deferred(self._forgetStopWaiter)
        self._stoppedWaiters.append(done)
        if self._state is State.RUNNING:
            self._stopVM(crashed=False)
        elif self._state is State.BOOTING:
            self._giveUpBoot()
        return done.addCallback(lambda _: StopOutcome(True, open_ if force else 0))

    def _forgetStopWaiter(self, done: Deferred[None]) -> None:
        """Who asked for the stop left: the stop goes on, nobody is told of it."""
        if done in self._stoppedWaiters:
            self._stoppedWaiters.remove(done)

    def _giveUpBoot(self) -> None:
        """Cancel the boot under way: stop its VM, or, while it is still being made, none."""
        if self._boot is not None:
            boot, self._boot = self._boot, None
            boot.cancel()
        if self._vm is not None:
            self._stopVM(crashed=False)
        else:
            self._forgetRun()
            self._moveTo(State.STOPPED)
            log.info("boot given up")

    def snapshot(self) -> Snapshot:
        now = self._clock.seconds()
        address = self._guest.address if self._guest is not None else None
        return Snapshot(
            state=self._state.value,
            on_demand=self._onDemand,
            vm_ip=address[0] if address else None,
            vm_port=address[1] if address else None,
            vfkit_pid=self._vm.pid if self._vm is not None else None,
            uptime=now - self._readyAt if self._readyAt is not None else None,
            active_connections=len(self._connections),
            waiting_connections=len(self._waiters),
            idle_stop_in=_remaining(self._idleTimer, now),
            restart_in=_remaining(self._restartTimer, now),
            last_boot_seconds=self._lastBootSeconds,
            last_error=self._lastError,
            boots=self._boots,
        )

    # -- transitions

    def _moveTo(self, new: State) -> None:
        if new not in _ALLOWED[self._state]:
            raise IllegalTransition(f"{self._state.value} -> {new.value}")
        log.debug("VM state {old} -> {new}", old=self._state.value, new=new.value)
        self._state = new
        if new in (State.STOPPED, State.SHUTDOWN):
            waiting, self._stoppedWaiters = self._stoppedWaiters, []
            for done in waiting:
                if new is State.STOPPED:
                    done.callback(None)
                else:
                    done.errback(VMUnavailable("the daemon is shutting down"))

    def _startBoot(self) -> None:
        self._cancelRestartTimer()
        self._moveTo(State.BOOTING)
        self._boots += 1
        self._bootStartedAt = self._clock.seconds()
        log.info("booting the VM")
        boot = Deferred.fromCoroutine(self._bootSequence())
        boot.addErrback(_ignoreCancellation)
        if not boot.called:
            self._boot = boot
            boot.addBoth(self._bootDone, boot)

    def _bootDone(self, result: object, boot: Deferred[None]) -> object:
        if self._boot is boot:
            self._boot = None
        return result

    async def _bootSequence(self) -> None:
        try:
            vm = await self._hypervisor.spawn()
        except CancelledError:
            return
        except Exception as e:
            self._bootFailed(Failure(e), None)
            return
        if self._state is not State.BOOTING:
            # Shut down while spawning: the shutdown path could not see this VM yet.
            await vm.stop()
            return
        self._vm = vm
        vm.ended.addCallback(self._vmEnded, vm)
        try:
            guest = await self._hypervisor.waitReady(vm)
        except CancelledError:
            return
        except Exception as e:
            self._bootFailed(Failure(e), vm)
            return
        self._bootSucceeded(guest)

    def _bootSucceeded(self, guest: Guest) -> None:
        self._moveTo(State.RUNNING)
        self._guest = guest
        address = guest.address
        self._readyAt = self._clock.seconds()
        assert self._bootStartedAt is not None
        self._lastBootSeconds = self._readyAt - self._bootStartedAt
        log.info(
            "VM ready at {host}:{port} after {seconds:.1f}s",
            host=address[0],
            port=address[1],
            seconds=self._lastBootSeconds,
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(guest)
        # The first waiter has claimed the probe's connection, if it wanted it.
        guest.release()
        self._armIdleTimerIfIdle()

    def _bootFailed(self, reason: Failure, vm: VirtualMachine | None) -> None:
        why = _oneLine(reason)
        self._recordError(f"boot failed: {why}", vm)
        self._failWaiters(f"the VM did not boot: {why}")
        if vm is not None and self._vm is vm:
            self._stopVM(crashed=True)
        else:
            self._moveTo(State.STOPPED)
            self._afterStopped(crashed=True)

    def _vmEnded(self, status: ExitInfo, vm: VirtualMachine) -> None:
        """The hypervisor process is gone.  Expected while stopping; otherwise a crash."""
        if vm is not self._vm:
            return
        if self._state in (State.STOPPING, State.SHUTDOWN):
            return
        self._vm = None
        self._cancelIdleTimer()
        self._recordError(f"the VM {status.describe()}", vm)
        if self._boot is not None:
            boot, self._boot = self._boot, None
            boot.cancel()
        self._failWaiters(f"the VM {status.describe()} while booting")
        self._abortConnections(f"the VM {status.describe()}")
        self._forgetRun()
        self._moveTo(State.STOPPED)
        self._afterStopped(crashed=True)

    def _idleExpired(self) -> None:
        self._idleTimer = None
        if self._state is not State.RUNNING or self._connections:
            return
        log.info("no connection for {ttl}s: stopping the VM to free its memory", ttl=self._ttl)
        self._stopVM(crashed=False)

    def _stopVM(self, *, crashed: bool) -> None:
        vm = self._vm
        assert vm is not None
        self._moveTo(State.STOPPING)
        self._cancelIdleTimer()
        self._forgetRun()
        self._stopping = stopping = ensureDeferred(vm.stop())
        stopping.addErrback(lambda f: log.failure("stopping the VM failed", f))
        stopping.addCallback(lambda _: self._vmStopped(vm, crashed))

    def _vmStopped(self, vm: VirtualMachine, crashed: bool) -> None:
        self._stopping = None
        if self._vm is vm:
            self._vm = None
        if self._state is State.SHUTDOWN:
            return
        self._moveTo(State.STOPPED)
        log.info("VM stopped")
        self._afterStopped(crashed=crashed)

    def _afterStopped(self, *, crashed: bool) -> None:
        """Boot again for whoever waits; an always-on VM comes back after a pause."""
        if self._waiters:
            self._startBoot()
        elif not self._onDemand and crashed:
            self._scheduleRestart()

    def _scheduleRestart(self) -> None:
        self._failures += 1
        delay = min(MAX_RESTART_DELAY, 2.0 ** (self._failures - 1))
        log.info("restarting the VM in {delay:.0f}s", delay=delay)
        self._restartTimer = self._clock.callLater(delay, self._restartDue)

    def _restartDue(self) -> None:
        self._restartTimer = None
        if self._state is State.STOPPED:
            self._startBoot()

    async def _shutdown(self) -> None:
        if self._state is State.SHUTDOWN:
            return
        self._moveTo(State.SHUTDOWN)
        self._cancelIdleTimer()
        self._cancelRestartTimer()
        self._failWaiters("the daemon is shutting down")
        if self._boot is not None:
            boot, self._boot = self._boot, None
            boot.cancel()
        vm, self._vm = self._vm, None
        if vm is not None:
            log.info("stopping the VM for shutdown")
            await vm.stop()
        elif self._stopping is not None:
            await self._stopping
        self._forgetRun()
        self._abortConnections("the daemon is shutting down")

    # -- helpers

    def _withdraw(self, waiter: Deferred[Any]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _failWaiters(self, why: str) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(VMUnavailable(why))

    def _abortConnections(self, why: str) -> None:
        for connection in list(self._connections):
            connection.abort(why)

    def _forgetRun(self) -> None:
        """The VM's address and uptime stop being true when it stops running."""
        if self._readyAt is not None and self._clock.seconds() - self._readyAt >= MAX_RESTART_DELAY:
            self._failures = 0
        self._guest = None
        self._readyAt = None

    def _recordError(self, message: str, vm: VirtualMachine | None) -> None:
        self._lastError = message
        tail = vm.consoleTail(20) if vm is not None else []
        log.error("{message}", message=message)
        if tail:
            log.error("last console lines:\n{console}", console="\n".join(tail))

    def _armIdleTimerIfIdle(self) -> None:
        if not self._onDemand or self._state is not State.RUNNING or self._connections:
            return
        if self._idleTimer is None:
            self._idleTimer = self._clock.callLater(self._ttl, self._idleExpired)

    def _cancelIdleTimer(self) -> None:
        _cancel(self._idleTimer)
        self._idleTimer = None

    def _cancelRestartTimer(self) -> None:
        _cancel(self._restartTimer)
        self._restartTimer = None


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


def _remaining(call: IDelayedCall | None, now: float) -> float | None:
    if call is None or not call.active():
        return None
    return max(0.0, call.getTime() - now)


def _ignoreCancellation(reason: Failure) -> None:
    """A cancelled boot was cancelled on purpose; anything else is a bug worth a traceback."""
    if not reason.check(CancelledError):
        log.failure("the boot sequence failed unexpectedly", reason)


def _oneLine(reason: Failure) -> str:
    """A failure as the one line a person reads: expected errors carry their own."""
    text = str(reason.value) or reason.type.__name__
    return " ".join(text.split())
