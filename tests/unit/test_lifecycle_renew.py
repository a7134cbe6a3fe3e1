"""
The lifecycle's renewal: a new image, keys, config or program never cuts a connection; the
daemon is told to retire at the first moment none is open, once.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from tests.fakes import FakeHypervisor
from tests.unit.test_lifecycle import FakeConnection, addresses, open_connection, results
from virby.daemon.lifecycle import Lifecycle, RenewOutcome, State, VMUnavailable
from virby.errors import VirbyError


class Retirement:
    """The daemon's side: counts the times it is told to retire, and what was open then."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.told: list[tuple[str, int]] = []

    def __call__(self) -> None:
        snapshot = self.lifecycle.snapshot()
        self.told.append(
            (snapshot.state, snapshot.active_connections + snapshot.waiting_connections)
        )


def make(
    onDemand: bool = True, ttl: float = 60
) -> tuple[Lifecycle, FakeHypervisor, Clock, Retirement]:
    clock = Clock()
    hypervisor = FakeHypervisor()
    lifecycle: Lifecycle = Lifecycle(clock, hypervisor, onDemand=onDemand, ttl=ttl)
    retirement = Retirement(lifecycle)
    lifecycle.retire = retirement
    return lifecycle, hypervisor, clock, retirement


def test_a_renewal_while_a_build_runs_waits_for_it_and_serves_new_ones_meanwhile() -> None:
    lifecycle, hypervisor, _, retirement = make()
    build, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    answer = results(lifecycle.renew())
    assert answer == [RenewOutcome(now=False, open=1)]
    assert lifecycle.snapshot().renewing
    late, served = open_connection(lifecycle)
    assert addresses(served) == [("192.168.64.2", 22)], "served by the VM that runs"
    assert len(hypervisor.vms) == 1
    lifecycle.connectionClosed(build)
    assert retirement.told == []
    lifecycle.connectionClosed(late)
    assert retirement.told == [("running", 0)]
    assert hypervisor.last.stopRequests == 0, "the daemon's shutdown stops it, not this"
    assert build.aborted is None and late.aborted is None


def test_an_idle_vm_retires_at_once_and_its_idle_clock_stops() -> None:
    lifecycle, hypervisor, clock, retirement = make(ttl=60)
    a, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    lifecycle.connectionClosed(a)
    assert lifecycle.snapshot().idle_stop_in == 60
    assert results(lifecycle.renew()) == [RenewOutcome(now=True, open=0)]
    assert retirement.told == [("running", 0)]
    assert lifecycle.snapshot().idle_stop_in is None
    clock.advance(120)
    assert hypervisor.last.stopRequests == 0


def test_with_no_vm_the_daemon_retires_at_once() -> None:
    lifecycle, _, _, retirement = make()
    lifecycle.start()
    assert results(lifecycle.renew()) == [RenewOutcome(now=True, open=0)]
    assert retirement.told == [("stopped", 0)]


def test_a_boot_under_way_is_finished_and_its_connection_served_first() -> None:
    lifecycle, hypervisor, _, retirement = make()
    waiting, served = open_connection(lifecycle)
    assert results(lifecycle.renew()) == [RenewOutcome(now=False, open=1)]
    hypervisor.becomeReady()
    assert addresses(served) == [("192.168.64.2", 22)] and retirement.told == []
    lifecycle.connectionClosed(waiting)
    assert retirement.told == [("running", 0)]


def test_a_boot_only_virby_start_waited_for_retires_once_answered() -> None:
    lifecycle, hypervisor, _, retirement = make()
    started = results(lifecycle.startNow())
    assert results(lifecycle.renew()) == [RenewOutcome(now=False, open=1)]
    hypervisor.becomeReady()
    assert len(started) == 1 and started[0].booted
    assert retirement.told == [("running", 0)]


def test_a_stop_under_way_is_finished_first() -> None:
    lifecycle, hypervisor, clock, retirement = make(ttl=10)
    a, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    lifecycle.connectionClosed(a)
    clock.advance(10)
    assert lifecycle.state is State.STOPPING
    assert results(lifecycle.renew()) == [RenewOutcome(now=False, open=0)]
    assert retirement.told == []
    hypervisor.last.die("exited with status 0")
    assert retirement.told == [("stopped", 0)]


def test_a_connection_that_came_during_the_stop_boots_and_is_served_first() -> None:
    lifecycle, hypervisor, clock, retirement = make(ttl=10)
    a, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    lifecycle.connectionClosed(a)
    clock.advance(10)
    lifecycle.renew()
    b, served = open_connection(lifecycle)
    hypervisor.vms[0].die("exited with status 0")
    assert retirement.told == [] and lifecycle.state is State.BOOTING
    hypervisor.becomeReady(host="192.168.64.3")
    assert addresses(served) == [("192.168.64.3", 22)]
    lifecycle.connectionClosed(b)
    assert retirement.told == [("running", 0)]


def test_an_always_on_restart_pending_is_cancelled_by_the_retirement() -> None:
    lifecycle, hypervisor, clock, retirement = make(onDemand=False)
    lifecycle.start()
    hypervisor.becomeReady()
    hypervisor.last.die("crashed")
    assert lifecycle.snapshot().restart_in is not None
    lifecycle.renew()
    assert retirement.told == [("stopped", 0)]
    assert lifecycle.snapshot().restart_in is None
    clock.advance(120)
    assert len(hypervisor.vms) == 1, "no boot after the daemon was told to retire"


def test_the_retirement_is_told_once_however_often_renewal_is_asked() -> None:
    lifecycle, hypervisor, _, retirement = make()
    a, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    lifecycle.renew()
    lifecycle.renew()
    lifecycle.connectionClosed(a)
    lifecycle.renew()
    assert retirement.told == [("running", 0)]


def test_a_vm_that_dies_while_renewing_cuts_only_what_it_would_have_cut() -> None:
    """A crash still closes its connections; then nothing is open, and the daemon retires."""
    lifecycle, hypervisor, _, retirement = make()
    build, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    lifecycle.renew()
    hypervisor.last.die("crashed")
    assert build.aborted is not None
    assert retirement.told == []
    lifecycle.connectionClosed(build)
    assert retirement.told == [("stopped", 0)]


def test_without_a_way_to_retire_the_renewal_is_refused() -> None:
    lifecycle, _, _, _ = make()
    lifecycle.retire = None
    got = results(lifecycle.renew())
    assert got[0].check(VirbyError) and "restart it by hand" in str(got[0].value)
    assert not lifecycle.snapshot().renewing


def test_a_renewal_during_shutdown_is_refused() -> None:
    lifecycle, _, _, retirement = make()
    lifecycle.shutdown()
    got = results(lifecycle.renew())
    assert got[0].check(VMUnavailable)
    assert retirement.told == []


def test_a_connection_closed_in_a_state_with_no_vm_counts_down_too() -> None:
    """A connection the VM's crash aborted closes while stopped: the last one retires."""
    lifecycle, hypervisor, _, retirement = make()
    first, _ = open_connection(lifecycle)
    second, _ = open_connection(lifecycle)
    hypervisor.becomeReady()
    lifecycle.renew()
    hypervisor.last.die("crashed")
    lifecycle.connectionClosed(first)
    assert retirement.told == []
    lifecycle.connectionClosed(second)
    assert retirement.told == [("stopped", 0)]
    assert isinstance(second, FakeConnection)
