"""
``twistd virby``: command-line options and the service tree of the daemon.

The plugin in C{twisted/plugins/virby_plugin.py} names this module lazily, so listing
twistd's plugins never imports the daemon.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from virby import flags
from virby.config import Config, load
from virby.daemon.virbyd import exitWithError
from virby.errors import VirbyError
from virby.logs import Logger

log = Logger()


class Options(usage.Options):
    """C{--config FILE} plus one flag per config key, which wins over the file."""

    synopsis = "[--config FILE] [--KEY VALUE ...]"
    optParameters = flags.usageParameters()
    optFlags = flags.usageSwitches()

    def __init__(self) -> None:
        super().__init__()
        self.update(flags.usageDefaults())

    def configFlags(self) -> dict[str, Any]:
        """The config flags given, by key name (L{virby.flags.collect})."""
        return flags.collect(self.get)


# The repeated keys' handlers, which twistd finds as methods named opt_KEY.
for _name, _handler in flags.usageHandlers().items():
    setattr(Options, _name, _handler)


def _warn(line: str) -> None:
    """A setting with no effect: logged once the log is open (twistd keeps what came before)."""
    log.warn("{warning}", warning=line)


def loadConfig(options: Options) -> Config:
    """
    Load the config or end the process with one line: twistd would otherwise print its whole
    usage text (for a usage error) or a traceback (for anything else).
    """
    try:
        return load(options["config"], options.configFlags(), warn=_warn)
    except (VirbyError, usage.UsageError) as e:
        exitWithError(str(e))


def makeService(options: Options) -> IService:
    """Build the daemon's service tree on the global reactor."""
    config = loadConfig(options)
    from twisted.internet import reactor

    from virby.daemon.service import makeDaemonService
    from virby.reactors import hostReactor

    return makeDaemonService(config, hostReactor(reactor))
