"""
One result, told to everyone who asks for it.

A Deferred has one chain: a second caller that adds its callbacks to the first one's
Deferred gets whatever the first one's callbacks returned, and a failure the first one
handles never reaches the second.  Where several parts wait for the same outcome (a
process's exit, a stop sequence, the check for a VM a dead daemon left), each gets its own
Deferred from L{OneShot.observe}, and the outcome is kept for those who ask later.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class OneShot(Generic[T]):
    """
    An outcome that comes once, a result or a failure, and every observer's own Deferred
    for it.  Cancelling an observer's Deferred forgets that observer only.
    """

    def __init__(self) -> None:
        self._observers: list[Deferred[T]] = []
        #: The outcome, once it came (a tuple, since None is an outcome too).
        self._outcome: tuple[T | Failure] | None = None

    @property
    def done(self) -> bool:
        """Whether the outcome has come."""
        return self._outcome is not None

    def observe(self) -> Deferred[T]:
        """A new Deferred that fires with the outcome: now if it came, else when it comes."""
        observer: Deferred[T] = Deferred(self._forget)
        if self._outcome is not None:
            _tell(observer, self._outcome[0])
        else:
            self._observers.append(observer)
        return observer

    def fire(self, outcome: T | Failure) -> None:
        """
        Tell every observer, in the order they asked.  Returns None, so that as the last
        callback of a Deferred it consumes a failure every observer was told of.
        """
        if self._outcome is not None:
            raise RuntimeError("a one-shot outcome came twice")
        self._outcome = (outcome,)
        observers, self._observers = self._observers, []
        for observer in observers:
            _tell(observer, outcome)

    def _forget(self, observer: Deferred[T]) -> None:
        if observer in self._observers:
            self._observers.remove(observer)


def _tell(observer: Deferred[T], outcome: T | Failure) -> None:
    if isinstance(outcome, Failure):
        observer.errback(outcome)
    else:
        observer.callback(outcome)
