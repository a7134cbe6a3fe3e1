"""The lifecycle state machine, on a fake hypervisor and a task.Clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from virby.errors import VirbyError
from virby.lifecycle import (
    IllegalTransition,
    Lifecycle,
    StartOutcome,
    State,
    StopOutcome,
    VMBusy,
    VMUnavailable,
)


@dataclass
class Status:
    text: str = "exited with status 0"

    def describe(self) -> str:
        return self.text


@dataclass
class FakeVM:
    pid: int
    ended: Deferred = field(default_factory=Deferred)
    stopRequests: int = 0
    _stops: list[Deferred] = field(default_factory=list)

    def consoleTail(self, n: int = 20) -> list[str]:
        return [f"console of {self.pid}"]

    def stop(self) -> Deferred:
        self.stopRequests += 1
        d: Deferred = Deferred()
        if self.ended.called:
            d.callback(Status())
        else:
            self._stops.append(d)
        return d

    def die(self, text: str = "exited with status 1") -> None:
        """The process ends; pending stops complete, as the real one's do."""
        self.ended.callback(Status(text))
        stops, self._stops = self._stops, []
        for d in stops:
            d.callback(Status(text))

    @property
    def alive(self) -> bool:
        return not self.ended.called


@dataclass
class FakeGuest:
    """What waitReady fires with: an address, and a spare connection until released."""

    host: str = "192.168.64.2"
    port: int = 22
    released: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def release(self) -> None:
        self.released = True


def addresses(box: list) -> list:
    return [getattr(item, "address", item) for item in box]


class FakeHypervisor:
    def __init__(self) -> None:
        self.vms: list[FakeVM] = []
        self.ready: dict[int, Deferred] = {}
        self.cancelledReady: list[int] = []
        self.spawnError: Exception | None = None
        self.slowSpawn = False
        self.spawning: Deferred | None = None
        self.cancelledSpawns = 0

    def spawn(self) -> Deferred:
        if self.spawnError is not None:
            return fail(self.spawnError)
        if self.slowSpawn:
            self.spawning = Deferred(lambda _: self._spawnCancelled())
            return self.spawning
        return succeed(self._newVM())

    def _newVM(self) -> FakeVM:
        vm = FakeVM(pid=1000 + len(self.vms))
        self.vms.append(vm)
        return vm

    def _spawnCancelled(self) -> None:
        self.cancelledSpawns += 1
        self.spawning = None

    def finishSpawn(self) -> FakeVM:
        """A slow spawn (e.g. ephemeral mode's fresh disk) is done: vfkit runs."""
        spawning, self.spawning = self.spawning, None
        assert spawning is not None
        vm = self._newVM()
        spawning.callback(vm)
        return vm

    def waitReady(self, vm: FakeVM) -> Deferred:
        d: Deferred = Deferred(lambda _: self.cancelledReady.append(vm.pid))
        self.ready[vm.pid] = d
        return d

    @property
    def last(self) -> FakeVM:
        return self.vms[-1]

    def becomeReady(self, vm: FakeVM | None = None, host: str = "192.168.64.2") -> None:
        vm = vm or self.last
        self.ready[vm.pid].callback(FakeGuest(host))

    def alive(self) -> list[FakeVM]:
        return [vm for vm in self.vms if vm.alive]


class FakeConnection:
    def __init__(self) -> None:
        self.aborted: str | None = None

    def abort(self, why: str) -> None:
        self.aborted = why


def make(onDemand: bool = True, ttl: float = 60) -> tuple[Lifecycle, FakeHypervisor, Clock]:
    clock = Clock()
    hypervisor = FakeHypervisor()
    return Lifecycle(clock, hypervisor, onDemand=onDemand, ttl=ttl), hypervisor, clock


def results(d: Deferred) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


def open_connection(lifecycle: Lifecycle) -> tuple[FakeConnection, list]:
    """What the proxy does for each accepted connection."""
    connection = FakeConnection()
    lifecycle.connectionOpened(connection)
    return connection, results(lifecycle.whenReady())


def test_on_demand_boots_at_the_first_connection_only() -> None:
    lifecycle, hypervisor, _ = make()
    lifecycle.start()
    assert lifecycle.state is State.STOPPED and hypervisor.vms == []
    _, _first = open_connection(lifecycle)
    assert lifecycle.state is State.BOOTING
    assert len(hypervisor.vms) == 1


def test_one_boot_serves_every_connection_that_arrives_while_it_runs() -> None:
    lifecycle, hypervisor, _ = make()
    waits = [open_connection(lifecycle)[1] for _ in range(50)]
    assert len(hypervisor.vms) == 1
    assert all(w == [] for w in waits)
    hypervisor.becomeReady()
    assert all(addresses(w) == [("192.168.64.2", 22)] for w in waits)
    assert lifecycle.state is State.RUNNING
    _, late = open_connection(lifecycle)
    assert addresses(late) == [("192.168.64.2", 22)]
    assert len(hypervisor.vms) == 1


def test_the_probes_connection_is_released_after_every_waiter_had_its_turn() -> None:
    """The first waiter may claim the probe's open connection; what is left is closed."""
    lifecycle, hypervisor, _ = make()
    seen: list = []
    for _ in range(3):
        _, _box = open_connection(lifecycle)
    waiters = [lifecycle.whenReady() for _ in range(2)]
    for waiter in waiters:
        waiter.addCallback(lambda guest: seen.append(guest.released))
    guest = FakeGuest()
    hypervisor.ready[hypervisor.last.pid].callback(guest)
    assert seen == [False, False], "released only after the waiters ran"
    assert guest.released
    late = results(lifecycle.whenReady())
    assert late == [guest]


def test_always_on_boots_at_start() -> None:
    lifecycle, hypervisor, _ = make(onDemand=False)
    lifecycle.start()
    assert lifecycle.state is State.BOOTING and len(hypervisor.vms) == 1


def test_idle_clock_runs_only_while_no_connection_is_open() -> None:
    lifecycle, hypervisor, clock = make(ttl=60)
    a, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    clock.advance(600)
    assert hypervisor.last.stopRequests == 0, "an open connection keeps the VM"
    b, _ = open_connection(lifecycle)
    lifecycle.connectionClosed(a)
    clock.advance(600)
    assert hypervisor.last.stopRequests == 0, "one connection still open"
    lifecycle.connectionClosed(b)
    assert lifecycle.snapshot().idle_stop_in == 60
    clock.advance(59)
    c, _ = open_connection(lifecycle)
    assert lifecycle.snapshot().idle_stop_in is None
    clock.advance(30)
    lifecycle.connectionClosed(c)
    clock.advance(59)
    assert hypervisor.last.stopRequests == 0, "the clock restarts from the last close"
    clock.advance(1)
    assert hypervisor.last.stopRequests == 1
    assert lifecycle.state is State.STOPPING
    hypervisor.last.die("exited with status 0")
    assert lifecycle.state is State.STOPPED
    assert lifecycle.snapshot().last_error is None


def test_always_on_never_stops_for_idleness() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False, ttl=5)
    lifecycle.start()
    hypervisor.becomeReady()
    clock.advance(10_000)
    assert hypervisor.last.stopRequests == 0 and lifecycle.state is State.RUNNING


def test_a_connection_during_the_idle_stop_waits_then_boots_again() -> None:
    lifecycle, hypervisor, clock = make(ttl=10)
    a, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    lifecycle.connectionClosed(a)
    clock.advance(10)
    assert lifecycle.state is State.STOPPING
    first = hypervisor.last
    b, wait = open_connection(lifecycle)
    assert wait == [] and len(hypervisor.vms) == 1, "no second VM while the first stops"
    first.die("exited with status 0")
    assert lifecycle.state is State.BOOTING and len(hypervisor.vms) == 2
    assert hypervisor.alive() == [hypervisor.last]
    hypervisor.becomeReady(host="192.168.64.3")
    assert addresses(wait) == [("192.168.64.3", 22)]
    assert b.aborted is None


def test_vm_death_while_running_closes_its_connections_and_the_next_one_boots() -> None:
    lifecycle, hypervisor, _ = make()
    a, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    hypervisor.last.die("killed by signal 9")
    assert a.aborted is not None and "killed by signal 9" in a.aborted
    assert lifecycle.state is State.STOPPED
    assert "killed by signal 9" in lifecycle.snapshot().last_error
    lifecycle.connectionClosed(a)
    _, wait = open_connection(lifecycle)
    assert len(hypervisor.vms) == 2
    hypervisor.becomeReady()
    assert addresses(wait) == [("192.168.64.2", 22)]


def test_vm_death_while_booting_fails_the_waiters_and_stops_waiting() -> None:
    lifecycle, hypervisor, _ = make()
    _, wait = open_connection(lifecycle)
    vm = hypervisor.last
    vm.die()
    assert hypervisor.cancelledReady == [vm.pid]
    assert len(wait) == 1 and wait[0].check(VMUnavailable)
    assert "while booting" in str(wait[0].value)
    assert lifecycle.state is State.STOPPED


def test_boot_timeout_stops_the_vm_fails_waiters_and_the_next_connection_retries() -> None:
    lifecycle, hypervisor, _ = make()
    _, wait = open_connection(lifecycle)
    vm = hypervisor.last
    hypervisor.ready[vm.pid].errback(VirbyError("no DHCP lease for 02:00:00:00:00:01"))
    assert wait[0].check(VMUnavailable)
    assert "no DHCP lease" in str(wait[0].value)
    assert vm.stopRequests == 1 and lifecycle.state is State.STOPPING
    _, during = open_connection(lifecycle)
    vm.die("exited with status 0")
    assert len(hypervisor.vms) == 2, "the connection that waited during the stop boots again"
    hypervisor.becomeReady()
    assert addresses(during) == [("192.168.64.2", 22)]
    assert "no DHCP lease" in lifecycle.snapshot().last_error


def test_spawn_failure_fails_waiters_and_keeps_serving() -> None:
    lifecycle, hypervisor, _ = make()
    hypervisor.spawnError = VirbyError("vfkit: 'vfkit' was not found on PATH")
    _, wait = open_connection(lifecycle)
    assert wait[0].check(VMUnavailable) and "not found" in str(wait[0].value)
    assert lifecycle.state is State.STOPPED
    hypervisor.spawnError = None
    _, again = open_connection(lifecycle)
    assert lifecycle.state is State.BOOTING and again == []


def test_always_on_restarts_after_a_crash_with_capped_backoff() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False)
    lifecycle.start()
    delays = []
    for _ in range(9):
        hypervisor.becomeReady()
        hypervisor.last.die("exited with status 1")
        count = len(hypervisor.vms)
        waited = 0
        while len(hypervisor.vms) == count:
            clock.advance(1)
            waited += 1
        delays.append(waited)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_resets_after_a_long_healthy_run() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False)
    lifecycle.start()
    for _ in range(3):
        hypervisor.becomeReady()
        hypervisor.last.die()
        clock.advance(60)
    hypervisor.becomeReady()
    clock.advance(3600)
    hypervisor.last.die()
    assert lifecycle.snapshot().restart_in == 1


def test_a_connection_during_backoff_boots_at_once() -> None:
    lifecycle, hypervisor, _ = make(onDemand=False)
    lifecycle.start()
    hypervisor.becomeReady()
    hypervisor.last.die()
    assert lifecycle.snapshot().restart_in == 1
    open_connection(lifecycle)
    assert len(hypervisor.vms) == 2
    assert lifecycle.snapshot().restart_in is None


def test_withdrawn_waiter_is_forgotten_and_the_idle_clock_starts_at_ready() -> None:
    lifecycle, hypervisor, clock = make(ttl=30)
    connection = FakeConnection()
    lifecycle.connectionOpened(connection)
    waiting = lifecycle.whenReady()
    waiting.addErrback(lambda f: f.trap(CancelledError))
    waiting.cancel()
    lifecycle.connectionClosed(connection)
    assert lifecycle.snapshot().waiting_connections == 0
    hypervisor.becomeReady()
    assert lifecycle.snapshot().idle_stop_in == 30
    clock.advance(30)
    assert hypervisor.last.stopRequests == 1


def test_shutdown_during_boot() -> None:
    lifecycle, hypervisor, _ = make()
    connection, wait = open_connection(lifecycle)
    vm = hypervisor.last
    done = results(lifecycle.shutdown())
    assert wait[0].check(VMUnavailable)
    assert hypervisor.cancelledReady == [vm.pid]
    assert vm.stopRequests == 1 and done == []
    vm.die("exited with status 0")
    assert done == [None]
    assert connection.aborted is not None
    assert lifecycle.state is State.SHUTDOWN
    refused = results(lifecycle.whenReady())
    assert refused[0].check(VMUnavailable)
    assert len(hypervisor.vms) == 1


def test_shutdown_while_running_stops_the_vm_then_closes_connections() -> None:
    lifecycle, hypervisor, _ = make(onDemand=False)
    lifecycle.start()
    hypervisor.becomeReady()
    connection, _ = open_connection(lifecycle)
    done = results(lifecycle.shutdown())
    assert hypervisor.last.stopRequests == 1 and connection.aborted is None
    hypervisor.last.die("exited with status 0")
    assert done == [None] and connection.aborted is not None
    assert lifecycle.snapshot().restart_in is None, "no restart after a shutdown"


def test_shutdown_during_an_idle_stop_waits_for_it() -> None:
    lifecycle, hypervisor, clock = make(ttl=1)
    a, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    lifecycle.connectionClosed(a)
    clock.advance(1)
    done = results(lifecycle.shutdown())
    assert done == []
    hypervisor.last.die("exited with status 0")
    assert done == [None]


def test_snapshot_while_running() -> None:
    lifecycle, hypervisor, clock = make(ttl=100)
    _a, _ = open_connection(lifecycle)
    clock.advance(7)
    hypervisor.becomeReady()
    clock.advance(3)
    snap = lifecycle.snapshot()
    assert snap.state == "running"
    assert (snap.vm_ip, snap.vm_port, snap.vfkit_pid) == ("192.168.64.2", 22, 1000)
    assert snap.uptime == 3 and snap.last_boot_seconds == 7
    assert snap.active_connections == 1 and snap.idle_stop_in is None


# -- virby start and virby stop


def test_start_now_boots_and_says_how_long_it_took() -> None:
    lifecycle, hypervisor, clock = make()
    started = results(lifecycle.startNow())
    assert lifecycle.state is State.BOOTING and started == []
    clock.advance(8)
    hypervisor.becomeReady()
    assert started == [StartOutcome(True, ("192.168.64.2", 22), 8.0)]


def test_start_now_while_running_is_a_no_op() -> None:
    lifecycle, hypervisor, _ = make()
    lifecycle.startNow()
    hypervisor.becomeReady()
    again = results(lifecycle.startNow())
    assert again == [StartOutcome(False, ("192.168.64.2", 22), 0.0)]
    assert len(hypervisor.vms) == 1


def test_start_now_shares_the_boot_a_connection_started() -> None:
    lifecycle, hypervisor, _ = make()
    _, wait = open_connection(lifecycle)
    started = results(lifecycle.startNow())
    hypervisor.becomeReady()
    assert len(hypervisor.vms) == 1 and wait and started[0].booted


def test_a_vm_warmed_up_by_start_now_still_stops_after_the_ttl() -> None:
    lifecycle, hypervisor, clock = make(ttl=60)
    lifecycle.startNow()
    hypervisor.becomeReady()
    assert lifecycle.snapshot().idle_stop_in == 60, "the idle clock runs: no connection"
    clock.advance(60)
    assert hypervisor.last.stopRequests == 1


def test_a_start_whose_client_left_withdraws_only_itself() -> None:
    lifecycle, hypervisor, _ = make()
    waiting = lifecycle.startNow()
    waiting.addErrback(lambda f: f.trap(CancelledError))
    waiting.cancel()
    assert lifecycle.state is State.BOOTING and lifecycle.snapshot().waiting_connections == 0
    hypervisor.becomeReady()
    assert lifecycle.state is State.RUNNING


def test_start_now_during_an_always_on_backoff_boots_at_once() -> None:
    lifecycle, hypervisor, _ = make(onDemand=False)
    lifecycle.start()
    hypervisor.becomeReady()
    hypervisor.last.die()
    assert lifecycle.snapshot().restart_in == 1
    lifecycle.startNow()
    assert len(hypervisor.vms) == 2 and lifecycle.snapshot().restart_in is None


def test_stop_now_is_refused_while_a_connection_is_open() -> None:
    lifecycle, hypervisor, _ = make()
    connection, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    refused = results(lifecycle.stopNow())
    assert refused[0].check(VMBusy)
    assert str(refused[0].value) == (
        "1 connection is open (a build may be running): `virby stop --force` closes them"
    )
    assert hypervisor.last.stopRequests == 0 and connection.aborted is None
    assert lifecycle.state is State.RUNNING


def test_stop_now_forced_closes_the_connections_and_answers_once_stopped() -> None:
    lifecycle, hypervisor, _ = make()
    a, _ = open_connection(lifecycle)
    b, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    stopped = results(lifecycle.stopNow(force=True))
    assert a.aborted == b.aborted == "the VM was stopped (virby stop --force)"
    assert hypervisor.last.stopRequests == 1 and stopped == []
    hypervisor.last.die("exited with status 0")
    assert stopped == [StopOutcome(True, 2)] and lifecycle.state is State.STOPPED
    assert lifecycle.snapshot().last_error is None, "a stop on request is no error"


def test_stop_now_of_an_idle_vm_stops_it_and_the_next_connection_boots() -> None:
    lifecycle, hypervisor, clock = make(ttl=600)
    lifecycle.startNow()
    hypervisor.becomeReady()
    stopped = results(lifecycle.stopNow())
    assert lifecycle.snapshot().idle_stop_in is None
    hypervisor.last.die("exited with status 0")
    assert stopped == [StopOutcome(True, 0)]
    clock.advance(600)
    assert len(hypervisor.vms) == 1
    open_connection(lifecycle)
    assert len(hypervisor.vms) == 2


def test_stop_now_when_stopped_is_a_no_op() -> None:
    lifecycle, _, _ = make()
    assert results(lifecycle.stopNow()) == [StopOutcome(False, 0)]


def test_an_always_on_vm_stopped_on_request_stays_stopped() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False)
    lifecycle.start()
    hypervisor.becomeReady()
    lifecycle.stopNow()
    hypervisor.last.die("exited with status 0")
    clock.advance(3600)
    assert lifecycle.state is State.STOPPED and len(hypervisor.vms) == 1
    assert lifecycle.snapshot().restart_in is None
    lifecycle.startNow()
    assert len(hypervisor.vms) == 2


def test_stop_now_cancels_an_always_on_restart_pending_after_a_crash() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False)
    lifecycle.start()
    hypervisor.becomeReady()
    hypervisor.last.die("killed by signal 9")
    assert lifecycle.snapshot().restart_in == 1
    assert results(lifecycle.stopNow()) == [StopOutcome(False, 0)]
    clock.advance(120)
    assert len(hypervisor.vms) == 1 and lifecycle.snapshot().restart_in is None


def test_stop_now_during_a_boot_gives_it_up_and_tells_who_waited() -> None:
    lifecycle, hypervisor, _ = make()
    started = results(lifecycle.startNow())
    vm = hypervisor.last
    stopped = results(lifecycle.stopNow())
    assert hypervisor.cancelledReady == [vm.pid] and vm.stopRequests == 1
    assert started[0].check(VMUnavailable)
    assert str(started[0].value) == "the VM was stopped (virby stop)"
    vm.die("exited with status 0")
    assert stopped == [StopOutcome(True, 0)] and lifecycle.state is State.STOPPED


def test_stop_now_while_the_vm_is_still_being_made_cancels_that() -> None:
    lifecycle, hypervisor, _ = make()
    hypervisor.slowSpawn = True
    started = results(lifecycle.startNow())
    stopped = results(lifecycle.stopNow())
    assert hypervisor.cancelledSpawns == 1 and hypervisor.vms == []
    assert stopped == [StopOutcome(True, 0)] and lifecycle.state is State.STOPPED
    assert started[0].check(VMUnavailable)
    hypervisor.slowSpawn = False
    open_connection(lifecycle)
    assert lifecycle.state is State.BOOTING and len(hypervisor.vms) == 1


def test_a_second_stop_waits_for_the_first() -> None:
    lifecycle, hypervisor, _ = make()
    lifecycle.startNow()
    hypervisor.becomeReady()
    first, second = results(lifecycle.stopNow()), results(lifecycle.stopNow())
    assert hypervisor.last.stopRequests == 1 and first == second == []
    hypervisor.last.die("exited with status 0")
    assert first == second == [StopOutcome(True, 0)]


def test_a_stop_whose_client_left_goes_on() -> None:
    lifecycle, hypervisor, _ = make()
    lifecycle.startNow()
    hypervisor.becomeReady()
    asking = lifecycle.stopNow()
    asking.addErrback(lambda f: f.trap(CancelledError))
    asking.cancel()
    hypervisor.last.die("exited with status 0")
    assert lifecycle.state is State.STOPPED


def test_shutdown_answers_a_pending_stop_and_refuses_the_next() -> None:
    lifecycle, hypervisor, _ = make()
    lifecycle.startNow()
    hypervisor.becomeReady()
    stopped = results(lifecycle.stopNow())
    lifecycle.shutdown()
    assert stopped[0].check(VMUnavailable)
    hypervisor.last.die("exited with status 0")
    late = results(lifecycle.stopNow())
    assert late[0].check(VMUnavailable) and results(lifecycle.startNow())[0].check(VMUnavailable)


def test_illegal_transitions_fail_loudly() -> None:
    lifecycle, _, _ = make()
    with pytest.raises(IllegalTransition):
        lifecycle._moveTo(State.RUNNING)


class LifecycleRaces(RuleBasedStateMachine):
    """
    Any interleaving of connections, readiness, deaths, idle time, C{virby start} and
    C{virby stop} (forced or not) and shutdown keeps the promises users rely on: at most one
    VM alive, no stop while a connection is open unless the boot failed, the daemon stops
    or a stop was forced (which closes them), no waiter left behind by a settled machine,
    and a start or stop answered only once the VM is running or stopped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lifecycle, self.hypervisor, self.clock = make(ttl=10)
        self.open: list[FakeConnection] = []
        self.shutdown = False
        self.answeredIn: list[tuple[str, State]] = []
        self.failures: list[str] = []
        globalLogPublisher.addObserver(self._observe)

    def _observe(self, event: dict) -> None:
        if "log_failure" in event:
            self.failures.append(event["log_failure"].getTraceback())

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self._observe)

    def stops(self) -> int:
        return sum(vm.stopRequests for vm in self.hypervisor.vms)

    @rule()
    def connect(self) -> None:
        before = self.stops()
        connection, _ = open_connection(self.lifecycle)
        self.open.append(connection)
        assert self.stops() == before

    @precondition(lambda self: self.open)
    @rule(index=st.integers(min_value=0))
    def disconnect(self, index: int) -> None:
        before = self.stops()
        connection = self.open.pop(index % len(self.open))
        self.lifecycle.connectionClosed(connection)
        assert self.stops() == before, "the idle clock, not a close, stops the VM"

    @rule()
    def ready(self) -> None:
        before = self.stops()
        for pid, d in self.hypervisor.ready.items():
            vm = next(v for v in self.hypervisor.vms if v.pid == pid)
            if not d.called and vm.alive:
                d.callback(FakeGuest())
        assert self.stops() == before

    @rule()
    def bootTimesOut(self) -> None:
        for d in self.hypervisor.ready.values():
            if not d.called:
                d.errback(VirbyError("timed out"))

    @rule()
    def vmDies(self) -> None:
        before = self.stops()
        for vm in self.hypervisor.alive():
            vm.die()
        assert self.stops() == before

    @rule(seconds=st.sampled_from([1, 5, 10, 60]))
    def time(self, seconds: int) -> None:
        before = self.stops()
        self.clock.advance(seconds)
        if self.stops() > before:
            assert not self.open, "idle stop while a connection was open"

    @rule()
    def startNow(self) -> None:
        before = self.stops()
        answer = self.lifecycle.startNow()
        answer.addCallback(self._answered, "start")
        answer.addErrback(lambda f: f.trap(VMUnavailable))
        assert self.stops() == before, "a start stops nothing"

    @rule(force=st.booleans())
    def stopNow(self, force: bool) -> None:
        before = self.stops()
        open_ = list(self.open)
        answer = results(self.lifecycle.stopNow(force).addCallback(self._answered, "stop"))
        if self.shutdown:
            assert answer and answer[0].check(VMUnavailable)
        elif open_ and not force:
            assert answer and answer[0].check(VMBusy)
            assert self.stops() == before, "a refused stop stops nothing"
        elif force:
            assert all(connection.aborted for connection in open_), "forced: all closed"
            for connection in open_:  # their transports go away
                self.lifecycle.connectionClosed(connection)
            self.open = []

    def _answered(self, outcome: object, command: str) -> object:
        self.answeredIn.append((command, self.lifecycle.state))
        return outcome

    @precondition(lambda self: not self.shutdown)
    @rule()
    def stop(self) -> None:
        self.shutdown = True
        self.lifecycle.shutdown()

    @invariant()
    def nothing_went_wrong_unseen(self) -> None:
        """A bug inside a callback (an illegal transition, say) is only logged: catch it."""
        assert self.failures == [], self.failures[0] if self.failures else ""

    @invariant()
    def answers_say_what_is_true(self) -> None:
        for command, state in self.answeredIn:
            expected = State.RUNNING if command == "start" else State.STOPPED
            assert state is expected, f"{command} answered while {state.value}"

    @invariant()
    def at_most_one_vm_alive(self) -> None:
        assert len(self.hypervisor.alive()) <= 1

    @invariant()
    def idle_clock_only_when_idle(self) -> None:
        snap = self.lifecycle.snapshot()
        if snap.idle_stop_in is not None:
            assert snap.state == "running" and snap.active_connections == 0

    @invariant()
    def no_waiter_left_behind(self) -> None:
        snap = self.lifecycle.snapshot()
        if snap.state in ("running", "stopped", "shutdown"):
            assert snap.waiting_connections == 0


TestLifecycleRaces = LifecycleRaces.TestCase
TestLifecycleRaces.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
