"""
``twistd virby``: command-line options and the service tree of the daemon.

The plugin in C{twisted/plugins/virby_plugin.py} names this module lazily, so listing
twistd's plugins never imports the daemon.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.application.service import IService
from twisted.python import usage

from virby import __version__, flags
from virby.config import Config, load
from virby.daemon.virbyd import EXIT_USAGE, exitWithError, programName
from virby.errors import VirbyError
from virby.logs import Logger

log = Logger()


class Options(usage.Options):
    """
    C{--config FILE} plus one flag per config key, which wins over the file.

    It speaks as Virby, not as twistd: C{--help} and C{--version} are Virby's, and a mistake
    on the command line is one line (twistd would print its whole usage text first).
    """

    synopsis = "[--config FILE] [--KEY VALUE ...]"
    optParameters = flags.usageParameters()
    optFlags = flags.usageSwitches()

    def __init__(self) -> None:
        super().__init__()
        self.update(flags.usageDefaults())

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            exitWithError(f"{e} (see `{programName()} --help`)", EXIT_USAGE)

    def configFlags(self) -> dict[str, Any]:
        """The config flags given, by key name (L{virby.flags.collect})."""
        return flags.collect(self.get)


def _showHelp(options: Options) -> NoReturn:
    """Display this help and exit."""
    sys.stdout.write(daemonHelp(programName()))
    raise SystemExit(0)


def _showVersion(options: Options) -> NoReturn:
    """Display Virby's version and exit."""
    from twisted import __version__ as twisted

    sys.stdout.write(f"{programName()} (Virby) {__version__}, on Twisted {twisted}\n")
    raise SystemExit(0)


# The repeated keys' handlers, and Virby's --help and --version in place of twistd's, which
# usage.Options finds as methods named opt_NAME.
for _name, _handler in {
    **flags.usageHandlers(),
    "opt_help": _showHelp,
    "opt_version": _showVersion,
}.items():
    setattr(Options, _name, _handler)


#: What the daemon's exit statuses mean, under its C{--help}.
EXIT_STATUSES = (
    (0, "stopped by SIGTERM (launchd's stop), once the VM is off"),
    (1, "it cannot serve (another daemon, a port in use, a bad config): the line says why"),
    (EXIT_USAGE, "the command line is wrong (an unknown flag, a missing value)"),
)


def daemonHelp(program: str) -> str:
    """
    The daemon's C{--help}: what it is, its options, the config flags apart with their
    defaults, and its exit statuses; rendered by argparse from the flags C{virby} shows.
    """
    parser = argparse.ArgumentParser(
        prog=program,
        usage=f"{program} [--config FILE] [--KEY VALUE ...]",
        description=textwrap.fill(
            "The Virby daemon: it owns the builder's port, boots the Linux builder VM under "
            "vfkit when a build connects, splices SSH into it, and stops it after an idle "
            "time. launchd runs it as `virbyd --config FILE`, which is `twistd --nodaemon "
            "--pidfile= virby --config FILE`.",
            78,
        ),
        epilog="exit status:\n"
        + "\n".join(f"  {code:<3}{meaning}" for code, meaning in EXIT_STATUSES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("--help", action="store_true", help="show this help and exit")
    parser.add_argument("--version", action="store_true", help="show Virby's version and exit")
    flags.addArguments(parser)
    return parser.format_help()


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
    except VirbyError as e:
        exitWithError(str(e))


def makeService(options: Options) -> IService:
    """Build the daemon's service tree on the global reactor."""
    config = loadConfig(options)
    from twisted.internet import reactor

    from virby.daemon.service import makeDaemonService
    from virby.reactors import hostReactor

    return makeDaemonService(config, hostReactor(reactor), configFile=options["config"])
