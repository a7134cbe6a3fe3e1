"""
The one configuration contract shared by the Nix module, ``virby`` and ``twistd virby``.

The nix-darwin module writes a JSON file with kebab-case keys; every key also has a
command-line flag of the same name that wins over the file.  Every mistake a user can make
ends in a L{ConfigError} whose message is one line naming the key and what was expected, so
the commands can print it and exit without a traceback.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

#: Where vfkit's REST socket lives; its full path must fit in sun_path (vfkit allows 103).
REST_SOCKET_NAME = "vfkit.sock"
MAX_UNIX_SOCKET_PATH = 103

MIB = 1024 * 1024
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": MIB, "G": 1024 * MIB, "T": 1024 * 1024 * MIB}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$")


class ConfigError(Exception):
    """
    A configuration mistake a user can fix; C{str()} is one line naming the key.

    @ivar key: the kebab-case key at fault, or C{None} for the file as a whole.
    """

    def __init__(self, key: str | None, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"config key {key!r}: {message}" if key else f"config: {message}")


def parse_size(text: str) -> int:
    """
    Parse a size like C{"100GiB"}, C{"512M"} or C{"4096"} (bytes) into bytes.

    Units are binary (K, M, G, T, optionally followed by C{iB}); decimal spellings such as
    C{"6TB"} are refused rather than guessed, because a disk 7% smaller than asked for is a
    surprise nobody wants at 2 a.m.

    @raise ValueError: if C{text} is not such a size.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size like '100GiB'")
    number, unit, suffix = match.groups()
    if suffix == "B" and unit:
        raise ValueError(f"{text!r} is ambiguous: write '{number}{unit}iB'")
    if suffix == "iB" and not unit:
        raise ValueError(f"{text!r} is not a size like '100GiB'")
    return int(number) * _SIZE_UNITS[unit]


def _describe(value: object) -> str:
    """Name a JSON value's type the way a Nix user reads it."""
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "an object"),
    ]
    if value is None:
        return "null"
    for kind, name in kinds:
        if isinstance(value, kind):
            shown = json.dumps(value)
            return f"{name} ({shown})" if len(shown) <= 40 else name
    return type(value).__name__


# -- validators: each takes the raw JSON value and returns the typed value or raises ValueError


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    """An integer within bounds; booleans are not integers here, whatever Python thinks."""
    bounds = f"between {low} and {high}" if high is not None else f"at least {low}"

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {bounds}, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"expected an integer {bounds}, got {value}")
        return value

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_describe(value)}")
    return value


def _absolute_path(value: object) -> str:
    """
    An absolute path that vfkit can be given: vfkit splits device options on commas and has
    no escaping, so a comma in a path can never work.
    """
    path = _string(value)
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path, got {_describe(value)}")
    if "," in path:
        raise ValueError(f"vfkit cannot take a path containing ',': {path!r}")
    return os.path.normpath(path)


def _working_directory(value: object) -> str:
    path = _absolute_path(value)
    socket_path = os.path.join(path, REST_SOCKET_NAME)
    if len(socket_path.encode()) > MAX_UNIX_SOCKET_PATH:
        raise ValueError(
            f"{path!r} is too long: {socket_path!r} must fit in "
            f"{MAX_UNIX_SOCKET_PATH} bytes for vfkit's REST socket"
        )
    return path


def _disk_size(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '100GiB', got {_describe(value)}")
    size = parse_size(value)
    if size < 1024 * MIB:
        raise ValueError(f"expected a size of at least 1GiB, got {value!r}")
    return size


def _memory(value: object) -> int:
    """MiB as an integer; a size string such as C{"6GiB"} is accepted on the command line."""
    if isinstance(value, str):
        size = parse_size(value) if not value.strip().isdigit() else int(value) * MIB
        if size % MIB:
            raise ValueError(f"expected whole MiB, got {value!r}")
        value = size // MIB
    return _integer(1024)(value)


_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_RESERVED_TAGS = frozenset({"sshd-keys", "rosetta"})


def _shared_dirs(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object of tag to absolute directory, got {_describe(value)}")
    result: dict[str, str] = {}
    for tag, path in value.items():
        if not _TAG_RE.match(tag):
            raise ValueError(f"tag {tag!r} must be letters, digits, '.', '_' or '-'")
        if tag in _RESERVED_TAGS:
            raise ValueError(f"tag {tag!r} is reserved by Virby")
        try:
            result[tag] = _absolute_path(path)
        except ValueError as e:
            raise ValueError(f"tag {tag!r}: {e}") from None
    return result


def _optional(check: Callable[[object], Any]) -> Callable[[object], Any]:
    def optional(value: object) -> Any:
        return None if value is None else check(value)

    return optional


# -- the schema


@dataclass(frozen=True)
class Key:
    """One configuration key: its name in JSON and on the command line, and how to check it."""

    name: str
    default: Any
    check: Callable[[object], Any]
    help: str
    kind: str = "value"  # "value", "flag" (boolean), or "map" (shared-dirs)

    @property
    def attribute(self) -> str:
        return self.name.replace("-", "_")


KEYS: tuple[Key, ...] = (
    Key("cores", 8, _integer(1), "vCPUs of the VM"),
    Key("memory", 6144, _memory, "RAM of the VM in MiB (at least 1024)"),
    Key("disk-size", "100GiB", _disk_size, "size of the VM's writable disk, e.g. 100GiB"),
    Key("port", 31222, _integer(1024, 65535), "host port of the builder"),
    Key("listen", "launchd:name=Listener", _string, "Twisted server endpoint to accept on"),
    Key("on-demand", False, _boolean, "boot at the first connection", "flag"),
    Key("ttl", 10800, _integer(1), "idle seconds before an on-demand VM is stopped"),
    Key("rosetta", False, _boolean, "share Rosetta with the VM (aarch64-darwin)", "flag"),
    Key("nested-virtualization", False, _boolean, "pass --nested to vfkit", "flag"),
    Key("shared-dirs", {}, _shared_dirs, "extra virtio-fs share TAG=DIR", "map"),
    Key("debug", False, _boolean, "keep serial.log and log verbosely", "flag"),
    Key("allow-user-ssh", False, _boolean, "keep a client key readable by all users", "flag"),
    Key("working-directory", "/var/lib/virby", _working_directory, "where all state lives"),
    Key("image", None, _optional(_absolute_path), "the raw EFI NixOS image"),
    Key("vfkit", "vfkit", _string, "the hypervisor command"),
    Key("leases-file", "/var/db/dhcpd_leases", _absolute_path, "bootpd's lease file"),
    Key("guest-ssh-port", 22, _integer(1, 65535), "the VM's sshd port"),
    Key("start-timeout", 180, _integer(1), "seconds a boot may take to reach a working sshd"),
    Key("ephemeral", False, _boolean, "boot every time from a fresh copy of base.img", "flag"),
)
KEYS_BY_NAME: Mapping[str, Key] = {key.name: key for key in KEYS}


@dataclass(frozen=True)
class Config:
    """
    The validated configuration.  Sizes are in bytes (C{disk_size}) or MiB (C{memory}).
    """

    cores: int = 8
    memory: int = 6144
    disk_size: int = 100 * 1024 * MIB
    port: int = 31222
    listen: str = "launchd:name=Listener"
    on_demand: bool = False
    ttl: int = 10800
    rosetta: bool = False
    nested_virtualization: bool = False
    shared_dirs: Mapping[str, str] = field(default_factory=dict)
    debug: bool = False
    allow_user_ssh: bool = False
    working_directory: str = "/var/lib/virby"
    image: str | None = None
    vfkit: str = "vfkit"
    leases_file: str = "/var/db/dhcpd_leases"
    guest_ssh_port: int = 22
    start_timeout: int = 180
    ephemeral: bool = False

    def path(self, *parts: str) -> str:
        """A path inside the working directory."""
        return os.path.join(self.working_directory, *parts)


assert {f.name for f in fields(Config)} == {key.attribute for key in KEYS}


def from_mapping(document: object) -> Config:
    """
    Validate a decoded JSON document into a L{Config}.

    @raise ConfigError: naming the first key that is unknown or wrong.
    """
    if not isinstance(document, dict):
        raise ConfigError(None, f"expected a JSON object of settings, got {_describe(document)}")
    values: dict[str, Any] = {}
    for name, raw in document.items():
        key = KEYS_BY_NAME.get(name)
        if key is None:
            raise ConfigError(name, f"unknown key; known keys are {', '.join(KEYS_BY_NAME)}")
        try:
            values[key.attribute] = key.check(raw)
        except ValueError as e:
            raise ConfigError(name, str(e)) from None
    for key in KEYS:
        if key.attribute not in values:
            values[key.attribute] = key.check(key.default)
    return Config(**values)


def read_file(path: str) -> dict[str, Any]:
    """
    Read the JSON config file into a plain dict (not yet validated).

    @raise ConfigError: when the file cannot be read or is not a JSON object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(None, f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(None, f"{path} is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(None, f"{path} is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise ConfigError(None, f"{path} must hold a JSON object, not {_describe(document)}")
    return document


# -- command-line flags


def parse_flag(name: str, text: str | Iterable[str] | bool) -> Any:
    """
    Turn a command-line flag's text into the JSON value of key C{name}, so that flags and the
    file are checked by exactly the same validators.
    """
    key = KEYS_BY_NAME[name]
    if isinstance(text, bool):
        return text
    if key.kind == "map":
        return _parse_map_flag(name, [text] if isinstance(text, str) else list(text))
    assert isinstance(text, str)
    if key.kind == "flag":
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ConfigError(name, f"expected true or false, got {text!r}")
    if key.check is _memory:
        return text
    integer_key = isinstance(key.default, int) and not isinstance(key.default, bool)
    if integer_key:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(name, f"expected an integer, got {text!r}") from None
    return text


def _parse_map_flag(name: str, items: list[str]) -> dict[str, str]:
    """C{--shared-dirs} takes C{TAG=DIR} (repeatable) or a JSON object."""
    result: dict[str, str] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                decoded = json.loads(item)
            except json.JSONDecodeError as e:
                raise ConfigError(name, f"not a JSON object: {e}") from None
            if not isinstance(decoded, dict):
                raise ConfigError(name, f"expected a JSON object, got {_describe(decoded)}")
            result.update(decoded)
            continue
        tag, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(name, f"expected TAG=DIR, got {item!r}")
        result[tag] = path
    return result


def load(path: str | None, flags: Mapping[str, Any] | None = None) -> Config:
    """
    Load the config file at C{path} (or only defaults when C{None}) with command-line flags,
    keyed by kebab-case name, laid over it.

    @raise ConfigError: for any mistake, naming the key.
    """
    document: dict[str, Any] = read_file(path) if path is not None else {}
    for name, text in (flags or {}).items():
        if text is None:
            continue
        document[name] = parse_flag(name, text)
    return from_mapping(document)
