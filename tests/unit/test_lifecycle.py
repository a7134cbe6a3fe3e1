"""The lifecycle state machine, on a fake hypervisor and a task.Clock."""

from __future__ import annotations

import gc
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from tests.fakes import FakeGuest, FakeHypervisor, FakeVM, logObserver
from virby.daemon import lifecycle as lifecycle_module
from virby.daemon.lifecycle import (
    RULES,
    BootPhase,
    Event,
    IllegalTransition,
    Lifecycle,
    Payload,
    Ready,
    StartOutcome,
    State,
    StopOutcome,
    VMBusy,
    VMUnavailable,
    diagram,
    on,
    table,
)
from virby.errors import PermanentError, VirbyError

ROOT = Path(__file__).resolve().parents[2]


def addresses(box: list) -> list:
    return [getattr(item, "address", item) for item in box]


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


def failuresLogged(action: Callable[[], object]) -> list[Failure]:
    """What C{action} logged as failures, errors left unhandled in a Deferred included."""
    with capturedLogs() as events:
        action()
        gc.collect()
    return [event["log_failure"] for event in events if "log_failure" in event]


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
    assert "killed by signal 9" in (lifecycle.snapshot().last_error or "")
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
    assert "no DHCP lease" in (lifecycle.snapshot().last_error or "")


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


# -- a boot, as it happens


def test_each_boot_phase_is_shown_and_logged_with_its_time() -> None:
    lifecycle, hypervisor, clock = make()
    with capturedLogs() as events:
        open_connection(lifecycle)
        snap = lifecycle.snapshot()
        assert (snap.state, snap.boot_phase, snap.boot_elapsed) == ("booting", "preparing", 0)
        assert snap.boot_waiting_for == BootPhase.PREPARING.waitingFor
        clock.advance(2)
        report = hypervisor.reports[-1]  # the wait's: spawns here are at once
        report(BootPhase.SSHD, "the guest leased 192.168.64.2")
        clock.advance(1.5)
        snap = lifecycle.snapshot()
        assert (snap.boot_phase, snap.boot_last_step) == ("sshd", "the guest leased 192.168.64.2")
        assert snap.boot_waiting_for == "waiting for the guest's sshd to answer"
        assert snap.boot_elapsed == 3.5
        hypervisor.becomeReady()
    said = [formatEvent(e) for e in events if e["log_level"] == LogLevel.info]
    assert "boot: the guest leased 192.168.64.2; waiting for the guest's sshd to answer (2.0s)" in (
        said
    )
    assert "VM ready at 192.168.64.2:22 after 3.5s" in said
    snap = lifecycle.snapshot()
    assert (snap.boot_phase, snap.boot_elapsed, snap.boot_waiting_for) == (None, None, None)


def test_a_report_from_a_boot_given_up_changes_nothing() -> None:
    lifecycle, hypervisor, _ = make()
    open_connection(lifecycle)
    stale = hypervisor.reports[-1]
    hypervisor.last.die()
    assert lifecycle.state is State.STOPPED
    failures = failuresLogged(lambda: stale(BootPhase.SSHD, "the guest leased 192.168.64.9"))
    assert failures == [] and lifecycle.snapshot().boot_phase is None
    open_connection(lifecycle)
    stale(BootPhase.SSHD, "the guest leased 192.168.64.9")
    assert lifecycle.snapshot().boot_phase == "preparing", "nor the next boot's"


def test_a_failed_boot_says_the_phase_it_stopped_in() -> None:
    lifecycle, hypervisor, clock = make()
    open_connection(lifecycle)
    hypervisor.reports[-1](BootPhase.SSHD, "the guest leased 192.168.64.2")
    clock.advance(180)
    with capturedLogs() as events:
        hypervisor.ready[hypervisor.last.pid].errback(VirbyError("sshd did not answer"))
    said = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
    assert said[:2] == [
        "boot failed: sshd did not answer",
        "the boot stopped in phase sshd (waiting for the guest's sshd to answer) after 180.0s",
    ]


def test_the_last_boots_are_counted_with_their_median() -> None:
    lifecycle, hypervisor, clock = make()
    assert (lifecycle.snapshot().recent_boots, lifecycle.snapshot().recent_boot_median_seconds) == (
        0,
        None,
    )
    for seconds in [10, 30, 20] + [5] * lifecycle_module.RECENT_BOOTS:
        open_connection(lifecycle)
        clock.advance(seconds)
        hypervisor.becomeReady()
        snap = lifecycle.snapshot()
        if snap.recent_boots == 3:
            assert (snap.recent_boot_median_seconds, snap.last_boot_seconds) == (20, 20)
        results(lifecycle.stopNow(force=True))
        hypervisor.last.die("exited with status 0")
    snap = lifecycle.snapshot()
    assert snap.recent_boots == lifecycle_module.RECENT_BOOTS, "only the last few"
    assert snap.recent_boot_median_seconds == 5 and snap.last_boot_seconds == 5


def test_a_connection_waiting_for_the_boot_is_counted_once() -> None:
    lifecycle, hypervisor, _ = make()
    open_connection(lifecycle)
    results(lifecycle.startNow())  # a person waits too, but is no connection
    snap = lifecycle.snapshot()
    assert (snap.active_connections, snap.waiting_connections) == (0, 1)
    hypervisor.becomeReady()
    snap = lifecycle.snapshot()
    assert (snap.active_connections, snap.waiting_connections) == (1, 0)


# -- the table, the diagram and the docs


def _accepts(annotation: object, cls: type) -> bool:
    return annotation is cls or cls in typing.get_args(annotation)


def test_every_event_has_a_row_a_payload_and_handlers_that_take_both() -> None:
    """
    The table holds the handlers themselves: each takes the machine, its column's state
    data and its row's payload (mypy checks the same through C{row} and C{on}).
    """
    assert set(RULES) == set(Event)
    payloads = {cls.event: cls for cls in typing.get_args(Payload)}
    assert set(payloads) == set(Event), "one payload class per event"
    stateData = {cls.state: cls for cls in typing.get_args(lifecycle_module._Phase)}
    for event, row in RULES.items():
        assert len(row) == len(State)
        for state, cell in zip(State, row, strict=True):
            assert cell.legal or cell.handler is None
            if cell.handler is None:
                continue
            assert getattr(Lifecycle, cell.handler.__name__) is cell.handler, (event, state)
            hints = typing.get_type_hints(cell.handler, vars(lifecycle_module))
            phase, payload = [hints[name] for name in list(hints) if name != "return"]
            assert _accepts(payload, payloads[event]), (event, state, payload)
            assert _accepts(phase, stateData[state]) or phase == lifecycle_module._Phase, (
                event,
                state,
                phase,
            )


def test_the_docstring_shows_the_transitions_the_table_allows() -> None:
    generated = textwrap.indent(diagram(), "    ")
    assert generated in (lifecycle_module.__doc__ or ""), f"the diagram is now:\n{generated}"


@pytest.mark.repository
def test_the_docs_show_the_table_and_its_diagram() -> None:
    path = ROOT / "docs" / "lifecycle.md"
    text = path.read_text()
    assert table() in text, f"the table is now:\n{table()}"
    assert f"```\n{diagram()}\n```" in text, f"the diagram is now:\n{diagram()}"


@pytest.mark.repository
def test_the_design_overview_shows_the_diagram() -> None:
    path = ROOT / "docs" / "design.md"
    text = path.read_text()
    assert f"```\n{diagram()}\n```" in text, f"the diagram is now:\n{diagram()}"


def test_an_event_where_the_table_says_it_cannot_happen_fails_loudly_and_changes_nothing() -> None:
    lifecycle, hypervisor, _ = make()
    failures = failuresLogged(lambda: lifecycle._handle(Ready(FakeGuest()), owner=lifecycle._phase))
    assert len(failures) == 1 and failures[0].check(IllegalTransition)
    assert "ready cannot happen while stopped" in str(failures[0].value)
    assert lifecycle.state is State.STOPPED and hypervisor.vms == []


def test_a_handler_that_moves_off_its_cell_fails_loudly(monkeypatch) -> None:
    """A cell names where its handler may go: anywhere else is a bug, and no move happens."""
    lifecycle, hypervisor, _ = make(onDemand=False)
    start = dict(RULES)
    start[Event.START] = (on(Lifecycle._startAlwaysOn), *RULES[Event.START][1:])
    monkeypatch.setattr("virby.daemon.lifecycle.RULES", start)
    failures = failuresLogged(lifecycle.start)
    assert len(failures) == 1 and failures[0].check(IllegalTransition)
    assert str(failures[0].value) == "start may not move stopped -> booting"
    assert lifecycle.state is State.STOPPED
    assert [vm.stopRequests for vm in hypervisor.vms] == [1], "the VM made meanwhile is stopped"


# -- a failure no retry can cure


def test_a_permanent_failure_is_not_retried_in_always_on_mode_and_says_so_once() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False)
    hypervisor.spawnError = PermanentError("this Mac cannot share Rosetta: install it")
    with capturedLogs() as events:
        lifecycle.start()
        clock.advance(24 * 3600)
    assert hypervisor.spawns == 1 and lifecycle.state is State.STOPPED
    snap = lifecycle.snapshot()
    assert snap.restart_in is None
    assert snap.last_error == "boot failed: this Mac cannot share Rosetta: install it"
    said = [e["log_format"] for e in events if e["log_level"] >= LogLevel.warn]
    assert said == [
        "{message}",
        "the boot stopped in phase {phase} ({waitingFor}) after {seconds:.1f}s",
        "not booting the VM again until something changes: the next connection or "
        "`virby start` tries again",
    ]


def test_after_a_permanent_failure_a_connection_or_virby_start_tries_again() -> None:
    lifecycle, hypervisor, _ = make(onDemand=False)
    hypervisor.spawnError = PermanentError("refused")
    lifecycle.start()
    _, wait = open_connection(lifecycle)
    assert hypervisor.spawns == 2 and wait[0].check(VMUnavailable)
    started = results(lifecycle.startNow())
    assert hypervisor.spawns == 3 and started[0].check(VMUnavailable)
    hypervisor.spawnError = None
    started = results(lifecycle.startNow())
    hypervisor.becomeReady()
    assert started[0].booted and lifecycle.state is State.RUNNING


def test_a_permanent_failure_of_a_made_vm_stops_it_and_does_not_restart() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False)
    lifecycle.start()
    vm = hypervisor.last
    hypervisor.ready[vm.pid].errback(PermanentError("the guest asks for a lease by DUID"))
    assert vm.stopRequests == 1 and lifecycle.state is State.STOPPING
    vm.die("exited with status 0")
    clock.advance(3600)
    assert lifecycle.state is State.STOPPED and len(hypervisor.vms) == 1
    assert lifecycle.snapshot().restart_in is None


def test_other_failures_are_still_retried_with_backoff_in_always_on_mode() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False)
    hypervisor.spawnError = VirbyError("a VM of /var/lib/virby is still running")
    lifecycle.start()
    assert lifecycle.snapshot().restart_in == 1
    clock.advance(1)
    assert hypervisor.spawns == 2 and lifecycle.snapshot().restart_in == 2


def test_a_permanent_failure_on_demand_fails_the_waiters_and_the_next_connection_retries() -> None:
    lifecycle, hypervisor, _ = make()
    hypervisor.spawnError = PermanentError("refused")
    with capturedLogs() as events:
        _, wait = open_connection(lifecycle)
    assert wait[0].check(VMUnavailable) and str(wait[0].value) == "the VM did not boot: refused"
    assert not [e for e in events if "not booting the VM again" in e.get("log_format", "")]
    open_connection(lifecycle)
    assert hypervisor.spawns == 2


# -- waiters are told after the step; what their callbacks ask comes next


def test_a_stop_answer_that_starts_the_vm_again_boots_one_vm() -> None:
    lifecycle, hypervisor, _ = make()
    lifecycle.startNow()
    hypervisor.becomeReady()
    seen: list = []
    stopped = lifecycle.stopNow()
    stopped.addCallback(lambda _: seen.append(lifecycle.state))
    stopped.addCallback(lambda _: lifecycle.startNow())
    assert failuresLogged(lambda: hypervisor.last.die("exited with status 0")) == []
    assert seen == [State.STOPPED], "the stop is answered while the VM is stopped"
    assert lifecycle.state is State.BOOTING and len(hypervisor.vms) == 2
    hypervisor.becomeReady()
    assert lifecycle.state is State.RUNNING and len(hypervisor.alive()) == 1


def test_a_waiter_that_cancels_another_does_not_break_the_boot() -> None:
    lifecycle, hypervisor, _ = make(ttl=30)
    first, second = lifecycle.whenReady(), lifecycle.whenReady()
    second.addErrback(lambda f: f.trap(CancelledError))
    first.addCallback(lambda _: second.cancel())
    guest = FakeGuest()
    assert failuresLogged(lambda: hypervisor.ready[hypervisor.last.pid].callback(guest)) == []
    assert guest.released and lifecycle.snapshot().idle_stop_in == 30


def test_a_waiter_sees_the_state_its_step_decided() -> None:
    lifecycle, hypervisor, _ = make(ttl=30)
    seen: list = []
    lifecycle.whenReady().addCallback(lambda _: seen.append(lifecycle.snapshot()))
    hypervisor.becomeReady()
    assert seen[0].state == "running" and seen[0].idle_stop_in == 30
    assert seen[0].waiting_connections == 0


def test_a_waiter_that_opens_a_connection_stops_the_idle_clock() -> None:
    lifecycle, hypervisor, _ = make(ttl=30)
    opened: list = []
    lifecycle.whenReady().addCallback(lambda _: opened.append(open_connection(lifecycle)))
    hypervisor.becomeReady()
    assert opened and lifecycle.snapshot().idle_stop_in is None
    assert lifecycle.snapshot().active_connections == 1


def test_a_waiter_that_closes_the_last_connection_starts_the_idle_clock() -> None:
    lifecycle, hypervisor, _ = make(ttl=30)
    connection, wait = open_connection(lifecycle)
    lifecycle.whenReady().addCallback(lambda _: lifecycle.connectionClosed(connection))
    hypervisor.becomeReady()
    assert wait and lifecycle.snapshot().active_connections == 0
    assert lifecycle.snapshot().idle_stop_in == 30


def test_a_waiter_that_stops_the_vm_by_force_is_served_first_then_the_vm_stops() -> None:
    lifecycle, hypervisor, _ = make()
    a, first = open_connection(lifecycle)
    b, second = open_connection(lifecycle)
    stops: list = []
    lifecycle.whenReady().addCallback(lambda _: stops.append(lifecycle.stopNow(force=True)))
    assert failuresLogged(hypervisor.becomeReady) == []
    assert addresses(first) == addresses(second) == [("192.168.64.2", 22)]
    assert a.aborted == b.aborted == "the VM was stopped (virby stop --force)"
    assert lifecycle.state is State.STOPPING and hypervisor.last.stopRequests == 1
    hypervisor.last.die("exited with status 0")
    assert results(stops[0]) == [StopOutcome(True, 2)]


def test_a_waiter_that_starts_the_vm_is_told_it_runs() -> None:
    lifecycle, hypervisor, _ = make()
    starts: list = []
    lifecycle.whenReady().addCallback(lambda _: starts.append(results(lifecycle.startNow())))
    hypervisor.becomeReady()
    assert starts == [[StartOutcome(False, ("192.168.64.2", 22), 0.0)]]
    assert len(hypervisor.vms) == 1


def test_a_waiter_that_shuts_the_daemon_down_stops_the_vm() -> None:
    lifecycle, hypervisor, _ = make()
    connection, _ = open_connection(lifecycle)
    done: list = []
    lifecycle.whenReady().addCallback(lambda _: done.append(results(lifecycle.shutdown())))
    hypervisor.becomeReady()
    assert lifecycle.state is State.SHUTDOWN and hypervisor.last.stopRequests == 1
    hypervisor.last.die("exited with status 0")
    assert done == [[None]] and connection.aborted == "the daemon is shutting down"


def test_a_waiter_told_the_boot_failed_that_waits_again_gets_the_next_boot() -> None:
    lifecycle, hypervisor, _ = make()
    again: list = []
    first = lifecycle.whenReady()
    first.addErrback(lambda f: again.append(results(lifecycle.whenReady())))
    hypervisor.spawnError = VirbyError("vfkit: not found")
    hypervisor.ready[hypervisor.last.pid].errback(VirbyError("timed out"))
    hypervisor.spawnError = None
    hypervisor.last.die("exited with status 0")
    assert again == [[]] and len(hypervisor.vms) == 2
    hypervisor.becomeReady()
    assert addresses(again[0]) == [("192.168.64.2", 22)]


def test_an_always_on_vm_stopped_on_request_while_a_crash_stops_it_stays_stopped() -> None:
    lifecycle, hypervisor, clock = make(onDemand=False)
    lifecycle.start()
    vm = hypervisor.last
    hypervisor.ready[vm.pid].errback(VirbyError("no DHCP lease"))
    assert lifecycle.state is State.STOPPING
    stopped = results(lifecycle.stopNow())
    vm.die("exited with status 0")
    assert stopped == [StopOutcome(True, 0)]
    clock.advance(3600)
    assert len(hypervisor.vms) == 1 and lifecycle.snapshot().restart_in is None


def test_the_machine_finishes_what_it_started_before_the_next_request() -> None:
    """
    A start and then a stop asked by callbacks: the VM the start makes at once is known
    before the stop is handled, so the stop stops it and is answered once it has stopped.
    """
    lifecycle, hypervisor, _ = make()
    lifecycle.startNow()
    hypervisor.becomeReady()
    first = lifecycle.stopNow()
    asked: list = []

    def startThenStop(_: object) -> None:
        asked.extend([results(lifecycle.startNow()), results(lifecycle.stopNow())])

    first.addCallback(startThenStop)
    hypervisor.last.die("exited with status 0")
    started, stopped = asked
    assert started[0].check(VMUnavailable) and stopped == []
    assert lifecycle.state is State.STOPPING and lifecycle.snapshot().vfkit_pid == 1001
    hypervisor.last.die("exited with status 0")
    assert stopped == [StopOutcome(True, 0)] and lifecycle.state is State.STOPPED


# -- answers that come after their state was left


def test_a_vm_made_for_a_boot_given_up_is_stopped_not_adopted() -> None:
    """A hypervisor that cannot take back a VM it is making hands it over anyway."""
    lifecycle, hypervisor, _ = make()
    hypervisor.slowSpawn = True
    stray = FakeVM(pid=999)
    hypervisor.onCancelSpawn = stray
    lifecycle.startNow().addErrback(lambda f: f.trap(VMUnavailable))
    stopped = results(lifecycle.stopNow())
    assert stopped == [StopOutcome(True, 0)] and lifecycle.state is State.STOPPED
    assert stray.stopRequests == 1 and lifecycle.snapshot().vfkit_pid is None


def test_a_guest_that_answers_after_its_boot_was_given_up_is_released() -> None:
    lifecycle, hypervisor, _ = make()
    guest = FakeGuest()
    hypervisor.readyOnCancel = guest
    lifecycle.startNow().addErrback(lambda f: f.trap(VMUnavailable))
    lifecycle.stopNow()
    assert guest.released and lifecycle.state is State.STOPPING


#: What a callback may ask for while the machine tells it something.
ACTIONS = st.sampled_from(
    ["connect", "disconnect", "startNow", "stopNow", "forceStop", "shutdown", "cancel"]
)


class LifecycleRaces(RuleBasedStateMachine):
    """
    Any interleaving of connections, readiness, deaths, failed boots, idle time,
    C{virby start} and C{virby stop} (forced or not), renewals and shutdown keeps the promises
    users rely on: at most one VM alive, no stop while a connection is open unless the boot
    failed, the daemon stops or a stop was forced (which closes them), a renewal that
    retires the daemon only once and only when nothing is open, no waiter left
    behind by a settled machine, a start or stop answered only once the VM is running or
    stopped, no restart after a failure no retry can cure, and no rule broken.
    """

    def __init__(self) -> None:
        super().__init__()
        self.open: list[FakeConnection] = []
        self.waiting: list[Deferred] = []
        self.shutdown = False
        self.answeredIn: list[tuple[str, State]] = []
        self.failures: list[str] = []
        self.reentries = 0
        self.retiredWithOpen: list[int] = []
        globalLogPublisher.addObserver(logObserver(self._observe))

    @initialize()
    def begin(self) -> None:
        self.startIn(onDemand=True)

    def startIn(self, *, onDemand: bool) -> None:
        self.lifecycle, self.hypervisor, self.clock = make(onDemand=onDemand, ttl=10)
        self.lifecycle.retire = self._retire
        self.lifecycle.start()

    def _retire(self) -> None:
        """What the daemon does when told to retire: note what is open, and shut down."""
        snap = self.lifecycle.snapshot()
        self.retiredWithOpen.append(
            len(self.open) + snap.waiting_connections + snap.active_connections
        )
        self.reentries += 1  # a callback that asks for more: the shutdown's stop is its own
        self.shutdown = True
        self.lifecycle.shutdown()

    def _observe(self, event: dict) -> None:
        if "log_failure" in event:
            self.failures.append(event["log_failure"].getTraceback())

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(logObserver(self._observe))

    def stops(self) -> int:
        return sum(vm.stopRequests for vm in self.hypervisor.vms)

    def noted(self) -> tuple[int, int]:
        """The stops so far, and the callbacks so far that asked for more."""
        return self.stops(), self.reentries

    def stoppedNothing(self, before: tuple[int, int]) -> bool:
        """No stop since C{before}, or one that a callback's own request may explain."""
        return self.stops() == before[0] or self.reentries != before[1]

    # -- what a callback may do while it is told something

    def _then(self, action: str | None) -> Callable[[object], object]:
        def act(result: object) -> object:
            self.reentries += action is not None
            if action == "connect":
                self._connect(None)
            elif action == "disconnect" and self.open:
                self.lifecycle.connectionClosed(self.open.pop())
            elif action == "startNow":
                self._startNow(None)
            elif action in ("stopNow", "forceStop"):
                answer = self._answer(lambda: self.lifecycle.stopNow(action == "forceStop"), "stop")
                answer.addErrback(lambda f: f.trap(VMBusy, VMUnavailable))
            elif action == "shutdown":
                self.shutdown = True
                self.lifecycle.shutdown()
            elif action == "cancel":
                for waiting in self.waiting:
                    if not waiting.called:
                        waiting.cancel()
                        break
            return result

        return act

    def _connect(self, then: str | None) -> None:
        connection = FakeConnection()
        box: list[typing.Any] = []
        self.lifecycle.connectionOpened(connection)
        waiting = self.lifecycle.whenReady()
        waiting.addBoth(self._then(then))
        waiting.addBoth(box.append)
        self.open.append(connection)
        self.waiting.append(waiting)

    def _startNow(self, then: str | None) -> None:
        answer = self._answer(self.lifecycle.startNow, "start")
        answer.addBoth(self._then(then))
        answer.addErrback(lambda f: f.trap(VMUnavailable, CancelledError))
        self.waiting.append(answer)

    def _answered(self, outcome: object, command: str) -> object:
        self.answeredIn.append((command, self.lifecycle.state))
        return outcome

    def _answer(self, ask: Callable[[], Deferred], command: str) -> Deferred:
        """
        Ask, and note the state each answer comes in.  An answer given before the call
        returned is noted with the state then, unless a callback asked for more meanwhile
        (the answer came before that was handled, at a moment the test cannot see).
        """
        before = self.reentries
        answer = ask()
        if not answer.called or self.reentries == before:
            answer.addCallback(self._answered, command)
        return answer

    def _ready(self, then: str | None) -> None:
        before = self.noted()
        for waiting in self.waiting[-1:]:
            waiting.addBoth(self._then(then))
        for pid, d in list(self.hypervisor.ready.items()):
            vm = next(v for v in self.hypervisor.vms if v.pid == pid)
            if not d.called and vm.alive:
                d.callback(FakeGuest())
        assert self.stoppedNothing(before)

    def _bootFails(self, error: Exception) -> None:
        for d in list(self.hypervisor.ready.values()):
            if not d.called:
                self.hypervisor.permanentFailure = isinstance(error, PermanentError)
                d.errback(error)

    def _stopNow(self, force: bool, then: str | None) -> None:
        before = self.noted()
        open_, shutdown = list(self.open), self.shutdown
        answer = self._answer(lambda: self.lifecycle.stopNow(force), "stop")
        answer.addBoth(self._then(then))
        got = results(answer)
        if shutdown:
            assert got and got[0].check(VMUnavailable)
        elif open_ and not force:
            assert got and got[0].check(VMBusy)
            assert self.stoppedNothing(before), "a refused stop stops nothing"
        elif force:
            assert all(connection.aborted for connection in open_), "forced: all closed"
            for connection in open_:  # their transports go away
                if connection in self.open:
                    self.open.remove(connection)
                    self.lifecycle.connectionClosed(connection)

    # -- rules

    @rule()
    def connect(self) -> None:
        before = self.noted()
        self._connect(None)
        assert self.stoppedNothing(before)

    @precondition(lambda self: self.open)
    @rule(index=st.integers(min_value=0))
    def disconnect(self, index: int) -> None:
        before = self.noted()
        connection = self.open.pop(index % len(self.open))
        self.lifecycle.connectionClosed(connection)
        assert self.stoppedNothing(before), "the idle clock, not a close, stops the VM"

    @rule()
    def ready(self) -> None:
        self._ready(None)

    @rule()
    def bootTimesOut(self) -> None:
        self._bootFails(VirbyError("timed out"))

    @rule()
    def vmDies(self) -> None:
        before = self.noted()
        if self.lifecycle.state in (State.BOOTING, State.RUNNING) and self.hypervisor.alive():
            self.hypervisor.permanentFailure = False  # a crash: always-on comes back
        for vm in self.hypervisor.alive():
            vm.die()
        assert self.stoppedNothing(before)

    @rule(seconds=st.sampled_from([1, 5, 10, 60]))
    def time(self, seconds: int) -> None:
        before = self.noted()
        self.clock.advance(seconds)
        if not self.stoppedNothing(before):
            assert not self.open, "idle stop while a connection was open"

    @rule()
    def startNow(self) -> None:
        before = self.noted()
        self._startNow(None)
        assert self.stoppedNothing(before), "a start stops nothing"

    @rule(force=st.booleans())
    def stopNow(self, force: bool) -> None:
        self._stopNow(force, None)

    @rule()
    def renew(self) -> None:
        before = self.noted()
        answer = results(self.lifecycle.renew())
        if self.shutdown and not self.retiredWithOpen:
            assert answer and answer[0].check(VMUnavailable)
        if self.open:
            assert self.stoppedNothing(before), "a renewal stopped a VM in use"

    @precondition(lambda self: not self.shutdown)
    @rule()
    def stop(self) -> None:
        self.shutdown = True
        self.lifecycle.shutdown()

    # -- invariants

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
    def retired_once_and_only_when_nothing_was_open(self) -> None:
        assert len(self.retiredWithOpen) <= 1
        assert all(count == 0 for count in self.retiredWithOpen)

    @invariant()
    def at_most_one_vm_alive(self) -> None:
        assert len(self.hypervisor.alive()) <= 1

    @invariant()
    def idle_clock_only_when_idle(self) -> None:
        snap = self.lifecycle.snapshot()
        if snap.idle_stop_in is not None:
            assert snap.state == "running" and snap.active_connections == 0
            assert snap.on_demand

    @invariant()
    def restarts_only_after_a_failure_a_retry_can_cure(self) -> None:
        snap = self.lifecycle.snapshot()
        if snap.restart_in is not None:
            assert snap.state == "stopped" and not snap.on_demand
            assert not self.hypervisor.permanentFailure, "restart pending after a permanent failure"

    @invariant()
    def no_waiter_left_behind(self) -> None:
        snap = self.lifecycle.snapshot()
        if snap.state in ("running", "stopped", "shutdown"):
            assert snap.waiting_connections == 0
            assert all(waiting.called for waiting in self.waiting), "a wait never answered"


class ReentrantLifecycleRaces(LifecycleRaces):
    """
    The same promises in either mode, when the callbacks the machine tells something ask
    for more at once (a connection, a close, a start, a stop, a shutdown, a cancelled wait),
    and when boots fail for good, fail at the spawn, or take a while to spawn.
    """

    @initialize(onDemand=st.booleans())
    def begin(self, onDemand: bool) -> None:
        self.startIn(onDemand=onDemand)

    @rule(then=ACTIONS)
    def connectAndAsk(self, then: str) -> None:
        self._connect(then)

    @rule(then=ACTIONS)
    def readyAndAsk(self, then: str) -> None:
        self._ready(then)

    @rule(then=ACTIONS)
    def startNowAndAsk(self, then: str) -> None:
        self._startNow(then)

    @rule(force=st.booleans(), then=ACTIONS)
    def stopNowAndAsk(self, force: bool, then: str) -> None:
        self._stopNow(force, then)

    @rule()
    def bootFailsForGood(self) -> None:
        self._bootFails(PermanentError("the guest asks for a lease by DUID"))

    @rule(permanent=st.booleans())
    def nextSpawnFails(self, permanent: bool) -> None:
        error = PermanentError("refused") if permanent else VirbyError("vfkit: busy")
        self.hypervisor.nextSpawnError = error

    @rule()
    def nextSpawnIsSlow(self) -> None:
        self.hypervisor.nextSpawnSlow = True

    @precondition(lambda self: self.hypervisor.spawning is not None)
    @rule()
    def spawnDone(self) -> None:
        self.hypervisor.finishSpawn()

    @precondition(lambda self: self.hypervisor.reports)
    @rule(which=st.integers(min_value=1, max_value=4), phase=st.sampled_from(BootPhase))
    def bootReports(self, which: int, phase: BootPhase) -> None:
        """A boot's phase reported, by this boot or by one long given up."""
        reports = self.hypervisor.reports
        reports[-min(which, len(reports))](phase, f"now {phase.value}")


RACES = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestLifecycleRaces = LifecycleRaces.TestCase
TestLifecycleRaces.settings = RACES
TestReentrantLifecycleRaces = ReentrantLifecycleRaces.TestCase
TestReentrantLifecycleRaces.settings = RACES
