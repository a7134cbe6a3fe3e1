from __future__ import annotations

from twisted.logger import LogLevel

from tests.fakes import logObserver
from virby.logs import Logger, setVerbose


def test_debug_events_only_when_verbose() -> None:
    seen: list[dict] = []
    log = Logger(observer=logObserver(seen.append))
    setVerbose(False)
    log.debug("per connection")
    log.info("state change")
    assert [e["log_level"] for e in seen] == [LogLevel.info]
    setVerbose(True)
    try:
        log.debug("per connection")
    finally:
        setVerbose(False)
    assert [e["log_level"] for e in seen] == [LogLevel.info, LogLevel.debug]


def test_one_line_of_a_failure_an_exception_or_a_message() -> None:
    from twisted.python.failure import Failure

    from virby.errors import oneLine

    assert oneLine(ValueError("two\n  lines")) == "two lines"
    assert oneLine(Failure(ValueError("a\tb"))) == "a b"
    assert oneLine(Failure(KeyboardInterrupt())) == "KeyboardInterrupt"
    assert oneLine(" spaced  out\r\n") == "spaced out"
