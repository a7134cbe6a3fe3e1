"""
The daemon's logger.  Debug events (every connection, every probe) are dropped unless the
``debug`` setting is on: under launchd the log is a file that newsyslog rotates only past
10 MiB (L{virby.daemon.logfile}), and twistd's observer writes every level it is given.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

_verbose = False


def setVerbose(on: bool) -> None:
    """Emit debug events from now on (C{debug = true}), or stop."""
    global _verbose
    _verbose = on


class Logger(_TwistedLogger):
    """A L{twisted.logger.Logger} that keeps debug events only when asked to."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level is LogLevel.debug and not _verbose:
            return
        super().emit(level, format, **kwargs)
