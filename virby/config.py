"""
The one configuration contract shared by the Nix module, ``virby`` and ``twistd virby``.

The nix-darwin module writes a JSON file with kebab-case keys; every key also has a
command-line flag of the same name that wins over the file.  Every mistake a user can make
ends in a L{ConfigError} whose message is one line naming the key and what was expected, so
the commands can print it and exit without a traceback.

Every value is bounded, so nothing a file or a flag says can fail later inside the reactor
(a timer of 10**400 seconds), in the kernel (a path with a NUL byte) or in vfkit (a share
tag Virtualization.framework refuses).  The loader is bounded too: a file nested 100 000
levels deep or an integer of 5000 digits is refused by name, before Python's recursion limit
or its integer-conversion limit can turn it into a traceback.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from virby import layout
from virby.errors import VirbyError

MIB = 1024 * 1024
GIB = 1024 * MIB
TIB = 1024 * GIB
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": MIB, "G": GIB, "T": TIB}
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([KMGT]?)(i?B)?\s*", re.ASCII)
_INTEGER_RE = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)

#: macOS's PATH_MAX (1024) counts the terminating NUL: a longer path cannot be opened.
MAX_PATH_BYTES = 1023
#: Virtualization.framework takes a virtio-fs tag of fewer than 36 UTF-8 bytes (its
#: C{validateTag}: "fewer than 36 bytes"), so 35 is the longest.
MAX_SHARE_TAG_BYTES = 35
#: More shares than this would only make vfkit's command line absurd.
MAX_SHARES = 64
#: Endpoint strings and command names are short; this only stops absurd ones.
MAX_STRING = 1024
#: The deepest a valid document nests is 2 (the file's object, then shared-dirs).
MAX_NESTING = 32
#: More digits than any bounded key can use; longer numbers are refused unconverted.
MAX_DIGITS = 20
#: A config file is a few hundred bytes; anything this large is not one.
MAX_FILE_BYTES = 1024 * 1024


class ConfigError(VirbyError):
    """
    A configuration mistake a user can fix; C{str()} is one line naming the key.

    @ivar key: the kebab-case key at fault, or C{None} for the file as a whole.
    """

    def __init__(self, key: str | None, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(
            f"config key {_shown(key)}: {message}" if key is not None else f"config: {message}"
        )


def _shown(text: str, limit: int = 60) -> str:
    """C{repr(text)} cut to C{limit} characters: a message stays one readable line."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


class HugeNumber:
    """
    A JSON integer with more than L{MAX_DIGITS} digits, kept as its digit count only: no
    bounded key can take it, and converting it could hit Python's integer-conversion limit.
    """

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"a {self.digits}-digit number"


def _jsonInteger(text: str) -> int | HugeNumber:
    digits = len(text.lstrip("+-"))
    return HugeNumber(digits) if digits > MAX_DIGITS else int(text)


def _scan(text: str, stop: int | None = None) -> tuple[bool, str | None]:
    """
    Walk C{text}'s structure without recursing, up to offset C{stop} (or the end): whether
    it nests deeper than L{MAX_NESTING} on the way, and the top-level key the walk is in
    where it ended (C{None} when outside any).
    """
    depth = 0
    key: str | None = None
    last: str | None = None
    # An unterminated string matches to the end, so the scan stays linear.
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"?|[\[\]{}:,]', text):
        if stop is not None and token.start() >= stop:
            break
        symbol = token.group()
        if symbol in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return True, key
        elif symbol in "]}":
            depth -= 1
        elif depth != 1:
            continue
        elif symbol == ":":
            key = last
        elif symbol == ",":
            key = last = None
        else:
            try:
                last = json.loads(symbol)
            except ValueError:
                last = None
    return False, key


class DuplicateKey(ValueError):
    """
    A JSON object names a key twice (a setting, or a share's tag): JSON itself keeps the
    last one silently, which would drop a share or a setting a person wrote.

    @ivar name: the key given twice.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _uniqueKeys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """C{json}'s C{object_pairs_hook}: an object, refusing a key given twice."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise DuplicateKey(name)
        result[name] = value
    return result


def decodeJson(text: str, what: str, key: str | None = None) -> Any:
    """
    Decode JSON text the way the config needs it: nesting and integer size bounded first.

    @param what: how a message names the text (the file, or the flag).
    @param key: the key that a mistake is charged to when it is not inside a known one.
    @raise ConfigError: naming the key at fault.
    """
    deep, under = _scan(text)
    if deep:
        raise ConfigError(
            key if key is not None else under,
            f"{what} nests more than {MAX_NESTING} levels deep; a Virby config nests at most 2",
        )
    try:
        return json.loads(text, parse_int=_jsonInteger, object_pairs_hook=_uniqueKeys)
    except DuplicateKey as e:
        raise ConfigError(key, f"{what} names {_shown(e.name)} twice: keep one") from None
    except RecursionError:
        raise ConfigError(key, f"{what} nests too deeply") from None
    except ValueError as e:
        if key is None and isinstance(e, json.JSONDecodeError):
            key = _scan(text, e.pos)[1]
        raise ConfigError(key, f"{what} is not valid JSON: {e}") from None


def parseSize(text: str) -> int:
    """
    Parse a size like C{"100GiB"}, C{"512M"} or C{"4096"} (bytes) into bytes.

    Units are binary (K, M, G, T, optionally followed by C{iB}); decimal spellings such as
    C{"6TB"} are refused rather than guessed, because a disk 7% smaller than asked for is a
    surprise nobody wants at 2 a.m.

    @raise ValueError: if C{text} is not such a size.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{_shown(text)} is not a size like '100GiB'")
    number, unit, suffix = match.groups()
    if suffix == "B" and unit:
        raise ValueError(f"{_shown(text)} is ambiguous: write '{int(number)}{unit}iB'")
    if suffix == "iB" and not unit:
        raise ValueError(f"{_shown(text)} is not a size like '100GiB'")
    if len(number.lstrip("0")) > MAX_DIGITS:
        raise ValueError(f"{_shown(text)} is far too large")
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
    if isinstance(value, HugeNumber):
        return repr(value)
    for kind, name in kinds:
        if isinstance(value, kind):
            if isinstance(value, list | dict) and len(value) > 8:
                return name
            try:
                shown = json.dumps(value)
            except (TypeError, ValueError, RecursionError):
                return name
            return f"{name} ({shown})" if len(shown) <= 40 else name
    return type(value).__name__


# -- validators: each takes the raw JSON value and returns the typed value or raises ValueError


def _integer(low: int, high: int) -> Callable[[object], int]:
    """An integer within bounds; booleans are not integers here, whatever Python thinks."""
    bounds = f"between {low} and {high}"

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {bounds}, got {_describe(value)}")
        if not low <= value <= high:
            shown = str(value) if abs(value).bit_length() < 64 else "a larger number"
            raise ValueError(f"expected an integer {bounds}, got {shown}")
        return value

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _text(value: object, limit: int = MAX_STRING) -> str:
    """
    A non-empty string that the OS and vfkit can take: no control characters (a NUL cannot
    cross into the kernel, a newline would break the ssh_config written from it), valid
    UTF-8, and not absurdly long.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_describe(value)}")
    for position, character in enumerate(value):
        if ord(character) < 0x20 or ord(character) == 0x7F:
            raise ValueError(
                f"{_shown(value)} contains the control character {character!r} at "
                f"position {position}"
            )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{_shown(value)} is not valid UTF-8 text") from None
    if size > limit:
        raise ValueError(f"{_shown(value)} is {size} bytes long; at most {limit} are allowed")
    return value


def _string(value: object) -> str:
    return _text(value)


def _absolutePath(value: object) -> str:
    """
    An absolute path that vfkit can be given: vfkit splits device options on commas and has
    no escaping, so a comma in a path can never work.
    """
    path = _text(value, MAX_PATH_BYTES)
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path, got {_describe(value)}")
    if "," in path:
        raise ValueError(f"vfkit cannot take a path containing ',': {_shown(path)}")
    return os.path.normpath(path)


def _command(value: object) -> str:
    """A command name looked up on PATH, or a path to it."""
    return _text(value, MAX_PATH_BYTES)


def _workingDirectory(value: object) -> str:
    """Room for the longest of its sockets' paths in C{sun_path} (L{virby.layout})."""
    path = _absolutePath(value)
    name, size = layout.longestSocket(path)
    if size > layout.MAX_UNIX_SOCKET_PATH:
        raise ValueError(
            f"{_shown(path)} is too long: the path of its socket {name} would be {size} "
            f"bytes, and a unix socket's path holds at most {layout.MAX_UNIX_SOCKET_PATH} bytes"
        )
    return path


MIN_DISK = GIB
MAX_DISK = 64 * TIB


def _diskSize(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '100GiB', got {_describe(value)}")
    size = parseSize(value)
    if not MIN_DISK <= size <= MAX_DISK:
        raise ValueError(f"expected a size between 1GiB and 64TiB, got {_shown(value)}")
    return size


MIN_MEMORY = 1024
MAX_MEMORY = 1024 * 1024  # MiB: 1 TiB, more than any Mac has


def _memory(value: object) -> int:
    """MiB as an integer; a size string such as C{"6GiB"} is accepted on the command line."""
    if isinstance(value, str):
        if _INTEGER_RE.fullmatch(value):
            value = _jsonInteger(value.strip())
        else:
            size = parseSize(value)
            if size % MIB:
                raise ValueError(f"expected whole MiB, got {_shown(value)}")
            value = size // MIB
    return _integer(MIN_MEMORY, MAX_MEMORY)(value)


_TAG_RE = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
_RESERVED_TAGS = frozenset({layout.SSHD_KEYS_TAG, layout.ROSETTA_TAG})


def _sharedDirs(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object of tag to absolute directory, got {_describe(value)}")
    if len(value) > MAX_SHARES:
        raise ValueError(f"{len(value)} shares; at most {MAX_SHARES} are allowed")
    result: dict[str, str] = {}
    for tag, path in value.items():
        if not _TAG_RE.fullmatch(tag):
            raise ValueError(f"tag {_shown(tag)} must be letters, digits, '.', '_' or '-'")
        if len(tag) > MAX_SHARE_TAG_BYTES:
            raise ValueError(
                f"tag {_shown(tag)} is {len(tag)} bytes long; Virtualization.framework allows "
                f"at most {MAX_SHARE_TAG_BYTES}"
            )
        if tag in _RESERVED_TAGS:
            raise ValueError(f"tag {tag!r} is reserved by Virby")
        try:
            result[tag] = _absolutePath(path)
        except ValueError as e:
            raise ValueError(f"tag {tag!r}: {e}") from None
    return result


def _optional(check: Callable[[object], Any]) -> Callable[[object], Any]:
    def optional(value: object) -> Any:
        return None if value is None else check(value)

    return optional


# -- command-line text: each takes what a flag gave and returns the JSON value it stands for


def _given(text: object) -> object:
    """Text the key's own check reads as it is: strings, paths, sizes, memory like C{6GiB}."""
    return text


def _integerText(text: str) -> object:
    if not _INTEGER_RE.fullmatch(text):
        raise ValueError(f"expected an integer, got {_shown(text)}")
    return _jsonInteger(text.strip())


def _switchText(given: bool | str) -> bool:
    """C{--KEY}/C{--no-KEY} give a boolean; a word is read the way a person means it."""
    if isinstance(given, bool):
        return given
    lowered = given.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected true or false, got {_shown(given)}")


def _sharedDirsText(items: str | Iterable[str]) -> dict[str, Any]:
    """
    C{TAG=DIR}, given again for each share, or a JSON object of them.  A tag given twice is
    refused, not settled by order: the guest mounts one directory per tag.  The flag's shares
    replace the file's whole object, as any flag replaces its key's value.
    """
    result: dict[str, Any] = {}
    for item in [items] if isinstance(items, str) else items:
        if item.lstrip().startswith("{"):
            decoded = decodeJson(item, "the flag's JSON")
            if not isinstance(decoded, dict):
                raise ValueError(f"expected a JSON object, got {_describe(decoded)}")
            pairs = list(decoded.items())
        else:
            tag, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"expected TAG=DIR, got {_shown(item)}")
            pairs = [(tag, path)]
        for tag, path in pairs:
            if tag in result:
                raise ValueError(f"tag {_shown(tag)} is given twice: one tag, one share")
            result[tag] = path
    return result


# -- the schema

#: How a key is given on the command line: C{--KEY TEXT}, C{--KEY}/C{--no-KEY}, or
#: C{--KEY TEXT} once for each item.
Form = Literal["value", "switch", "repeated"]


@dataclass(frozen=True)
class Value:
    """
    A kind of setting: how a value in the file is checked, and how a flag's text becomes one.

    @ivar check: the JSON value to the typed value, or C{ValueError}.
    @ivar fromText: what the command line gave (a string, a boolean for a switch, a list for a
        repeated flag) to the JSON value, or C{ValueError}; L{check} comes after it.
    @ivar form: how the flag is given (L{Form}).
    @ivar metavar: what the flag's value is called in the help.
    """

    check: Callable[[object], Any]
    fromText: Callable[[Any], object] = _given
    form: Form = "value"
    metavar: str = "VALUE"


def _bounded(low: int, high: int) -> Value:
    return Value(_integer(low, high), _integerText, metavar="N")


BOOLEAN = Value(_boolean, _switchText, "switch")
STRING = Value(_string, metavar="TEXT")
PATH = Value(_absolutePath, metavar="PATH")


@dataclass(frozen=True)
class Key:
    """One configuration key: its name in JSON and on the command line, and its L{Value}."""

    name: str
    default: Any
    value: Value
    help: str

    @property
    def attribute(self) -> str:
        return self.name.replace("-", "_")

    def check(self, raw: object) -> Any:
        return self.value.check(raw)

    def fromText(self, given: object) -> object:
        """
        The JSON value a flag's C{given} text stands for.

        @raise ConfigError: naming this key.
        """
        try:
            return self.value.fromText(given)
        except ValueError as e:
            raise ConfigError(self.name, str(e)) from None
        except ConfigError as e:
            raise ConfigError(self.name, e.message) from None


DAY = 24 * 3600

KEYS: tuple[Key, ...] = (
    Key("cores", 8, _bounded(1, 256), "vCPUs of the VM"),
    Key("memory", 6144, Value(_memory, metavar="MIB"), "RAM of the VM in MiB (at least 1024)"),
    Key(
        "disk-size",
        "100GiB",
        Value(_diskSize, metavar="SIZE"),
        "size of the VM's disk, e.g. 100GiB",
    ),
    Key("port", 31222, _bounded(1024, 65535), "host port of the builder"),
    Key("listen", "launchd:name=Listener", STRING, "Twisted server endpoint to accept on"),
    Key("on-demand", False, BOOLEAN, "boot at the first connection"),
    Key("ttl", 10800, _bounded(1, 365 * DAY), "idle seconds before an on-demand VM is stopped"),
    Key("rosetta", False, BOOLEAN, "share Rosetta with the VM (aarch64-darwin)"),
    Key("nested-virtualization", False, BOOLEAN, "pass --nested to vfkit"),
    Key(
        "shared-dirs",
        {},
        Value(_sharedDirs, _sharedDirsText, "repeated", "TAG=DIR"),
        "extra virtio-fs share TAG=DIR",
    ),
    Key("debug", False, BOOLEAN, "keep serial.log and log verbosely"),
    Key("allow-user-ssh", False, BOOLEAN, "keep a client key readable by all users"),
    Key(
        "working-directory",
        "/var/lib/virby",
        Value(_workingDirectory, metavar="PATH"),
        "where all state lives",
    ),
    Key("image", None, Value(_optional(_absolutePath), metavar="PATH"), "the raw EFI NixOS image"),
    Key("vfkit", "vfkit", Value(_command, metavar="COMMAND"), "the hypervisor command"),
    Key("leases-file", "/var/db/dhcpd_leases", PATH, "bootpd's lease file"),
    Key("guest-ssh-port", 22, _bounded(1, 65535), "the VM's sshd port"),
    Key("start-timeout", 180, _bounded(1, 3600), "seconds a boot may take to reach a working sshd"),
    Key("ephemeral", False, BOOLEAN, "boot every time from a fresh copy of base.img"),
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

    @property
    def builderPort(self) -> int:
        """
        The port clients reach the builder on.  A C{tcp:} endpoint in C{listen} names it
        and wins, since that is where the daemon really accepts; an adopted socket
        (C{launchd:}, C{systemd:}) names none, and then C{port} says which one launchd bound.
        """
        named = listenPort(self.listen)
        return named if named is not None else self.port


assert {f.name for f in fields(Config)} == {key.attribute for key in KEYS}


def listenPort(description: str) -> int | None:
    """
    The port a C{tcp:}/C{tcp6:} server endpoint string binds (C{tcp:31222:interface=...} or
    C{tcp:port=31222}), or C{None} for any other kind.  Colons escaped with a backslash
    (an IPv6 interface) do not split fields, as in Twisted's own parser.
    """
    parts = re.split(r"(?<!\\):", description)
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2:
        return None
    candidates = [p.partition("=")[2] for p in parts[1:] if p.startswith("port=")]
    candidates.append(parts[1])
    for candidate in candidates:
        if candidate.isascii() and candidate.isdigit() and 0 < int(candidate) <= 65535:
            return int(candidate)
    return None


def fromMapping(document: object) -> Config:
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


def readFile(path: str) -> dict[str, Any]:
    """
    Read the JSON config file into a plain dict (not yet validated).  The file is opened
    without blocking and must be a regular file of sane size: a FIFO or a device given by
    mistake is refused, not read forever.

    @raise ConfigError: when the file cannot be read or is not a JSON object.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(None, f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(None, f"cannot read {_shown(path)}: {e}") from None
    try:
        info = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise ConfigError(None, f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(None, f"{path} is a directory: give the JSON config file in it")
        raise ConfigError(None, f"{path} is not a regular file")
    # Only a regular file is handed to fdopen, which refuses a directory with a traceback.
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(None, f"{path} is {info.st_size} bytes: too large for a config")
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise ConfigError(None, f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(None, f"{path} is not UTF-8 text") from None
    document = decodeJson(text, path)
    if not isinstance(document, dict):
        raise ConfigError(None, f"{path} must hold a JSON object, not {_describe(document)}")
    return document


def load(
    path: str | None,
    flags: Mapping[str, Any] | None = None,
    warn: Callable[[str], object] | None = None,
) -> Config:
    """
    Load the config file at C{path} (or only defaults when C{None}) with command-line flags,
    keyed by kebab-case name, laid over it: their texts as the command line gave them
    (L{virby.flags.collect}), read by each key's own L{Value}.  A flag given as the empty
    string is given, and its key's own check refuses it: C{--working-directory "$UNSET"}
    must not quietly mean the default.

    @param warn: told, in one line each, about settings that are valid but have no effect
        (L{ignoredSettings}).
    @raise ConfigError: for any mistake, naming the key.
    """
    document: dict[str, Any] = readFile(path) if path is not None else {}
    for name, given in (flags or {}).items():
        if given is not None:
            document[name] = KEYS_BY_NAME[name].fromText(given)
    config = fromMapping(document)
    if warn is not None:
        for warning in ignoredSettings(config, document):
            warn(warning)
    return config


def ignoredSettings(config: Config, given: Mapping[str, Any]) -> list[str]:
    """
    What the file or the flags set (C{given}, by key name) that the config then ignores,
    one line each: a C{port} other than the one a C{tcp:} C{listen} names (the daemon
    accepts where C{listen} says, and the commands knock there too).
    """
    warnings: list[str] = []
    named = listenPort(config.listen)
    if "port" in given and named is not None and named != config.port:
        warnings.append(
            f"port {config.port} is ignored: listen {config.listen!r} names port {named}, "
            "where the daemon accepts; set one of them to match the other"
        )
    return warnings
