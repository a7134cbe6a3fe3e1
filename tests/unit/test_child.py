"""
The bounded child (L{virby.daemon.child.runBounded}): the deadline kills it, a cancelled
result kills it, and only the tail of its output is kept.  On a clock and a fake process.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from tests.fakes import FakeReactor
from virby.daemon.child import Ended, runBounded


def results(d) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


def test_a_child_that_ends_gives_its_status_and_output() -> None:
    reactor = FakeReactor()
    got = results(runBounded(reactor, "/bin/ps", ["ps", "-p", "1"], timeout=5, env={"A": "b"}))
    ((protocol, executable, args, env, _path, fds),) = reactor.spawned
    assert (executable, args, env) == ("/bin/ps", ["ps", "-p", "1"], {"A": "b"})
    assert fds == {0: "w", 1: "r", 2: "r"} and protocol.transport.stdinClosed
    protocol.outReceived(b"launchd\n")
    protocol.processEnded(Failure(ProcessDone(0)))
    assert got == [Ended(code=0, signal=None, out=b"launchd\n", err=b"", timedOut=False)]
    assert reactor.getDelayedCalls() == [], "the deadline is cancelled"


def test_the_deadline_kills_the_child_and_says_so() -> None:
    reactor = FakeReactor()
    expired: list[bool] = []
    got = results(
        runBounded(reactor, "/bin/ps", ["ps"], timeout=10, onTimeout=lambda: expired.append(True))
    )
    protocol = reactor.spawned[0][0]
    reactor.advance(9.9)
    assert protocol.transport.signals == [] and got == [] and expired == []
    reactor.advance(0.1)
    assert protocol.transport.signals == ["KILL"] and expired == [True]
    assert got == [], "the result waits until the child is really gone"
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    (ended,) = got
    assert ended.timedOut and ended.signal == 9 and ended.code is None


def test_a_cancelled_result_kills_the_child() -> None:
    reactor = FakeReactor()
    d = runBounded(reactor, "/bin/ps", ["ps"], timeout=10)
    got = results(d)
    protocol = reactor.spawned[0][0]
    d.cancel()
    assert protocol.transport.signals == ["KILL"] and got[0].check(CancelledError)
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    assert len(got) == 1 and reactor.getDelayedCalls() == []


def test_only_the_tail_of_the_output_is_kept() -> None:
    reactor = FakeReactor()
    got = results(runBounded(reactor, "/bin/ps", ["ps"], timeout=10, limit=8))
    protocol = reactor.spawned[0][0]
    protocol.outReceived(b"0123456789")
    protocol.errReceived(b"abcdefghij")
    protocol.processEnded(Failure(ProcessTerminated(1)))
    (ended,) = got
    assert (ended.out, ended.err, ended.code) == (b"23456789", b"cdefghij", 1)


def test_a_child_that_cannot_start_fails_with_its_error() -> None:
    reactor = FakeReactor(refuse=FileNotFoundError(2, "No such file or directory"))
    (failure,) = results(runBounded(reactor, "/nope", ["nope"], timeout=10))
    assert failure.check(FileNotFoundError)
    assert reactor.getDelayedCalls() == []
