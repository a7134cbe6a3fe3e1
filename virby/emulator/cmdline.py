"""
The emulator's command line: its own options first, then vfkit's, parsed the way vfkit
parses them (each value split on ``,``, each piece on its first ``=``, no escaping, unknown
keys fatal), so a command line the emulator accepts is one vfkit would accept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

MAX_UNIX_SOCKET = 103
FAULTS = ("no-lease", "duid-lease", "no-sshd")


class UsageError(Exception):
    """A command line vfkit would refuse; the message is printed and the exit status is 1."""


@dataclass
class Device:
    kind: str
    options: dict[str, str | bool]


@dataclass
class Emulated:
    """The emulator's own settings (flags before vfkit's, or environment variables)."""

    leases_file: str
    guest_port: int = 22
    boot_delay: float = 0.2
    fault: str | None = None
    crash_after: float | None = None


@dataclass
class VM:
    """vfkit's settings."""

    cpus: int = 1
    memory: int = 512
    bootloader: dict[str, str | bool] = field(default_factory=dict)
    devices: list[Device] = field(default_factory=list)
    restful_uri: str = "none://"
    nested: bool = False
    pidfile: str | None = None
    log_level: str = "info"

    def devices_of(self, kind: str) -> list[Device]:
        return [device for device in self.devices if device.kind == kind]

    def shared_dir(self, tag: str) -> str | None:
        for device in self.devices_of("virtio-fs"):
            if device.options.get("mountTag") == tag:
                return str(device.options["sharedDir"])
        return None

    @property
    def mac(self) -> str:
        return str(self.devices_of("virtio-net")[0].options.get("mac", "02:00:00:00:00:01"))

    @property
    def serial(self) -> Device | None:
        serials = self.devices_of("virtio-serial")
        return serials[0] if serials else None


def split_options(text: str) -> dict[str, str | bool]:
    """C{"efi,variable-store=/x,create"} -> C{{"efi": True, "variable-store": "/x", ...}}."""
    options: dict[str, str | bool] = {}
    for piece in text.split(","):
        key, sep, value = piece.partition("=")
        options[key] = value if sep else True
    return options


_DEVICE_KEYS: dict[str, set[str]] = {
    "virtio-blk": {"path", "readonly", "deviceId", "type"},
    "virtio-fs": {"sharedDir", "mountTag"},
    "virtio-net": {
        "nat",
        "mac",
        "fd",
        "unixSocketPath",
        "type",
        "path",
        "vfkitMagic",
        "offloading",
    },
    "virtio-serial": {"stdio", "logFilePath", "pty"},
    "virtio-rng": set(),
    "virtio-balloon": set(),
    "rosetta": {"mountTag", "install", "ignore-if-missing"},
    "virtio-vsock": {"port", "socketURL", "listen", "connect"},
}


def parse_device(text: str) -> Device:
    kind, _, rest = text.partition(",")
    if kind not in _DEVICE_KEYS:
        raise UsageError(f"unknown device type: {kind}")
    options = split_options(rest) if rest else {}
    for key in options:
        if key not in _DEVICE_KEYS[kind]:
            raise UsageError(f"unknown option for {kind} devices: {key}")
    _check_device(kind, options)
    return Device(kind, options)


def _check_device(kind: str, options: dict[str, str | bool]) -> None:
    if kind == "virtio-net":
        modes = [k for k in ("nat", "fd", "unixSocketPath", "path") if options.get(k)]
        if not modes:
            raise UsageError("one of 'nat' or 'fd' or 'unixSocketPath' must be set")
        if len(modes) > 1:
            raise UsageError("'nat' and 'fd' and 'unixSocketPath' are mutually exclusive")
    elif kind == "virtio-serial":
        if sum(1 for k in ("stdio", "logFilePath", "pty") if options.get(k)) != 1:
            raise UsageError("virtio-serial needs exactly one of 'stdio', 'logFilePath', 'pty'")
    elif kind == "virtio-blk":
        if not options.get("path"):
            raise UsageError("virtio-blk needs a 'path'")
        if not os.path.exists(str(options["path"])):
            raise UsageError(f"virtio-blk: {options['path']}: no such file or directory")
    elif kind == "virtio-fs":
        if not options.get("sharedDir") or not options.get("mountTag"):
            raise UsageError("virtio-fs needs 'sharedDir' and 'mountTag'")
    elif kind == "rosetta" and not options.get("mountTag"):
        raise UsageError("rosetta needs a 'mountTag'")


def check_restful_uri(uri: str) -> None:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise UsageError(f"invalid restful URI: {uri}")
    if scheme == "none":
        return
    if scheme == "unix":
        if not rest.startswith("/"):
            raise UsageError("unix restful URI needs an absolute path and no host")
        if len(rest) > MAX_UNIX_SOCKET:
            raise UsageError(f"restful URI path is too long ({len(rest)} > {MAX_UNIX_SOCKET})")
    elif scheme in ("tcp", "http"):
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or "/" in port:
            raise UsageError("tcp restful URI needs a host and a port, and no path")
    else:
        raise UsageError(f"unsupported restful URI scheme: {scheme}")


def _environment(name: str) -> str | None:
    return os.environ.get(f"VIRBY_EMULATOR_{name}") or None


def parse(argv: list[str]) -> tuple[Emulated, VM]:
    """Parse a whole command line.  @raise UsageError: for anything vfkit would refuse."""
    own: dict[str, Any] = {
        "leases-file": _environment("LEASES_FILE"),
        "guest-port": _environment("GUEST_PORT"),
        "boot-delay": _environment("BOOT_DELAY"),
        "fault": _environment("FAULT"),
    }
    vm = VM()
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        if name in ("--nested", "-n"):
            vm.nested = True
            continue
        if name == "--version":
            raise SystemExit(print("vfkit version: v0.6.4 (virby emulator)") or 0)
        if not eq:
            if not args:
                raise UsageError(f"flag needs an argument: {name}")
            inline = args.pop(0)
        if name.lstrip("-") in own:
            own[name.lstrip("-")] = inline
        elif name in ("--cpus", "-c"):
            vm.cpus = _number(name, inline)
        elif name in ("--memory", "-m"):
            vm.memory = _number(name, inline)
        elif name in ("--bootloader", "-b"):
            vm.bootloader = _bootloader(inline)
        elif name in ("--device", "-d"):
            vm.devices.append(parse_device(inline))
        elif name == "--restful-uri":
            check_restful_uri(inline)
            vm.restful_uri = inline
        elif name == "--pidfile":
            vm.pidfile = inline
        elif name == "--log-level":
            if inline not in ("debug", "info", "error"):
                raise UsageError(f"invalid log level: {inline}")
            vm.log_level = inline
        else:
            raise UsageError(f"unknown flag: {name}")
    if not vm.bootloader:
        raise UsageError("missing bootloader configuration")
    if not vm.devices_of("virtio-net"):
        raise UsageError("the emulator needs a virtio-net device to give the guest an address")
    return _emulated(own), vm


def _number(name: str, text: str) -> int:
    if not text.isdigit():
        raise UsageError(f'invalid argument "{text}" for "{name}" flag')
    return int(text)


def _bootloader(text: str) -> dict[str, str | bool]:
    options = split_options(text)
    if "efi" not in options:
        raise UsageError("the emulator boots only 'efi' bootloaders")
    for key in options:
        if key not in ("efi", "variable-store", "create"):
            raise UsageError(f"unknown option for efi bootloader: {key}")
    store = options.get("variable-store")
    if not isinstance(store, str) or not store:
        raise UsageError("efi bootloader needs a 'variable-store'")
    if not options.get("create") and not os.path.exists(store):
        raise UsageError(f"EFI variable store {store} does not exist (pass 'create')")
    return options


def _emulated(own: dict[str, Any]) -> Emulated:
    if not own["leases-file"]:
        raise UsageError("no lease file: pass --leases-file or set VIRBY_EMULATOR_LEASES_FILE")
    settings = Emulated(leases_file=own["leases-file"])
    if own["guest-port"]:
        settings.guest_port = _number("--guest-port", own["guest-port"])
    if own["boot-delay"]:
        try:
            settings.boot_delay = float(own["boot-delay"])
        except ValueError:
            raise UsageError(f"invalid boot delay: {own['boot-delay']}") from None
    fault = own["fault"]
    if fault:
        if fault.startswith("crash-after="):
            try:
                settings.crash_after = float(fault.partition("=")[2])
            except ValueError:
                raise UsageError(f"invalid fault: {fault}") from None
        elif fault in FAULTS:
            settings.fault = fault
        else:
            raise UsageError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}, crash-after=N")
    return settings
