"""
Command-line flags for every config key, for both command lines: C{virby}'s (argparse) and
the daemon's (twistd's C{usage.Options}, which C{virbyd} also parses).  Both are built from
L{virby.config.KEYS} here, and what they were given is collected here, so the two can never
disagree on a name, a form, or what C{--KEY} together with C{--no-KEY} means.

A key's L{virby.config.Value} says which form its flag takes:

  - C{value}: C{--KEY TEXT};
  - C{switch}: C{--KEY} or C{--no-KEY} (both at once is a mistake naming the key);
  - C{repeated}: C{--KEY TEXT}, once for each item.

What is collected is the text as given, by key name; the key itself reads it
(L{virby.config.Key.fromText}) when the config is loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from virby.config import KEYS, ConfigError, Key

if TYPE_CHECKING:
    from twisted.python.usage import Options

#: The option every command takes besides the keys.
CONFIG_HELP = "the JSON config file"


def _off(key: Key) -> str:
    return f"no-{key.name}"


def collect(given: Callable[[str], Any]) -> dict[str, Any]:
    """
    The config flags given, by key name, from C{given}: what the parser holds for an option
    name (C{None}, C{False} or an empty list when it was not given).  A flag given the empty
    string is given: its key's own check refuses it (an unset shell variable, not a default).

    @raise ConfigError: when a switch was given both ways.
    """
    flags: dict[str, Any] = {}
    for key in KEYS:
        if key.value.form == "switch":
            on, off = given(key.name), given(_off(key))
            if on and off:
                raise ConfigError(key.name, f"--{key.name} and --{_off(key)} conflict")
            if on or off:
                flags[key.name] = bool(on)
        elif given(key.name) is not None and given(key.name) != []:
            flags[key.name] = given(key.name)
    return flags


# -- virby's argparse


def addArguments(parser: argparse.ArgumentParser) -> None:
    """Add C{--config} and one flag per key (C{--KEY}/C{--no-KEY} for a switch)."""
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    for key in KEYS:
        flag = f"--{key.name}"
        form = key.value.form
        if form == "switch":
            parser.add_argument(flag, dest=key.name, action="store_true", help=key.help)
            parser.add_argument(
                f"--{_off(key)}", dest=_off(key), action="store_true", help=argparse.SUPPRESS
            )
        elif form == "repeated":
            parser.add_argument(
                flag, dest=key.name, action="append", metavar=key.value.metavar, help=key.help
            )
        else:
            parser.add_argument(flag, dest=key.name, metavar=key.value.metavar, help=key.help)


def collected(namespace: argparse.Namespace) -> dict[str, Any]:
    """The config flags an argparse namespace holds (L{collect})."""
    return collect(lambda name: getattr(namespace, name, None))


# -- the daemon's usage.Options (L{virby.daemon.tap.Options} is made of these)


def usageParameters() -> list[list[Any]]:
    """twistd's C{--KEY TEXT} options: C{--config} and every C{value} key."""
    return [["config", None, None, CONFIG_HELP]] + [
        [key.name, None, None, key.help] for key in KEYS if key.value.form == "value"
    ]


def usageSwitches() -> list[list[Any]]:
    """twistd's C{--KEY} and C{--no-KEY} options, for every C{switch} key."""
    return [
        flag
        for key in KEYS
        if key.value.form == "switch"
        for flag in ([key.name, None, key.help], [_off(key), None, f"(turn {key.name} off)"])
    ]


def usageHandlers() -> dict[str, Callable[[Options, str], None]]:
    """
    twistd's handlers of the C{repeated} keys, by method name (C{opt_KEY}): each call adds an
    item to the list the options hold under the key's name (L{usageDefaults}).
    """
    return {f"opt_{key.attribute}": _appender(key) for key in KEYS if key.value.form == "repeated"}


def usageDefaults() -> dict[str, Any]:
    """What the options hold before parsing beyond twistd's own defaults: empty lists."""
    return {key.name: [] for key in KEYS if key.value.form == "repeated"}


def _appender(key: Key) -> Callable[[Options, str], None]:
    def append(options: Options, text: str) -> None:
        options[key.name].append(text)

    append.__doc__ = f"{key.help} (repeatable)"
    return append
