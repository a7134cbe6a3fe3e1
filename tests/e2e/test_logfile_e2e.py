"""
The daemon's log under rotation, as launchd and newsyslog treat it on the Mac: stdout and
stderr opened on one file before the daemon runs, then the file renamed and a new one made
(nix/module.nix's newsyslog entry).  The daemon finds the rotation itself within a minute
(its clock is tested in tests/unit/test_logfile.py); here SIGHUP asks it at once.
"""

from __future__ import annotations

import os
import signal

import pytest

from testbed.builder import tool
from testbed.processes import ProcessUnderTest

pytestmark = pytest.mark.e2e

#: launchd's StandardOutPath and StandardErrorPath: the same file, each opened to append.
AS_LAUNCHD = 'exec "$@" >>"$VIRBY_TEST_LOG" 2>>"$VIRBY_TEST_LOG"'


def follow(path) -> ProcessUnderTest:
    """The file's lines as they are written, from its first, for as long as it has its name."""
    return ProcessUnderTest(["tail", "--follow=name", "--retry", "-n", "+1", str(path)])


def test_after_newsyslog_rotates_the_log_the_daemon_writes_the_new_one(make_builder) -> None:
    builder = make_builder()
    log, rotated = builder.root / "virbyd.log", builder.root / "virbyd.log.0"
    daemon = ProcessUnderTest(
        ["sh", "-c", AS_LAUNCHD, "sh", tool("virbyd"), "--config", str(builder.config)],
        env={**builder.env, "VIRBY_TEST_LOG": str(log)},
        cwd=str(builder.root),
    )
    builder.daemons.append(daemon)
    before = follow(log)
    after: ProcessUnderTest | None = None
    try:
        before.wait_for_line(r"serving the builder on", timeout=60)

        os.rename(log, rotated)
        log.touch(mode=0o644)
        daemon.signal(signal.SIGHUP)
        after = follow(log)
        after.wait_for_line(r"SIGHUP: reopened the log " + str(log))

        result = builder.ssh("true")
        assert result.returncode == 0, result.stderr
        after.wait_for_line(r"VM ready at")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(30) == 0
        after.wait_for_line(r"stopped")
    finally:
        for follower in (before, after):
            if follower is not None:
                follower.kill_all()
    old, new = rotated.read_text(), log.read_text()
    assert "serving the builder on" in old and "VM ready at" not in old
    assert "serving the builder on" not in new and "VM ready at" in new
