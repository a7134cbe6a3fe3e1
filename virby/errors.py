"""
Failures a user can meet and fix.  Each carries a one-line message that names the cause and
the fix; commands print it alone, without a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.python.failure import Failure


class VirbyError(Exception):
    """An expected failure with a message fit to show a person as it is."""


class PermanentError(VirbyError):
    """
    An expected failure that trying again cannot cure: something must change first (the
    config, the host, the working directory).  What retries on failure stops and says so
    once; a person's next request still tries again.
    """


def oneLine(what: Failure | BaseException | str) -> str:
    """
    A failure, an exception or a message as the one line a person reads: its text with every
    run of white space (newlines included) made one space.  An expected error carries its
    own words; one without any is named by its type.
    """
    from twisted.python.failure import Failure  # not at import: the commands need no Twisted

    if isinstance(what, str):
        text = what
    else:
        error = what.value if isinstance(what, Failure) else what
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def clip(text: str, limit: int) -> str:
    """C{text}, cut to C{limit} characters with an ellipsis when longer: for quoting."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
