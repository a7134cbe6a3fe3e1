"""One outcome told to each waiter on its own Deferred."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from virby.daemon.observers import OneShot


def results(d: Deferred) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


def test_every_observer_gets_the_result_even_if_one_changes_its_own() -> None:
    outcome: OneShot[int] = OneShot()
    first = outcome.observe()
    first.addCallback(lambda n: n * 100)  # what one observer does is its own
    second = results(outcome.observe())
    assert not outcome.done
    outcome.fire(7)
    assert results(first) == [700] and second == [7]
    assert outcome.done


def test_an_observer_that_comes_late_gets_the_outcome_at_once() -> None:
    outcome: OneShot[None] = OneShot()
    outcome.fire(None)
    assert results(outcome.observe()) == [None]


def test_a_failure_reaches_every_observer_and_not_the_source() -> None:
    outcome: OneShot[int] = OneShot()
    source: Deferred[int] = Deferred()
    source.addBoth(outcome.fire)
    first, second = results(outcome.observe()), results(outcome.observe())
    source.errback(ValueError("no"))
    assert results(source) == [None], "the failure is the observers' to handle"
    for seen in (first, second, results(outcome.observe())):
        assert isinstance(seen[0], Failure) and seen[0].check(ValueError)


def test_a_cancelled_observer_is_forgotten_and_the_others_still_hear() -> None:
    outcome: OneShot[int] = OneShot()
    leaving = outcome.observe()
    staying = results(outcome.observe())
    leaving.cancel()
    assert isinstance(results(leaving)[0].value, CancelledError)
    outcome.fire(1)
    assert staying == [1]


def test_an_outcome_comes_once() -> None:
    outcome: OneShot[int] = OneShot()
    outcome.fire(1)
    with pytest.raises(RuntimeError):
        outcome.fire(2)
