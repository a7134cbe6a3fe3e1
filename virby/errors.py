"""
Failures a user can meet and fix.  Each carries a one-line message that names the cause and
the fix; commands print it alone, without a traceback.
"""


class VirbyError(Exception):
    """An expected failure with a message fit to show a person as it is."""


class PermanentError(VirbyError):
    """
    An expected failure that trying again cannot cure: something must change first (the
    config, the host, the working directory).  What retries on failure stops and says so
    once; a person's next request still tries again.
    """
