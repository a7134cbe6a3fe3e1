"""
What vfkit makes of its flags before it touches Virtualization.framework: the bootloader,
the devices and the time sync, checked with vfkit v0.6.3's own rules and error texts
(C{pkg/config/bootloader.go}, C{pkg/config/virtio.go}, C{pkg/config/config.go}).

Each device value is split on C{,} (no quoting, no escaping: a comma can never be part of a
path), each piece on its first C{=}; empty pieces are skipped; a key given twice keeps its
last value.  Checks that need the Mac (files, the console, Rosetta, tags) come later, in
L{virby.emulator.vz}, where vfkit makes them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from virby.emulator.cmdline import EmulatorError, UsageError
from virby.emulator.golang import NumError, macString, osError, parseMac, parseUint

QCOW2_MAGIC = b"QFI\xfb"


@dataclass
class Device:
    """One C{--device}: its kind and what its options said, by field name."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.fields.get(name)


@dataclass
class Bootloader:
    """vfkit's C{EFIBootloader}."""

    variable_store: str = ""
    create: bool = False


@dataclass
class VM:
    """vfkit's C{config.VirtualMachine}, plus the flags that are not part of it."""

    cpus: int = 1
    memory: int = 512
    bootloader: Bootloader = field(default_factory=Bootloader)
    devices: list[Device] = field(default_factory=list)
    timesync_port: int | None = None
    nested: bool = False
    restful_uri: str = "none://"
    pidfile: str = ""

    def devicesOf(self, kind: str) -> list[Device]:
        return [device for device in self.devices if device.kind == kind]

    def sharedDir(self, tag: str) -> str | None:
        for device in self.devicesOf("virtio-fs"):
            if (device["tag"] or device["mountTag"]) == tag:
                return str(device["sharedDir"])
        return None

    @property
    def disk(self) -> Device | None:
        """The boot disk: the first virtio-blk device."""
        disks = self.devicesOf("virtio-blk")
        return disks[0] if disks else None

    @property
    def serial(self) -> Device | None:
        serials = self.devicesOf("virtio-serial")
        return serials[0] if serials else None

    @property
    def mac(self) -> str | None:
        nets = self.devicesOf("virtio-net")
        return nets[0]["mac"] if nets else None


def options(pieces: list[str]) -> list[tuple[str, str]]:
    """vfkit's C{strvToOptions}: skip empty pieces, split each on its first C{=}."""
    return [(key, value) for key, _, value in (p.partition("=") for p in pieces if p)]


# -- the bootloader (pkg/config/bootloader.go, BootloaderFromCmdLine / FromOptions)


def bootloaderFromCmdline(values: list[str]) -> Bootloader:
    if not values:
        raise UsageError("empty option list in --bootloader command line argument")
    kind = values[0]
    if kind in ("linux", "macos"):
        raise EmulatorError(f"the emulator boots only 'efi' bootloaders, not {kind!r}")
    if kind != "efi":
        raise UsageError(f"unknown bootloader type: {kind}")
    bootloader = Bootloader()
    for key, value in options(values[1:]):
        if key == "variable-store":
            bootloader.variable_store = value
        elif key == "create":
            if value:
                raise UsageError(f"unexpected value for EFI bootloader 'create' option: {value}")
            bootloader.create = True
        else:
            raise UsageError(f"unknown option for EFI bootloaders: {key}")
    return bootloader


# -- --timesync (pkg/config/config.go, timesyncFromCmdLine / TimeSync.FromOptions)


def timesyncFromCmdline(text: str) -> int | None:
    """The vsock port of C{--timesync vsockPort=N}; C{None} when the flag is empty."""
    if not text:
        return None
    port = 0
    for key, value in options(text.split(",")):
        if key != "vsockPort":
            raise UsageError(f"unknown option for timesync parameter: {key}")
        try:
            port = parseUint(value, 10, 32)
        except NumError as e:
            raise UsageError(str(e)) from None
    if port == 0:
        raise UsageError("missing 'vsockPort' option for timesync parameter")
    return port


# -- devices (pkg/config/virtio.go, deviceFromCmdLine and each FromOptions)

_NOT_EMULATED = ("nvme", "usb-mass-storage", "virtio-input", "virtio-gpu", "nbd")


def deviceFromCmdline(text: str) -> Device:
    pieces = text.split(",")
    kind, parsed = pieces[0], options(pieces[1:])
    parsers = {
        "virtio-blk": _virtioBlk,
        "virtio-fs": _virtioFs,
        "virtio-net": _virtioNet,
        "virtio-serial": _virtioSerial,
        "virtio-rng": _noOptions,
        "virtio-balloon": _noOptions,
        "virtio-vsock": _virtioVsock,
        "rosetta": _rosetta,
    }
    if kind in _NOT_EMULATED:
        raise EmulatorError(f"{kind} devices are not emulated")
    if kind not in parsers:
        raise UsageError(f"unknown device type: {kind}")
    device = Device(kind)
    parsers[kind](device, parsed)
    return device


def _noOptions(device: Device, parsed: list[tuple[str, str]]) -> None:
    if parsed:
        shown = " ".join(f"{{{key} {value}}}" for key, value in parsed)
        raise UsageError(f"unknown options for {device.kind} devices: [{shown}]")


def _virtioBlk(device: Device, parsed: list[tuple[str, str]]) -> None:
    device.fields.update(path="", type="", readonly=False, deviceId="")
    for key, value in parsed:
        if key == "deviceId":
            device.fields["deviceId"] = value
        elif key == "path":
            device.fields["path"] = value
        elif key == "type":
            if value not in ("image", "dev", ""):
                raise UsageError(f"unexpected value for disk 'type' option: {value}")
            device.fields["type"] = value
        elif key == "readonly":
            if value:
                raise UsageError(f"unexpected value for virtio-blk 'readonly' option: {value}")
            device.fields["readonly"] = True
        else:
            raise UsageError(f"unknown option for virtio-blk devices: {key}")
    _checkDiskHeader(device["path"])
    if device["type"] == "dev":
        raise EmulatorError("virtio-blk type=dev (a host block device) is not emulated")


def _checkDiskHeader(path: str) -> None:
    """C{VirtioBlk.validate}: the file opens, has a first byte, and is not qcow2."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"failed to open file {path}: {osError('open', path, e)}") from None
    try:
        header = os.read(fd, 4)
    except OSError as e:
        raise UsageError(
            f"failed to read the header of file {path}: {osError('read', path, e)}"
        ) from None
    finally:
        os.close(fd)
    if not header:
        raise UsageError(f"failed to read the header of file {path}: EOF")
    if header == QCOW2_MAGIC:
        raise UsageError("vfkit does not support qcow2 image format")


def _virtioFs(device: Device, parsed: list[tuple[str, str]]) -> None:
    device.fields.update(sharedDir="", mountTag="")
    for key, value in parsed:
        if key not in ("sharedDir", "mountTag"):
            raise UsageError(f"unknown option for virtio-fs devices: {key}")
        device.fields[key] = value


def _virtioNet(device: Device, parsed: list[tuple[str, str]]) -> None:
    fields = device.fields
    fields.update(nat=False, mac=None, fd=None, unixSocketPath="", vfkitMagic=False)
    has_type, type_only = False, []
    if any(key in ("path", "unixSocketPath") for key, _ in parsed):
        fields["vfkitMagic"] = True
    for key, value in parsed:
        if key == "nat":
            if value:
                raise UsageError(f"unexpected value for virtio-net 'nat' option: {value}")
            fields["nat"] = True
        elif key == "mac":
            try:
                fields["mac"] = macString(parseMac(value))
            except ValueError as e:
                raise UsageError(str(e)) from None
        elif key == "fd":
            fields["fd"] = _atoi(value)
        elif key == "unixSocketPath":
            fields["unixSocketPath"] = value
        elif key == "type":
            if value != "unixgram":
                raise UsageError(
                    f"unsupported virtio-net type: {value} (only 'unixgram' is supported)"
                )
            has_type = True
        elif key == "path":
            fields["unixSocketPath"] = value
            type_only.append(key)
        elif key == "vfkitMagic":
            if value not in ("on", "off"):
                raise UsageError(f"invalid value for vfkitMagic: {value} (expected on/off)")
            fields["vfkitMagic"] = value == "on"
        elif key == "offloading":
            if value != "off":
                raise UsageError(f"invalid value for offloading: {value} (only 'off' is supported)")
            type_only.append(key)
        else:
            raise UsageError(f"unknown option for virtio-net devices: {key}")
    if has_type and not fields["unixSocketPath"]:
        raise UsageError("'type' option requires 'path' to be specified")
    if not has_type and type_only:
        raise UsageError(f"'{type_only[0]}' option requires 'type' to be specified")
    socket = fields["fd"] is not None
    if fields["nat"] and socket:
        raise UsageError("'nat' and 'fd' cannot be set at the same time")
    if fields["nat"] and fields["unixSocketPath"]:
        raise UsageError("'nat' and 'unixSocketPath' cannot be set at the same time")
    if socket and fields["unixSocketPath"]:
        raise UsageError("'fd' and 'unixSocketPath' cannot be set at the same time")
    if not fields["nat"] and not socket and not fields["unixSocketPath"]:
        raise UsageError("one of 'nat' or 'fd' or 'unixSocketPath' must be set")
    if not fields["nat"]:
        raise EmulatorError("only 'nat' networking is emulated")


def _atoi(text: str) -> int:
    """Go's C{strconv.Atoi}, as far as a file descriptor number needs."""
    body = text[1:] if text[:1] in "+-" else text
    if not body.isdigit() or not body.isascii():
        raise UsageError(f'strconv.Atoi: parsing "{text}": invalid syntax')
    return int(text)


def _virtioSerial(device: Device, parsed: list[tuple[str, str]]) -> None:
    fields = device.fields
    fields.update(logFilePath="", stdio=False, pty=False)
    for key, value in parsed:
        if key == "logFilePath":
            fields["logFilePath"] = value
        elif key == "stdio":
            if value:
                raise UsageError(f"unexpected value for virtio-serial 'stdio' option: {value}")
            fields["stdio"] = True
        elif key == "pty":
            fields["pty"] = True
        else:
            raise UsageError(f"unknown option for virtio-serial devices: {key}")
    log, stdio, pty = fields["logFilePath"], fields["stdio"], fields["pty"]
    if log and stdio:
        raise UsageError("'logFilePath' and 'stdio' cannot be set at the same time")
    if log and pty:
        raise UsageError("'logFilePath' and 'pty' cannot be set at the same time")
    if stdio and pty:
        raise UsageError("'stdio' and 'pty' cannot be set at the same time")
    if not (log or stdio or pty):
        raise UsageError("one of 'logFilePath', 'stdio' or 'pty' must be set")
    if pty:
        raise EmulatorError("virtio-serial,pty is not emulated")


def _virtioVsock(device: Device, parsed: list[tuple[str, str]]) -> None:
    device.fields.update(port=0, socketURL="", listen=True)
    for key, value in parsed:
        if key == "socketURL":
            device.fields["socketURL"] = value
        elif key == "port":
            try:
                device.fields["port"] = parseUint(value, 10, 32)
            except NumError as e:
                raise UsageError(str(e)) from None
        elif key in ("listen", "connect"):
            device.fields["listen"] = key == "listen"
        else:
            raise UsageError(f"unknown option for virtio-vsock devices: {key}")


def _rosetta(device: Device, parsed: list[tuple[str, str]]) -> None:
    device.fields.update(mountTag="", install=False, ignoreIfMissing=False)
    for key, value in parsed:
        if key == "mountTag":
            device.fields["mountTag"] = value
        elif key == "install":
            device.fields["install"] = True
        elif key == "ignore-if-missing":
            device.fields["ignoreIfMissing"] = True
        else:
            raise UsageError(f"unknown option for rosetta share: {key}")


def writePidfile(path: str) -> None:
    """C{process.WritePidFile}: the pid, no newline, mode 0600; never removed by vfkit."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise UsageError(f"could not write PID: {osError('open', path, e)}") from None
    with contextlib.closing(os.fdopen(fd, "w")) as f:
        f.write(str(os.getpid()))
