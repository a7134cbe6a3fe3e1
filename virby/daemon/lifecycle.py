"""
The VM's lifecycle: when to boot it, who waits for it, when to stop it.

This is the one place that decides.  It is an explicit state machine because every bug
upstream had lived in the gaps between states: two connections at cold start each booting
a VM, an idle timer armed on every close, a connection accepted while a stop was in flight
and then frozen, a stop that left the runner unable to start again.

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

When what the daemon runs is replaced (C{virby prepare} made a new image or new keys, or
the switch installed a new config or Virby package), L{Lifecycle.renew} asks the daemon to move
to it without cutting a build: every connection is still served by the VM that runs now,
and at the first moment no connection is open and no one waits, the machine tells the
daemon to retire (its C{retire}), in the same reactor turn, so that it stops taking
connections before another is accepted; the daemon then shuts down and its supervisor
(launchd) starts it anew, and the next connection boots what is installed.

A boot that fails with a L{PermanentError} (the host refuses what the config asks, say) is
not retried in always-on mode: retrying cannot help until something changes.  That is said
once; the next connection or C{virby start} tries again.

How it is built
===============

Every input is an L{Event}, carried by its own payload class (L{StopNow} holds the answer
and C{force}): the methods called from outside (L{Lifecycle.whenReady},
L{Lifecycle.stopNow}...) and the answers to what the machine itself started (the hypervisor
made the VM, its guest answered, a timer fired).  L{RULES} has one row per event and one
column per L{State}; each cell holds the method that handles the event in that state (the
function itself, which a type checker holds to its row's payload and its column's state)
and the states it may move to, or says that the event means nothing there (L{IGNORE}) or cannot
happen there (L{ILLEGAL}, a bug, logged with its traceback).  Nothing else decides what is
legal: the handlers have no guards on the state, and a handler that moves anywhere its cell
does not name fails the same way.

What is true only in one state lives in that state's object (the idle timer while running,
the restart timer while stopped, the wait under way while booting), and the VM of one run
with it (L{_Run}), from the boot that starts it to the stop that ends it: leaving a state
drops its data and cancels its timers, so nothing of a past run can act on the next.  An
answer that comes for a state the machine has left (a wait it cancelled, a timer that fired
late) is dropped before the table is consulted; a VM or a guest connection that comes that
way is stopped or closed, never leaked.

Events are handled one at a time, each to its end, before anyone outside is told of it.
The waiters of L{Lifecycle.whenReady}, L{Lifecycle.startNow} and L{Lifecycle.stopNow}, and
the connections to close, are told after the step that decided it, still in the same
reactor turn (nothing waits a turn longer than before); an input that their callbacks make
(a stop, a start, a new connection, a shutdown) is queued and handled after it, and never
runs inside another step.  The answers to the machine's own work come before queued
requests from outside: it finishes what it started before it takes the next request.
Cancelling a wait is not an event: it only takes the waiter off the list, at once, in any
state, and a waiter cancelled before its turn is skipped.

The transitions, generated from L{RULES} by L{diagram} (a test keeps this copy true):

    stopped  -> booting   start, whenReady, startNow, restartDue, wanted
    stopped  -> shutdown  shutdown
    booting  -> stopped   stopNow, bootFailed, vmEnded
    booting  -> running   ready
    booting  -> stopping  stopNow, bootFailed
    booting  -> shutdown  shutdown
    running  -> stopped   vmEnded
    running  -> stopping  stopNow, idleExpired
    running  -> shutdown  shutdown
    stopping -> stopped   vmStopped
    stopping -> shutdown  shutdown

C{docs/lifecycle.md} has the whole table and says where a new event goes.
"""

from __future__ import annotations

import enum
import functools
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from virby.daemon.observers import OneShot
from virby.errors import PermanentError, VirbyError, oneLine
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


class Event(enum.Enum):
    """The machine's inputs, named as the diagram shows them."""

    # Asked from outside, by the methods of the same name.
    START = "start"
    WHEN_READY = "whenReady"
    OPENED = "connectionOpened"
    CLOSED = "connectionClosed"
    START_NOW = "startNow"
    STOP_NOW = "stopNow"
    SHUTDOWN = "shutdown"
    # The answers to what the machine started.
    SPAWNED = "spawned"  # the hypervisor made the VM
    READY = "ready"  # its guest answers SSH
    BOOT_FAILED = "bootFailed"  # making it or waiting for its guest failed
    VM_ENDED = "vmEnded"  # its process ended, unasked
    VM_STOPPED = "vmStopped"  # a stop the machine asked for is done
    IDLE_EXPIRED = "idleExpired"  # the idle timer fired
    RESTART_DUE = "restartDue"  # the always-on restart timer fired
    WANTED = "wanted"  # the VM has stopped, and connections wait for it
    BOOT_PROGRESS = "bootProgress"  # the hypervisor's boot moved on to its next phase
    RENEW = "renew"  # what the daemon runs was replaced: move once no connection is open
    RETIRE_DUE = "retireDue"  # renewing, and nothing was open: retire unless that changed


class BootPhase(enum.Enum):
    """
    Where a boot is, as C{virby status} and C{virby start} show it and the log says it: the
    machine enters the first at the boot's start, and the hypervisor reports the others.
    """

    PREPARING = "preparing"
    FRESH_DISK = "fresh-disk"
    LEASE = "lease"
    SSHD = "sshd"

    @property
    def waitingFor(self) -> str:
        """What the boot waits for in this phase, for a person."""
        return _WAITING_FOR[self]


_WAITING_FOR = {
    BootPhase.PREPARING: "checking for a VM left behind and taking the VM lock",
    BootPhase.FRESH_DISK: "making a fresh disk",
    BootPhase.LEASE: "waiting for the guest's DHCP lease",
    BootPhase.SSHD: "waiting for the guest's sshd to answer",
}

#: How a hypervisor tells the machine its boot moved on: the phase it enters, and what just
#: happened in a few words (C{"vfkit started (pid 4242)"}).
BootReport = Callable[[BootPhase, str], None]

#: How many of the last boots C{virby status} sums up (count, median, last).
RECENT_BOOTS = 10


# -- each event's payload: what its handlers get besides the state's data


@dataclass(frozen=True)
class Start:
    """The daemon is up."""

    event: ClassVar[Event] = Event.START


@dataclass(frozen=True)
class WhenReady:
    """A connection waits for the guest."""

    waiter: _Waiter
    event: ClassVar[Event] = Event.WHEN_READY


@dataclass(frozen=True)
class Opened:
    connection: Connection
    event: ClassVar[Event] = Event.OPENED


@dataclass(frozen=True)
class Closed:
    connection: Connection
    event: ClassVar[Event] = Event.CLOSED


@dataclass(frozen=True)
class StartNow:
    """C{virby start}: one more waiter, told a L{StartOutcome}."""

    waiter: _Waiter
    event: ClassVar[Event] = Event.START_NOW


@dataclass(frozen=True)
class StopNow:
    """C{virby stop}: C{answer} is told a L{StopOutcome}."""

    answer: Deferred[StopOutcome]
    force: bool
    event: ClassVar[Event] = Event.STOP_NOW


@dataclass(frozen=True)
class Shutdown:
    """The daemon stops: C{answer} fires once the VM has stopped."""

    answer: Deferred[None]
    event: ClassVar[Event] = Event.SHUTDOWN


@dataclass(frozen=True)
class Spawned:
    vm: VirtualMachine
    event: ClassVar[Event] = Event.SPAWNED


@dataclass(frozen=True)
class Ready:
    guest: Guest
    event: ClassVar[Event] = Event.READY


@dataclass(frozen=True)
class BootFailed:
    reason: Failure
    event: ClassVar[Event] = Event.BOOT_FAILED


@dataclass(frozen=True)
class VMEnded:
    status: ExitInfo
    event: ClassVar[Event] = Event.VM_ENDED


@dataclass(frozen=True)
class VMStopped:
    event: ClassVar[Event] = Event.VM_STOPPED


@dataclass(frozen=True)
class IdleExpired:
    event: ClassVar[Event] = Event.IDLE_EXPIRED


@dataclass(frozen=True)
class RestartDue:
    event: ClassVar[Event] = Event.RESTART_DUE


@dataclass(frozen=True)
class Wanted:
    event: ClassVar[Event] = Event.WANTED


@dataclass(frozen=True)
class BootProgress:
    phase: BootPhase
    what: str
    event: ClassVar[Event] = Event.BOOT_PROGRESS


@dataclass(frozen=True)
class Renew:
    """C{virby prepare} replaced what the daemon runs: C{answer} is told a L{RenewOutcome}."""

    answer: Deferred[RenewOutcome]
    event: ClassVar[Event] = Event.RENEW


@dataclass(frozen=True)
class RetireDue:
    """
    A step found nothing open while renewing; what its answers asked in turn (a connection,
    a start) is handled before this, so the daemon retires only if it is still so.
    """

    event: ClassVar[Event] = Event.RETIRE_DUE


Payload = (
    Start
    | WhenReady
    | Opened
    | Closed
    | StartNow
    | StopNow
    | Shutdown
    | Spawned
    | Ready
    | BootFailed
    | VMEnded
    | VMStopped
    | IdleExpired
    | RestartDue
    | Wanted
    | BootProgress
    | Renew
    | RetireDue
)

#: The state's data a handler takes, and the payload of the event it handles.
S = TypeVar("S", contravariant=True)
P = TypeVar("P", contravariant=True)


@dataclass(frozen=True)
class Rule(Generic[S, P]):
    """
    One cell of L{RULES}: the function that handles the event in the state, and the states
    it may move to (staying is always allowed).  Without a handler, the event is ignored
    there, or, when not C{legal}, it cannot happen there and is a bug.

    The handler is a L{Lifecycle} method, unbound: it takes the machine, the state's data
    (C{S}) and the event's payload (C{P}), so a type checker holds each cell to its row's
    payload and its column's state.
    """

    handler: Callable[[Lifecycle[Any], S, P], None] | None
    targets: frozenset[State] = frozenset()
    legal: bool = True


def on(handler: Callable[[Lifecycle[Any], S, P], None], *targets: State) -> Rule[S, P]:
    return Rule(handler, frozenset(targets))


#: The event means nothing in this state.
IGNORE: Rule[Any, Any] = Rule(None)
#: The event cannot happen in this state: handling it there would be a bug.
ILLEGAL: Rule[Any, Any] = Rule(None, legal=False)


def row(
    payload: type[P],
    *,
    stopped: Rule[_Stopped, P],
    booting: Rule[_Booting, P],
    running: Rule[_Running, P],
    stopping: Rule[_Stopping, P],
    shutdown: Rule[_Shutdown, P],
) -> _Row:
    """One event's row of L{RULES}, for its payload: every state must be named."""
    return (stopped, booting, running, stopping, shutdown)


_Row = tuple[Rule[Any, Any], Rule[Any, Any], Rule[Any, Any], Rule[Any, Any], Rule[Any, Any]]
STOPPED, BOOTING, RUNNING, STOPPING, SHUTDOWN = State


def rule(event: Event, state: State) -> Rule[Any, Any]:
    """The cell of L{RULES} for C{event} in C{state}."""
    return RULES[event][_COLUMN[state]]


_COLUMN = {state: column for column, state in enumerate(State)}


def diagram() -> str:
    """
    The transitions L{RULES} allows, one line per pair of states with the events that move
    between them: the module's docstring and C{docs/lifecycle.md} show this text.
    """
    moves: dict[tuple[State, State], list[str]] = {}
    for event, row in RULES.items():
        for state, cell in zip(State, row, strict=True):
            for target in cell.targets:
                if target is not state:
                    moves.setdefault((state, target), []).append(event.value)
    width = max(len(state.value) for state in State)
    order = list(State)
    lines = [
        f"{source.value:<{width}} -> {target.value:<{width}}  {', '.join(events)}".rstrip()
        for (source, target), events in sorted(
            moves.items(), key=lambda item: (order.index(item[0][0]), order.index(item[0][1]))
        )
    ]
    return "\n".join(lines)


def table() -> str:
    """L{RULES} as a Markdown table, for C{docs/lifecycle.md}."""

    def cell(r: Rule[Any, Any]) -> str:
        if r.handler is None:
            return "ignored" if r.legal else "illegal"
        moves = " or ".join(state.value for state in State if state in r.targets)
        return f"`{r.handler.__name__}`" + (f" → {moves}" if moves else "")

    header = "| event | " + " | ".join(state.value for state in State) + " |"
    rule_line = "|---" * (len(State) + 1) + "|"
    rows = [
        f"| `{event.value}` | " + " | ".join(cell(r) for r in row) + " |"
        for event, row in RULES.items()
    ]
    return "\n".join([header, rule_line, *rows])


class IllegalTransition(Exception):
    """A bug: an event came where L{RULES} says it cannot, or a handler moved off its cell."""


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
class RenewOutcome:
    """
    What L{Lifecycle.renew} decided: C{now} when no connection was open, so the daemon
    retires at once; else it does once the C{open} connections (the waiting ones and
    C{virby start} included) have ended, or, with none, once the boot or the stop under way
    is done.
    """

    now: bool
    open: int


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

    @property
    def ended(self) -> Deferred[Any]:
        """Fires with an L{ExitInfo} when the process exits."""

    def consoleTail(self, n: int = 20) -> list[str]: ...

    def stop(self) -> Deferred[ExitInfo | None]:
        """Fires once the process has stopped, with how it ended when that is known."""


class Guest(Protocol):
    """
    A guest whose sshd answers, as L{Hypervisor.waitReady} reports it.  It may hold the
    probe's open connection for the first waiter to claim; L{release} closes what is left
    once every waiter has had its turn.
    """

    @property
    def address(self) -> tuple[str, int]: ...

    def release(self) -> None: ...


#: The guests one hypervisor reports: what the lifecycle hands its waiters is that type.
G = TypeVar("G", bound=Guest)
T = TypeVar("T")


class Hypervisor(Protocol[G]):
    """How the lifecycle starts VMs and learns that one is ready."""

    def spawn(self, report: BootReport) -> Deferred[VirtualMachine]:
        """
        Start a VM; fails with a L{VirbyError} when it cannot be started, and with a
        L{PermanentError} when no retry can succeed until something changes.  Each phase
        it enters on the way is told to C{report}.
        """

    def waitReady(self, vm: VirtualMachine, report: BootReport) -> Deferred[G]:
        """
        The guest once its SSH answers; cancellable; fails on timeout.  Each phase it
        enters on the way (the guest has its address) is told to C{report}.
        """


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
    #: While booting: the phase (a L{BootPhase} value), what the boot waits for and what
    #: happened last, and the seconds since the boot began.
    boot_phase: str | None
    boot_waiting_for: str | None
    boot_last_step: str | None
    boot_elapsed: float | None
    #: The last L{RECENT_BOOTS} boots that came to ready: how many, and their median.
    recent_boots: int
    recent_boot_median_seconds: float | None
    #: A renewal was asked: the daemon retires once no connection is open.
    renewing: bool


# -- the data of each state


@dataclass(eq=False)
class _Run:
    """
    One VM, from the boot that starts it until it has stopped; the machine holds it only
    while booting, running or stopping.
    """

    startedAt: float
    #: None while the hypervisor is still making it.
    vm: VirtualMachine | None = None


@dataclass(eq=False)
class _Stopped:
    state: ClassVar[State] = State.STOPPED
    #: Always-on, after a crash: the boot to come.
    restart: IDelayedCall | None = None

    def leave(self) -> None:
        _cancel(self.restart)


@dataclass(eq=False)
class _Booting:
    state: ClassVar[State] = State.BOOTING
    run: _Run
    #: The spawn, then the wait for the guest: given up when the boot is.
    pending: Deferred[Any]
    #: Where the boot is, and what happened last.
    phase: BootPhase = BootPhase.PREPARING
    lastStep: str = "booting the VM"

    def leave(self) -> None:
        self.pending.cancel()


@dataclass(eq=False)
class _Running:
    state: ClassVar[State] = State.RUNNING
    run: _Run
    guest: Guest
    readyAt: float
    #: Armed only while no connection is open (and only on demand).
    idle: IDelayedCall | None = None

    def leave(self) -> None:
        _cancel(self.idle)


@dataclass(eq=False)
class _Stopping:
    state: ClassVar[State] = State.STOPPING
    run: _Run
    #: The VM's stop: a shutdown that comes meanwhile waits for it too.
    done: OneShot[None]
    #: Whether an always-on VM boots again afterwards (it failed; nobody asked).
    retry: bool

    def leave(self) -> None:
        pass


@dataclass(eq=False)
class _Shutdown:
    state: ClassVar[State] = State.SHUTDOWN
    #: Fired once the VM has stopped and the connections are closed.
    answer: Deferred[None]

    def leave(self) -> None:
        pass


_Phase = _Stopped | _Booting | _Running | _Stopping | _Shutdown


@dataclass(eq=False)
class _Waiter:
    """Someone waiting for the guest: what they get is made from it when it answers."""

    answer: Deferred[Any]
    onReady: Callable[[Guest], object]
    #: A connection's wait (L{Lifecycle.whenReady}), not a person's (C{virby start}).
    connection: bool


@dataclass(eq=False)
class _Queued:
    payload: Payload
    #: The state (or run) the answer belongs to; None for a request from outside.
    owner: object
    #: What to do with an answer that comes after its state was left.
    ifStale: Callable[[], object] | None


class Lifecycle(Generic[G]):
    """
    The state machine.  Inputs: L{start}, L{whenReady}, L{connectionOpened},
    L{connectionClosed}, L{startNow}, L{stopNow}, L{shutdown}, and the VM's own events;
    L{RULES} says what each does in each state.

    @param ttl: idle seconds before an on-demand VM is stopped.
    @param onDemand: boot at the first connection; otherwise boot at L{start} and restart
        after a crash with exponential backoff.
    @ivar retire: called once, after L{renew}, at the first moment no connection is open
        and no one waits: the daemon stops taking connections then and shuts down, so that
        its supervisor starts it anew on what is installed now.  The daemon's service sets
        it, being made with its lifecycle; while it is C{None}, L{renew} is refused.
    """

    def __init__(
        self,
        clock: IReactorTime,
        hypervisor: Hypervisor[G],
        *,
        onDemand: bool,
        ttl: float,
    ) -> None:
        self._clock = clock
        self._hypervisor = hypervisor
        self._onDemand = onDemand
        self._ttl = ttl
        self.retire: Callable[[], object] | None = None
        # A renewal asked, and whether the daemon was told to retire for it.
        self._renewing = False
        self._retired = False
        self._phase: _Phase = _Stopped()
        # What lives across states: who waits, what is open, what the status shows.
        self._waiters: list[_Waiter] = []
        self._stopAnswers: list[tuple[Deferred[StopOutcome], int]] = []
        self._connections: set[Connection] = set()
        self._failures = 0
        self._lastBootSeconds: float | None = None
        self._lastError: str | None = None
        self._boots = 0
        self._bootTimes: deque[float] = deque(maxlen=RECENT_BOOTS)
        # Run to completion: the events waiting their turn (the answers to the machine's own
        # work first), and what to tell outside code after the step under way.
        self._results: deque[_Queued] = deque()
        self._requests: deque[_Queued] = deque()
        self._outbox: list[Callable[[], object]] = []
        self._handling = False
        self._step: tuple[Event, Rule[Any, Any]] | None = None

    # -- inputs

    @property
    def state(self) -> State:
        return self._phase.state

    def start(self) -> None:
        """The daemon is up: an always-on VM boots now."""
        self._handle(Start())

    def whenReady(self) -> Deferred[G]:
        """
        The guest, now if the VM is running, else after the boot this call may start.
        Cancelling the result withdraws the wait and nothing else.
        """
        answer: Deferred[G] = Deferred(self._withdraw)
        self._handle(WhenReady(_Waiter(answer, _same, connection=True)))
        return answer

    def connectionOpened(self, connection: Connection) -> None:
        """Any open connection stops the idle clock."""
        self._handle(Opened(connection))

    def connectionClosed(self, connection: Connection) -> None:
        """The last connection to close starts the idle clock."""
        self._handle(Closed(connection))

    def shutdown(self) -> Deferred[None]:
        """Stop serving: fail the waiters, stop the VM gracefully, close what is left."""
        answer: Deferred[None] = Deferred()
        self._handle(Shutdown(answer))
        return answer

    def startNow(self) -> Deferred[StartOutcome]:
        """
        Boot now and fire once the VM is ready (C{virby start}); at once when it runs.  It
        is one more waiter: it shares a boot under way, and cancelling it withdraws only it.
        """
        answer: Deferred[StartOutcome] = Deferred(self._withdraw)
        self._handle(StartNow(_Waiter(answer, self._booted, connection=False)))
        return answer

    def stopNow(self, force: bool = False) -> Deferred[StopOutcome]:
        """
        Stop the VM now (C{virby stop}) and fire once it has stopped.  Refused with
        L{VMBusy} while connections are open, unless C{force}, which closes them; anything
        waiting for a boot is told the VM was stopped.  A boot under way is given up.
        Cancelling the result leaves the stop going on, and tells nobody.
        """
        answer: Deferred[StopOutcome] = Deferred(self._forgetStopAnswer)
        self._handle(StopNow(answer, force))
        return answer

    def renew(self) -> Deferred[RenewOutcome]:
        """
        What the daemon runs was replaced (a new image, new keys, a new config or package):
        retire once no connection is open, so that no running build is cut.  Until then
        every connection is served as before, by the VM that runs now.

        @raise VirbyError: through the result, when the daemon cannot retire (no C{retire}).
        """
        answer: Deferred[RenewOutcome] = Deferred()
        self._handle(Renew(answer))
        return answer

    def snapshot(self) -> Snapshot:
        now = self._clock.seconds()
        phase = self._phase
        run = getattr(phase, "run", None)
        running = phase if isinstance(phase, _Running) else None
        booting = phase if isinstance(phase, _Booting) else None
        address = running.guest.address if running is not None else None
        # A connection waiting for the VM is open too: it is counted once, as waiting.
        waiting = sum(1 for waiter in self._waiters if waiter.connection)
        return Snapshot(
            state=phase.state.value,
            on_demand=self._onDemand,
            vm_ip=address[0] if address else None,
            vm_port=address[1] if address else None,
            vfkit_pid=run.vm.pid if run is not None and run.vm is not None else None,
            uptime=now - running.readyAt if running is not None else None,
            active_connections=max(0, len(self._connections) - waiting),
            waiting_connections=waiting,
            idle_stop_in=_remaining(running.idle if running else None, now),
            restart_in=_remaining(phase.restart if isinstance(phase, _Stopped) else None, now),
            last_boot_seconds=self._lastBootSeconds,
            last_error=self._lastError,
            boots=self._boots,
            boot_phase=booting.phase.value if booting else None,
            boot_waiting_for=booting.phase.waitingFor if booting else None,
            boot_last_step=booting.lastStep if booting else None,
            boot_elapsed=now - booting.run.startedAt if booting else None,
            recent_boots=len(self._bootTimes),
            recent_boot_median_seconds=statistics.median(self._bootTimes)
            if self._bootTimes
            else None,
            renewing=self._renewing,
        )

    # -- the dispatcher

    def _handle(
        self,
        payload: Payload,
        *,
        owner: object = None,
        ifStale: Callable[[], object] | None = None,
    ) -> None:
        """
        Queue the event of C{payload}, and handle the queue unless a step is under way (this
        call then comes from inside it, and the loop below takes the event in its turn).
        """
        queued = _Queued(payload, owner, ifStale)
        (self._requests if owner is None else self._results).append(queued)
        if self._handling:
            return
        self._handling = True
        try:
            while self._results or self._requests:
                queue = self._results if self._results else self._requests
                self._takeStep(queue.popleft())
                self._deliver()
        finally:
            self._handling = False

    def _takeStep(self, queued: _Queued) -> None:
        """One step: the event's cell of L{RULES}, in the state the machine is in now."""
        phase = self._phase
        event = queued.payload.event
        cell = rule(event, phase.state)
        try:
            if queued.owner is not None and not self._current(queued.owner):
                log.debug("{event} of a state left: dropped", event=event.value)
                if queued.ifStale is not None:
                    queued.ifStale()
                return
            if cell.handler is None:
                if not cell.legal:
                    raise IllegalTransition(
                        f"{event.value} cannot happen while {phase.state.value}"
                    )
                return
            self._step = (event, cell)
            cell.handler(self, phase, queued.payload)
        except Exception:
            log.failure(
                "the VM lifecycle broke its rules: {event} while {state}",
                event=event.value,
                state=phase.state.value,
            )
        finally:
            self._step = None

    def _current(self, owner: object) -> bool:
        """Whether an answer still belongs: to the state the machine is in, or its run."""
        return owner is self._phase or owner is getattr(self._phase, "run", None)

    def _deliver(self) -> None:
        """Tell outside code what the step decided; what it asks in turn is queued."""
        outbox, self._outbox = self._outbox, []
        for tell in outbox:
            try:
                tell()
            except Exception:
                log.failure("telling the outcome of a VM lifecycle step failed")

    def _tell(self, tell: Callable[[], object]) -> None:
        self._outbox.append(tell)

    def _enter(self, new: _Phase) -> None:
        """Move to C{new}, if the step's cell allows it; the state left drops its data."""
        assert self._step is not None, "states change only inside a step"
        event, cell = self._step
        old = self._phase
        if new.state not in cell.targets:
            raise IllegalTransition(
                f"{event.value} may not move {old.state.value} -> {new.state.value}"
            )
        old.leave()
        if isinstance(old, _Running) and self._clock.seconds() - old.readyAt >= MAX_RESTART_DELAY:
            self._failures = 0  # a healthy run: the next crash restarts at once
        log.debug("VM state {old} -> {new}", old=old.state.value, new=new.state.value)
        self._phase = new

    def _answerFor(
        self,
        owner: _Booting,
        d: Deferred[T],
        event: Callable[[T], Spawned | Ready],
        ifStale: Callable[[T], object],
    ) -> None:
        """
        Turn the outcome of the boot's step C{d} into C{event}, or L{BootFailed}.  A result
        that comes after the boot was given up is not lost: C{ifStale} disposes of it.
        """

        def succeeded(result: T) -> None:
            self._handle(event(result), owner=owner, ifStale=lambda: ifStale(result))

        def failed(reason: Failure) -> None:
            self._handle(BootFailed(reason), owner=owner)

        d.addCallbacks(succeeded, failed)

    # -- handlers: each is named in RULES, and takes the state's data, then the payload

    def _startAlwaysOn(self, stopped: _Stopped, started: Start) -> None:
        if not self._onDemand:
            self._boot(stopped)

    def _restart(self, stopped: _Stopped, due: RestartDue) -> None:
        self._boot(stopped)

    def _bootForWaiters(self, stopped: _Stopped, wanted: Wanted) -> None:
        self._boot(stopped)

    def _boot(self, stopped: _Stopped) -> None:
        self._boots += 1
        run = _Run(startedAt=self._clock.seconds())
        log.info("booting the VM")
        spawning = maybeDeferred(self._hypervisor.spawn, self._reporter(run))
        booting = _Booting(run, spawning)
        # Before the move: should it fail, the VM made meanwhile is not left running.
        self._answerFor(booting, spawning, Spawned, self._strayVM)
        self._enter(booting)

    def _waitAndBoot(self, stopped: _Stopped, asked: WhenReady | StartNow) -> None:
        self._waiters.append(asked.waiter)
        self._boot(stopped)

    def _wait(self, phase: _Booting | _Stopping, asked: WhenReady | StartNow) -> None:
        self._waiters.append(asked.waiter)

    def _serve(self, running: _Running, asked: WhenReady) -> None:
        waiter = asked.waiter
        self._tell(lambda: _fire(waiter.answer, waiter.onReady(running.guest)))

    def _refuseWait(self, shutdown: _Shutdown, asked: WhenReady | StartNow) -> None:
        answer = asked.waiter.answer
        self._tell(lambda: _fail(answer, VMUnavailable("the daemon is shutting down")))

    def _opened(self, phase: _Phase, opened: Opened) -> None:
        self._connections.add(opened.connection)

    def _openedWhileRunning(self, running: _Running, opened: Opened) -> None:
        self._connections.add(opened.connection)
        _cancel(running.idle)
        running.idle = None

    def _closed(self, phase: _Phase, closed: Closed) -> None:
        self._connections.discard(closed.connection)

    def _closedWhileRunning(self, running: _Running, closed: Closed) -> None:
        self._connections.discard(closed.connection)
        if not self._retireIfQuiet():
            self._armIdleTimer(running)

    def _closedWhileStopped(self, stopped: _Stopped, closed: Closed) -> None:
        self._connections.discard(closed.connection)
        self._retireIfQuiet()

    def _renew(self, phase: _Stopped | _Booting | _Running | _Stopping, asked: Renew) -> None:
        answer = asked.answer
        if self.retire is None:
            refused = VirbyError("this daemon has no way to start again: restart it by hand")
            self._tell(lambda: _fail(answer, refused))
            return
        if not self._renewing:
            log.info("asked to renew: retiring once no connection is open")
        self._renewing = True
        open_ = len(self._connections) + sum(1 for w in self._waiters if not w.connection)
        quiet = isinstance(phase, _Stopped | _Running) and self._quiet()
        self._tell(lambda: _fire(answer, RenewOutcome(quiet, open_)))
        self._retireIfQuiet()

    def _retireDue(self, phase: _Stopped | _Running, due: RetireDue) -> None:
        if not self._quiet():
            self._retired = False  # asked for more meanwhile: the next quiet moment
            return
        retire = self.retire
        assert retire is not None
        log.info("no connection is open: retiring, so that what is installed now serves next")
        if isinstance(phase, _Running):
            _cancel(phase.idle)
            phase.idle = None
        else:
            _cancel(phase.restart)
            phase.restart = None
        self._tell(retire)

    def _retireLater(self, phase: _Booting | _Stopping, due: RetireDue) -> None:
        self._retired = False  # a boot or a stop began meanwhile: checked again at its end

    def _refuseRenew(self, shutdown: _Shutdown, asked: Renew) -> None:
        answer = asked.answer
        self._tell(lambda: _fail(answer, VMUnavailable("the daemon is shutting down")))

    def _startNowAndBoot(self, stopped: _Stopped, asked: StartNow) -> None:
        log.info("asked to start the VM")
        self._waitAndBoot(stopped, asked)

    def _startNowWait(self, phase: _Booting | _Stopping, asked: StartNow) -> None:
        log.info("asked to start the VM")
        self._wait(phase, asked)

    def _alreadyRunning(self, running: _Running, asked: StartNow) -> None:
        outcome = StartOutcome(False, running.guest.address, self._lastBootSeconds)
        answer = asked.waiter.answer
        self._tell(lambda: _fire(answer, outcome))

    def _stopNowWhileStopped(self, stopped: _Stopped, asked: StopNow) -> None:
        answer, force = asked.answer, asked.force
        closed = self._stopAsked(answer, force)
        if closed is None:
            return
        _cancel(stopped.restart)
        stopped.restart = None
        self._tell(lambda: _fire(answer, StopOutcome(False, closed)))

    def _stopNowWhileBooting(self, booting: _Booting, asked: StopNow) -> None:
        if not self._stopNowUnderWay(asked.answer, asked.force):
            return
        if booting.run.vm is not None:
            self._stop(booting, retry=False)
        else:
            self._enterStopped(retry=False)
            log.info("boot given up")

    def _stopNowWhileRunning(self, running: _Running, asked: StopNow) -> None:
        if self._stopNowUnderWay(asked.answer, asked.force):
            self._stop(running, retry=False)

    def _stopNowWhileStopping(self, stopping: _Stopping, asked: StopNow) -> None:
        if self._stopNowUnderWay(asked.answer, asked.force):
            stopping.retry = False  # stopped on request: no always-on restart after all

    def _refuseStop(self, shutdown: _Shutdown, asked: StopNow) -> None:
        answer = asked.answer
        self._tell(lambda: _fail(answer, VMUnavailable("the daemon is shutting down")))

    def _stopAsked(self, answer: Deferred[Any], force: bool) -> int | None:
        """
        Refuse a stop while connections are open, unless forced (then close them); the
        number of connections closed, or None when refused.
        """
        open_ = len(self._connections)
        if open_ and not force:
            busy = VMBusy(
                f"{open_} connection{'s are' if open_ != 1 else ' is'} open (a build may "
                "be running): `virby stop --force` closes them"
            )
            self._tell(lambda: _fail(answer, busy))
            return None
        if force:
            self._abortConnections("the VM was stopped (virby stop --force)")
        return open_ if force else 0

    def _stopNowUnderWay(self, answer: Deferred[Any], force: bool) -> bool:
        """A stop that is not refused: those who wait are told, the asker answered later."""
        closed = self._stopAsked(answer, force)
        if closed is None:
            return False
        log.info("asked to stop the VM{forced}", forced=" (forced)" if force else "")
        how = "virby stop --force" if force else "virby stop"
        self._failWaiters(f"the VM was stopped ({how})")
        self._stopAnswers.append((answer, closed))
        return True

    def _shutdownNow(self, stopped: _Stopped, asked: Shutdown) -> None:
        self._closeForShutdown(self._enterShutdown(asked.answer))

    def _shutdownWithVM(self, phase: _Booting | _Running, asked: Shutdown) -> None:
        vm = phase.run.vm
        shutdown = self._enterShutdown(asked.answer)
        if vm is None:
            self._closeForShutdown(shutdown)  # leaving BOOTING gave up the VM's making
        else:
            log.info("stopping the VM for shutdown")
            self._whenStopped(self._stopVM(vm), shutdown)

    def _shutdownWhileStopping(self, stopping: _Stopping, asked: Shutdown) -> None:
        self._whenStopped(stopping.done.observe(), self._enterShutdown(asked.answer))

    def _alreadyShutDown(self, shutdown: _Shutdown, asked: Shutdown) -> None:
        answer = asked.answer
        self._tell(lambda: _fire(answer, None))

    def _spawned(self, booting: _Booting, spawned: Spawned) -> None:
        run = booting.run
        run.vm = vm = spawned.vm

        def ended(status: ExitInfo) -> ExitInfo:
            self._handle(VMEnded(status), owner=run)
            return status

        vm.ended.addCallback(ended)
        booting.pending = waiting = maybeDeferred(
            self._hypervisor.waitReady, vm, self._reporter(run)
        )
        self._answerFor(booting, waiting, Ready, _releaseGuest)

    def _progress(self, booting: _Booting, progress: BootProgress) -> None:
        booting.phase, booting.lastStep = progress.phase, progress.what
        log.info(
            "boot: {what}; {waitingFor} ({seconds:.1f}s)",
            what=progress.what,
            waitingFor=progress.phase.waitingFor,
            seconds=self._clock.seconds() - booting.run.startedAt,
            phase=progress.phase.value,
        )

    def _ready(self, booting: _Booting, ready: Ready) -> None:
        guest = ready.guest
        now = self._clock.seconds()
        self._lastBootSeconds = now - booting.run.startedAt
        self._bootTimes.append(self._lastBootSeconds)
        running = _Running(booting.run, guest, readyAt=now)
        self._enter(running)
        address = guest.address
        log.info(
            "VM ready at {host}:{port} after {seconds:.1f}s",
            host=address[0],
            port=address[1],
            seconds=self._lastBootSeconds,
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._tell(functools.partial(_answer, waiter, guest))
        # The first waiter has claimed the probe's connection, if it wanted it.
        self._tell(guest.release)
        if not self._retireIfQuiet():
            self._armIdleTimer(running)

    def _bootFailed(self, booting: _Booting, failed: BootFailed) -> None:
        reason = failed.reason
        why = oneLine(reason)
        vm = booting.run.vm
        self._recordError(f"boot failed: {why}", vm, booting)
        self._failWaiters(f"the VM did not boot: {why}")
        permanent = reason.check(PermanentError) is not None
        if permanent and not self._onDemand:
            log.warn(
                "not booting the VM again until something changes: the next connection "
                "or `virby start` tries again"
            )
        if vm is not None:
            self._stop(booting, retry=not permanent)
        else:
            self._enterStopped(retry=not permanent)

    def _died(self, phase: _Booting | _Running, ended: VMEnded) -> None:
        """The hypervisor process is gone, unasked: a crash."""
        what = f"the VM {ended.status.describe()}"
        self._recordError(what, phase.run.vm, phase if isinstance(phase, _Booting) else None)
        self._failWaiters(f"{what} while booting")
        self._abortConnections(what)
        self._enterStopped(retry=True)

    def _idleExpired(self, running: _Running, expired: IdleExpired) -> None:
        running.idle = None
        log.info("no connection for {ttl}s: stopping the VM to free its memory", ttl=self._ttl)
        self._stop(running, retry=False)

    def _stopped(self, stopping: _Stopping, stopped: VMStopped) -> None:
        self._enterStopped(retry=stopping.retry)
        log.info("VM stopped")

    def _shutdownDone(self, shutdown: _Shutdown, stopped: VMStopped) -> None:
        self._closeForShutdown(shutdown)

    def _closeForShutdown(self, shutdown: _Shutdown) -> None:
        self._abortConnections("the daemon is shutting down")
        self._tell(lambda: _fire(shutdown.answer, None))

    # -- the ways into a state

    def _stop(self, phase: _Booting | _Running, *, retry: bool) -> None:
        """Stop the VM of C{phase}; an always-on VM boots again afterwards if C{retry}."""
        vm = phase.run.vm
        assert vm is not None
        done: OneShot[None] = OneShot()
        self._stopVM(vm).addBoth(done.fire)
        stopping = _Stopping(phase.run, done, retry)
        self._enter(stopping)
        self._whenStopped(done.observe(), stopping)

    def _whenStopped(self, done: Deferred[Any], owner: _Stopping | _Shutdown) -> None:
        done.addCallback(lambda _: self._handle(VMStopped(), owner=owner))

    def _enterStopped(self, *, retry: bool) -> None:
        """
        Stopped: answer who asked for the stop, and boot again for who waits; an always-on
        VM that failed comes back after a pause.
        """
        stopped = _Stopped()
        self._enter(stopped)
        answers, self._stopAnswers = self._stopAnswers, []
        for answer, closed in answers:
            self._tell(functools.partial(_fire, answer, StopOutcome(True, closed)))
        if self._waiters:
            self._handle(Wanted(), owner=stopped)
        elif self._retireIfQuiet():
            return
        elif retry and not self._onDemand:
            self._failures += 1
            delay = min(MAX_RESTART_DELAY, 2.0 ** (self._failures - 1))
            log.info("restarting the VM in {delay:.0f}s", delay=delay)
            stopped.restart = self._clock.callLater(
                delay, lambda: self._handle(RestartDue(), owner=stopped)
            )

    def _enterShutdown(self, answer: Deferred[None]) -> _Shutdown:
        """Shut down: who waits and who asked for a stop are refused from now on."""
        shutdown = _Shutdown(answer)
        self._enter(shutdown)
        answers, self._stopAnswers = self._stopAnswers, []
        for stopAnswer, _ in answers:
            self._tell(
                functools.partial(_fail, stopAnswer, VMUnavailable("the daemon is shutting down"))
            )
        self._failWaiters("the daemon is shutting down")
        return shutdown

    # -- helpers

    def _stopVM(self, vm: VirtualMachine) -> Deferred[None]:
        """Ask the VM to stop; a stop that fails is logged, and counts as done."""
        stopping: Deferred[Any] = vm.stop()
        return stopping.addErrback(lambda f: log.failure("stopping the VM failed", f))

    def _strayVM(self, vm: VirtualMachine) -> None:
        """A VM made for a boot that was given up meanwhile: nobody will use it."""
        log.info("stopping a VM made for a boot that was given up")
        self._stopVM(vm)

    def _reporter(self, run: _Run) -> BootReport:
        """How the hypervisor reports the phases of C{run}'s boot: late reports are dropped."""

        def report(phase: BootPhase, what: str) -> None:
            self._handle(BootProgress(phase, what), owner=run)

        return report

    def _booted(self, guest: Guest) -> StartOutcome:
        return StartOutcome(True, guest.address, self._lastBootSeconds)

    def _withdraw(self, answer: Deferred[Any]) -> None:
        """A waiter that left: it is forgotten, and the boot it may have started goes on."""
        self._waiters = [w for w in self._waiters if w.answer is not answer]

    def _forgetStopAnswer(self, answer: Deferred[Any]) -> None:
        """Who asked for the stop left: the stop goes on, nobody is told of it."""
        self._stopAnswers = [a for a in self._stopAnswers if a[0] is not answer]

    def _failWaiters(self, why: str) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._tell(functools.partial(_fail, waiter.answer, VMUnavailable(why)))

    def _abortConnections(self, why: str) -> None:
        for connection in list(self._connections):
            self._tell(functools.partial(connection.abort, why))

    def _recordError(
        self, message: str, vm: VirtualMachine | None, booting: _Booting | None = None
    ) -> None:
        self._lastError = message
        tail = vm.consoleTail(20) if vm is not None else []
        log.error("{message}", message=message)
        if booting is not None:
            log.error(
                "the boot stopped in phase {phase} ({waitingFor}) after {seconds:.1f}s",
                phase=booting.phase.value,
                waitingFor=booting.phase.waitingFor,
                seconds=self._clock.seconds() - booting.run.startedAt,
                lastStep=booting.lastStep,
            )
        if tail:
            log.error("last console lines:\n{console}", console="\n".join(tail))

    def _quiet(self) -> bool:
        """No connection is open and no one waits for the VM."""
        return not self._connections and not self._waiters

    def _retireIfQuiet(self) -> bool:
        """
        After a renewal was asked, tell the daemon to retire at the first quiet moment, once:
        in the same reactor turn as the step that made it quiet, so that it stops taking
        connections before another can be accepted; after what that step's answers ask in
        turn (L{RetireDue}).
        """
        if not self._renewing or self._retired or not self._quiet():
            return False
        self._retired = True
        self._tell(lambda: self._handle(RetireDue()))
        return True

    def _armIdleTimer(self, running: _Running) -> None:
        if not self._onDemand or self._connections or running.idle is not None:
            return
        running.idle = self._clock.callLater(
            self._ttl, lambda: self._handle(IdleExpired(), owner=running)
        )


#: What each event does in each state.
RULES: dict[Event, _Row] = {
    Event.START: row(
        Start,
        stopped=on(Lifecycle._startAlwaysOn, BOOTING),
        booting=IGNORE,
        running=IGNORE,
        stopping=IGNORE,
        shutdown=IGNORE,
    ),
    Event.WHEN_READY: row(
        WhenReady,
        stopped=on(Lifecycle._waitAndBoot, BOOTING),
        booting=on(Lifecycle._wait),
        running=on(Lifecycle._serve),
        stopping=on(Lifecycle._wait),
        shutdown=on(Lifecycle._refuseWait),
    ),
    Event.OPENED: row(
        Opened,
        stopped=on(Lifecycle._opened),
        booting=on(Lifecycle._opened),
        running=on(Lifecycle._openedWhileRunning),
        stopping=on(Lifecycle._opened),
        shutdown=on(Lifecycle._opened),
    ),
    Event.CLOSED: row(
        Closed,
        stopped=on(Lifecycle._closedWhileStopped),
        booting=on(Lifecycle._closed),
        running=on(Lifecycle._closedWhileRunning),
        stopping=on(Lifecycle._closed),
        shutdown=on(Lifecycle._closed),
    ),
    Event.START_NOW: row(
        StartNow,
        stopped=on(Lifecycle._startNowAndBoot, BOOTING),
        booting=on(Lifecycle._startNowWait),
        running=on(Lifecycle._alreadyRunning),
        stopping=on(Lifecycle._startNowWait),
        shutdown=on(Lifecycle._refuseWait),
    ),
    Event.STOP_NOW: row(
        StopNow,
        stopped=on(Lifecycle._stopNowWhileStopped),
        booting=on(Lifecycle._stopNowWhileBooting, STOPPED, STOPPING),
        running=on(Lifecycle._stopNowWhileRunning, STOPPING),
        stopping=on(Lifecycle._stopNowWhileStopping),
        shutdown=on(Lifecycle._refuseStop),
    ),
    Event.SHUTDOWN: row(
        Shutdown,
        stopped=on(Lifecycle._shutdownNow, SHUTDOWN),
        booting=on(Lifecycle._shutdownWithVM, SHUTDOWN),
        running=on(Lifecycle._shutdownWithVM, SHUTDOWN),
        stopping=on(Lifecycle._shutdownWhileStopping, SHUTDOWN),
        shutdown=on(Lifecycle._alreadyShutDown),
    ),
    Event.SPAWNED: row(
        Spawned,
        stopped=ILLEGAL,
        booting=on(Lifecycle._spawned),
        running=ILLEGAL,
        stopping=ILLEGAL,
        shutdown=ILLEGAL,
    ),
    Event.READY: row(
        Ready,
        stopped=ILLEGAL,
        booting=on(Lifecycle._ready, RUNNING),
        running=ILLEGAL,
        stopping=ILLEGAL,
        shutdown=ILLEGAL,
    ),
    Event.BOOT_FAILED: row(
        BootFailed,
        stopped=ILLEGAL,
        booting=on(Lifecycle._bootFailed, STOPPED, STOPPING),
        running=ILLEGAL,
        stopping=ILLEGAL,
        shutdown=ILLEGAL,
    ),
    Event.VM_ENDED: row(
        VMEnded,
        stopped=ILLEGAL,
        booting=on(Lifecycle._died, STOPPED),
        running=on(Lifecycle._died, STOPPED),
        stopping=IGNORE,  # expected: the stop's own answer moves on
        shutdown=ILLEGAL,
    ),
    Event.VM_STOPPED: row(
        VMStopped,
        stopped=ILLEGAL,
        booting=ILLEGAL,
        running=ILLEGAL,
        stopping=on(Lifecycle._stopped, STOPPED),
        shutdown=on(Lifecycle._shutdownDone),
    ),
    Event.IDLE_EXPIRED: row(
        IdleExpired,
        stopped=ILLEGAL,
        booting=ILLEGAL,
        running=on(Lifecycle._idleExpired, STOPPING),
        stopping=ILLEGAL,
        shutdown=ILLEGAL,
    ),
    Event.RESTART_DUE: row(
        RestartDue,
        stopped=on(Lifecycle._restart, BOOTING),
        booting=ILLEGAL,
        running=ILLEGAL,
        stopping=ILLEGAL,
        shutdown=ILLEGAL,
    ),
    Event.WANTED: row(
        Wanted,
        stopped=on(Lifecycle._bootForWaiters, BOOTING),
        booting=ILLEGAL,
        running=ILLEGAL,
        stopping=ILLEGAL,
        shutdown=ILLEGAL,
    ),
    Event.BOOT_PROGRESS: row(
        BootProgress,
        stopped=ILLEGAL,
        booting=on(Lifecycle._progress),
        running=IGNORE,  # a report that crossed the guest's answer
        stopping=IGNORE,  # a report that crossed the boot's failure
        shutdown=ILLEGAL,
    ),
    Event.RENEW: row(
        Renew,
        stopped=on(Lifecycle._renew),
        booting=on(Lifecycle._renew),
        running=on(Lifecycle._renew),
        stopping=on(Lifecycle._renew),
        shutdown=on(Lifecycle._refuseRenew),
    ),
    Event.RETIRE_DUE: row(
        RetireDue,
        stopped=on(Lifecycle._retireDue),
        booting=on(Lifecycle._retireLater),
        running=on(Lifecycle._retireDue),
        stopping=on(Lifecycle._retireLater),
        shutdown=IGNORE,  # the daemon is stopping anyway
    ),
}


def _answer(waiter: _Waiter, guest: Guest) -> None:
    """Tell C{waiter} what it waited for, made from C{guest} now."""
    _fire(waiter.answer, waiter.onReady(guest))


def _same(guest: Guest) -> Guest:
    return guest


def _releaseGuest(guest: Guest) -> None:
    guest.release()


def _fire(d: Deferred[Any], result: object) -> None:
    """Fire C{d}, unless it was cancelled before its turn came."""
    if not d.called:
        d.callback(result)


def _fail(d: Deferred[Any], error: Exception) -> None:
    if not d.called:
        d.errback(error)


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


def _remaining(call: IDelayedCall | None, now: float) -> float | None:
    if call is None or not call.active():
        return None
    return max(0.0, call.getTime() - now)
