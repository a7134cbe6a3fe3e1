"""
``twistd virby``: command-line options and the service tree of the daemon.

The plugin in C{twisted/plugins/virby_plugin.py} names this module lazily, so listing
twistd's plugins never imports the daemon.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from virby.config import Config, load
from virby.errors import VirbyError
from virby.flags import ConfigOptions
from virby.virbyd import exitWithError


class Options(ConfigOptions):
    """C{--config FILE} plus one flag per config key, which wins over the file."""

    synopsis = "[--config FILE] [--KEY VALUE ...]"


def loadConfig(options: Options) -> Config:
    """
    Load the config or end the process with one line: twistd would otherwise print its whole
    usage text (for a usage error) or a traceback (for anything else).
    """
    try:
        return load(options["config"], options.configFlags())
    except (VirbyError, usage.UsageError) as e:
        exitWithError(str(e))


def makeService(options: Options) -> IService:
    """Build the daemon's service tree on the global reactor."""
    config = loadConfig(options)
    from twisted.internet import reactor

    from virby.daemon import makeDaemonService

    return makeDaemonService(config, reactor)
