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


def shownDefault(key: Key) -> str:
    """A key's default as a person types it: C{100GiB}, C{off}, C{none}."""
    default = key.default
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default == {}:
        return "none"
    return str(default)


def keyHelp(key: Key) -> str:
    """A flag's line of help: what the key does and its default."""
    return f"{key.help} (default: {shownDefault(key)})"


#: The title and description of the config flags' group in every command's help.
CONFIG_GROUP = "config (each flag wins over its key in the file)"


def addArguments(
    parser: argparse.ArgumentParser, defaultConfig: str | None = None
) -> argparse._ArgumentGroup:
    """
    Add C{--config} and one flag per key (C{--KEY}/C{--no-KEY} for a switch), in a group of
    their own, after the command's own options, each with its default.

    @param defaultConfig: the file read when C{--config} is not given, named in the help.
    """
    group = parser.add_argument_group(CONFIG_GROUP)
    where = f" (default: {defaultConfig} when it exists)" if defaultConfig else ""
    group.add_argument("--config", metavar="FILE", help=CONFIG_HELP + where)
    for key in KEYS:
        flag = f"--{key.name}"
        form = key.value.form
        if form == "switch":
            group.add_argument(
                flag, f"--{_off(key)}", dest=key.name, action=_Switch, help=keyHelp(key)
            )
        elif form == "repeated":
            group.add_argument(
                flag, dest=key.name, action="append", metavar=key.value.metavar, help=keyHelp(key)
            )
        else:
            group.add_argument(flag, dest=key.name, metavar=key.value.metavar, help=keyHelp(key))
    return group


class _Switch(argparse.Action):
    """
    C{--KEY} and C{--no-KEY} as one entry of the help, each kept apart in the namespace
    (C{KEY} and C{no-KEY}), so that L{collect} sees both when both are given.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nargs=0, default=False, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        flag: str | None = None,
    ) -> None:
        name = self.dest if flag == f"--{self.dest}" else f"no-{self.dest}"
        setattr(namespace, name, True)


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
