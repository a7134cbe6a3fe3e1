"""What Virby asks of a reactor is what the reactors it runs on and is tested with provide."""

from __future__ import annotations

import pytest
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactorClock

from virby.reactors import (
    IHostReactor,
    IListenReactor,
    IMachineReactor,
    IProbeReactor,
    IRelayReactor,
    IRestReactor,
    ISpliceReactor,
    IVMReactor,
    hostReactor,
    twistedParts,
)

EVERY_COMPOSITION = [
    IRelayReactor,
    IProbeReactor,
    ISpliceReactor,
    IRestReactor,
    IVMReactor,
    IMachineReactor,
    IListenReactor,
    IHostReactor,
]


def test_the_global_reactor_is_a_host_reactor() -> None:
    from twisted.internet import reactor

    assert hostReactor(reactor) is reactor


def test_the_select_reactor_of_macos_is_a_host_reactor() -> None:
    """Twisted's default reactor on macOS: the daemon runs on it there."""
    selecting = SelectReactor()
    assert hostReactor(selecting) is selecting


@pytest.mark.parametrize("composition", EVERY_COMPOSITION, ids=lambda c: c.getName())
def test_every_composition_is_made_of_twisteds_own_interfaces(composition) -> None:
    parts = twistedParts(composition)
    assert parts, "a composition with no part of Twisted's asks nothing of a reactor"
    assert set(parts) <= set(twistedParts(IHostReactor)), "the host reactor has every part"


@pytest.mark.parametrize(
    "composition",
    [IRelayReactor, IProbeReactor, ISpliceReactor, IRestReactor, IListenReactor],
    ids=lambda c: c.getName(),
)
def test_the_memory_reactor_provides_what_the_memory_tests_drive(composition) -> None:
    memory = MemoryReactorClock()
    assert [i for i in twistedParts(composition) if not i.providedBy(memory)] == []


def test_a_reactor_that_lacks_a_part_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match="IReactorProcess"):
        hostReactor(MemoryReactorClock())
    assert not IReactorProcess.providedBy(MemoryReactorClock())
