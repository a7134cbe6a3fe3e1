"""
The emulator's command line: its own options (anywhere, or from the environment), and
vfkit's flags, parsed as vfkit v0.6.3 parses them (C{cmd/vfkit/root.go} and
C{pkg/cmdline/cmdline.go}: cobra over pflag).  Only the flags are checked here; what the
values mean is checked later, in vfkit's order (L{virby.emulator.vmconfig}).

pflag's rules, mirrored: C{--name=value} or C{--name value} (the next word is the value
even when it starts with C{-}); C{-c 2}, C{-c2} or C{-c=2}; a bool flag needs no value;
unsigned numbers are C{strconv.ParseUint(s, 0, 64)}; C{--device} keeps each value whole
(a string array), C{--bootloader} splits on commas outside double quotes and appends (a
string slice); words that are not flags are ignored (the root command takes any argument).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from virby.emulator.golang import NumError, parseBool, parseUint
from virby.hostfacts import PLAYED_DEFAULTS, PlayedMac

FAULTS = ("no-lease", "duid-lease", "no-sshd")
#: How the emulated guest installs the keys from the sshd-keys share (see guest.py).
GUEST_KEY_RULES = ("every-boot", "when-absent")


class UsageError(Exception):
    """A command line vfkit would refuse; the message is vfkit's error text."""


class EmulatorError(UsageError):
    """Something the emulator cannot do that vfkit could; the message says so."""

    def __init__(self, message: str) -> None:
        super().__init__(f"virby emulator: {message}")


@dataclass(frozen=True)
class _Flag:
    name: str
    short: str | None
    kind: str  # "uint", "string", "bool", "array" (StringArray), "slice" (stringSlice)


_FLAGS = {
    flag.name: flag
    for flag in (
        _Flag("kernel", "k", "string"),
        _Flag("kernel-cmdline", "C", "string"),
        _Flag("initrd", "i", "string"),
        _Flag("bootloader", "b", "slice"),
        _Flag("gui", None, "bool"),
        _Flag("cpus", "c", "uint"),
        _Flag("memory", "m", "uint"),
        _Flag("timesync", "t", "string"),
        _Flag("device", "d", "array"),
        _Flag("log-level", None, "string"),
        _Flag("restful-uri", None, "string"),
        _Flag("ignition", None, "string"),
        _Flag("cloud-init", None, "slice"),
        _Flag("nested", "n", "bool"),
        _Flag("pidfile", None, "string"),
        _Flag("help", "h", "bool"),
        _Flag("version", "v", "bool"),
    )
}
_SHORT = {flag.short: flag for flag in _FLAGS.values() if flag.short}


@dataclass
class Flags:
    """vfkit's C{cmdline.Options}, with cobra's defaults."""

    values: dict[str, Any] = field(
        default_factory=lambda: {
            "cpus": 1,
            "memory": 512,
            "kernel": "",
            "kernel-cmdline": "",
            "initrd": "",
            "bootloader": [],
            "gui": False,
            "timesync": "",
            "device": [],
            "log-level": "",
            "restful-uri": "none://",
            "ignition": "",
            "cloud-init": [],
            "nested": False,
            "pidfile": "",
            "help": False,
            "version": False,
        }
    )
    changed: set[str] = field(default_factory=set)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


@dataclass
class Emulated:
    """
    The emulator's own settings: the guest, and the Mac it plays.

    @ivar played: the Mac whose answers decide C{--nested} and the Rosetta share, the same
        L{PlayedMac} the daemon's host facts use on a system that is not a Mac.
    @ivar guest_keys: the key rule of the image's key unit (see L{virby.emulator.guest}).
    """

    leases_file: str = ""
    guest_port: int = 22
    boot_delay: float = 0.2
    fault: str | None = None
    crash_after: float | None = None
    played: PlayedMac = field(default_factory=PlayedMac.fromEnvironment)
    guest_keys: str = "every-boot"


_OWN = ("leases-file", "guest-port", "boot-delay", "fault", "cpu", "macos", "rosetta",
        "guest-keys")  # fmt: skip


def splitSlice(text: str) -> list[str]:
    """
    pflag's string slice as vfkit parses it (C{pkg/cmdline/string_slice.go}): split on
    commas outside double quotes; a value wholly in quotes loses them.

    @raise UsageError: C{mismatched "} for an unclosed quote.
    """
    pieces, current, quoted = [], "", False
    for char in text:
        if quoted:
            quoted = char != '"'
            current += char
        elif char == ",":
            pieces.append(_unquote(current))
            current = ""
        else:
            quoted = char == '"'
            current += char
    if quoted:
        raise UsageError('invalid argument "' + text + '" for "-b, --bootloader" flag: '
                         'mismatched "')  # fmt: skip
    if pieces or current:
        pieces.append(_unquote(current))
    return pieces


def _unquote(text: str) -> str:
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return text.strip('"')
    return text


def _flagName(flag: _Flag) -> str:
    return f"-{flag.short}, --{flag.name}" if flag.short else f"--{flag.name}"


def _set(flags: Flags, flag: _Flag, value: str) -> None:
    try:
        if flag.kind == "uint":
            flags.values[flag.name] = parseUint(value, 0, 64)
        elif flag.kind == "bool":
            flags.values[flag.name] = parseBool(value)
        elif flag.kind == "array":
            flags.values[flag.name] = [*flags.values[flag.name], value]
        elif flag.kind == "slice":
            pieces = splitSlice(value)
            before = flags.values[flag.name] if flag.name in flags.changed else []
            flags.values[flag.name] = [*before, *pieces]
        else:
            flags.values[flag.name] = value
    except NumError as e:
        raise UsageError(f'invalid argument "{value}" for "{_flagName(flag)}" flag: {e}') from None
    flags.changed.add(flag.name)


def _environment(name: str) -> str | None:
    return os.environ.get(f"VIRBY_EMULATOR_{name.upper().replace('-', '_')}") or None


def parse(argv: list[str]) -> tuple[Emulated, Flags]:
    """
    Split a command line into the emulator's settings and vfkit's flags.

    @raise UsageError: with pflag's text for a flag vfkit would refuse.
    """
    own: dict[str, str | None] = {name: _environment(name) for name in _OWN}
    flags = Flags()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name in own:
                if not eq:
                    if not args:
                        raise UsageError(f"flag needs an argument: --{name}")
                    value = args.pop(0)
                own[name] = value
                continue
            if not name or name[0] in "-=":
                raise UsageError(f"bad flag syntax: {arg}")
            flag = _FLAGS.get(name)
            if flag is None:
                raise UsageError(f"unknown flag: --{name}")
            if not eq:
                if flag.kind == "bool":
                    value = "true"
                elif args:
                    value = args.pop(0)
                else:
                    raise UsageError(f"flag needs an argument: --{name}")
            _set(flags, flag, value)
        elif arg.startswith("-") and len(arg) > 1:
            _short(flags, arg, args)
    return _emulated(own), flags


def _short(flags: Flags, arg: str, args: list[str]) -> None:
    """One C{-x...} word: bool shorthands may be grouped; a value ends the group."""
    shorthands = arg[1:]
    while shorthands:
        flag = _SHORT.get(shorthands[0])
        if flag is None:
            raise UsageError(f"unknown shorthand flag: '{shorthands[0]}' in {arg}")
        rest = shorthands[1:]
        if rest.startswith("="):
            _set(flags, flag, rest[1:])
            return
        if flag.kind == "bool":
            _set(flags, flag, "true")
            shorthands = rest
            continue
        if rest:
            _set(flags, flag, rest)
        elif args:
            _set(flags, flag, args.pop(0))
        else:
            raise UsageError(f"flag needs an argument: '{flag.short}' in {arg}")
        return


def _number(name: str, text: str) -> int:
    if not text.isdigit():
        raise EmulatorError(f"invalid value {text!r} for --{name}")
    return int(text)


def _emulated(own: dict[str, str | None]) -> Emulated:
    played = PlayedMac(
        cpu=own["cpu"] or PLAYED_DEFAULTS["CPU"],
        macos=own["macos"] or PLAYED_DEFAULTS["MACOS"],
        rosetta=own["rosetta"] or PLAYED_DEFAULTS["ROSETTA"],
    )
    if played.rosetta not in ("installed", "missing"):
        raise EmulatorError(f"--rosetta is 'installed' or 'missing', not {played.rosetta!r}")
    settings = Emulated(leases_file=own["leases-file"] or "", played=played)
    if own["guest-port"]:
        settings.guest_port = _number("guest-port", own["guest-port"])
    if own["boot-delay"]:
        try:
            settings.boot_delay = float(own["boot-delay"])
        except ValueError:
            raise EmulatorError(f"invalid boot delay: {own['boot-delay']}") from None
    if own["guest-keys"]:
        if own["guest-keys"] not in GUEST_KEY_RULES:
            raise EmulatorError(f"--guest-keys is one of {', '.join(GUEST_KEY_RULES)}")
        settings.guest_keys = own["guest-keys"]
    fault = own["fault"]
    if fault:
        if fault.startswith("crash-after="):
            try:
                settings.crash_after = float(fault.partition("=")[2])
            except ValueError:
                raise EmulatorError(f"invalid fault: {fault}") from None
        elif fault in FAULTS:
            settings.fault = fault
        else:
            raise EmulatorError(
                f"unknown fault {fault!r}: one of {', '.join(FAULTS)}, crash-after=N"
            )
    return settings
