from __future__ import annotations

from twisted.logger import LogLevel

from virby.logs import Logger, setVerbose


def test_debug_events_only_when_verbose() -> None:
    seen: list[dict] = []
    log = Logger(observer=seen.append)
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
