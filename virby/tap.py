"""
``twistd virby``: command-line options and the service tree of the daemon.

The plugin in C{twisted/plugins/virby_plugin.py} names this module lazily, so listing
twistd's plugins never imports the daemon.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from virby.config import KEYS, Config, ConfigError, load


class Options(usage.Options):
    """C{--config FILE} plus one flag per config key, which wins over the file."""

    synopsis = "[--config FILE] [--KEY VALUE ...]"
    optParameters = [["config", None, None, "the JSON config file"]] + [
        [key.name, None, None, key.help] for key in KEYS if key.kind == "value"
    ]
    optFlags = [
        flag
        for key in KEYS
        if key.kind == "flag"
        for flag in ([key.name, None, key.help], [f"no-{key.name}", None, "(off)"])
    ]

    def __init__(self) -> None:
        super().__init__()
        self["shared-dirs"] = []

    def opt_shared_dirs(self, value: str) -> None:
        """extra virtio-fs share TAG=DIR (repeatable)"""
        self["shared-dirs"].append(value)

    def flags(self) -> dict[str, Any]:
        """The config flags given, by key name."""
        given: dict[str, Any] = {}
        for key in KEYS:
            if key.kind == "flag":
                if self[key.name] and self[f"no-{key.name}"]:
                    raise usage.UsageError(f"--{key.name} and --no-{key.name} conflict")
                if self[key.name] or self[f"no-{key.name}"]:
                    given[key.name] = bool(self[key.name])
            elif key.kind == "map":
                if self[key.name]:
                    given[key.name] = self[key.name]
            elif self[key.name] is not None:
                given[key.name] = self[key.name]
        return given


def loadConfig(options: Options) -> Config:
    """
    Load the config or end the process with one line: twistd would otherwise print its whole
    usage text (for a usage error) or a traceback (for anything else).
    """
    try:
        return load(options["config"], options.flags())
    except (ConfigError, usage.UsageError) as e:
        sys.stderr.write(f"twistd virby: error: {e}\n")
        raise SystemExit(1) from None


def makeService(options: Options) -> IService:
    """Build the daemon's service tree on the global reactor."""
    config = loadConfig(options)
    from twisted.internet import reactor

    from virby.daemon import makeDaemonService

    return makeDaemonService(config, reactor)
