"""
What vfkit checks when it turns the parsed configuration into a Virtualization.framework
VM (vfkit v0.6.3 C{pkg/vf}, through C{Code-Hex/vz} v3.7.1), in vfkit's order: the EFI
variable store first, then each device in command-line order.  Effects happen in that order
too: a console file is truncated even when a later device is refused.

Where the check is Apple's own (a C{NSError} from the framework), the emulator cannot know
the framework's wording: those messages keep vz's C{Error Domain=... Description=...} shape
with the emulator's description, and say so in C{docs/vfkit.md}.
"""

from __future__ import annotations

import os
import sys
import termios
import time
from typing import IO

from virby.emulator.cmdline import UsageError
from virby.emulator.golang import osError, strerror, vfkitLog
from virby.emulator.vmconfig import VM, Bootloader, Device
from virby.hostfacts import ROSETTA_MIN_MACOS, PlayedMac, gather

#: A virtio-fs tag must be non-empty and fewer than 36 bytes in UTF-8 (Apple's
#: C{+[VZVirtioFileSystemDeviceConfiguration validateTag:error:]}, see docs/vfkit.md).
TAG_LIMIT = 36

#: The install error the played Mac gives: it installs nothing, and says it is the emulator.
CANNOT_INSTALL_ROSETTA = "virby emulator: cannot install Rosetta"

#: The code of the error the framework's C{-[VZLinuxRosettaDirectoryShare initWithError:]}
#: gives without Rosetta.  Apple's code and wording are not in any source read here: this
#: is vz's C{ErrorNotSupported}, the emulator's choice, and the description says whose it is.
ROSETTA_SHARE_ERROR_CODE = 10

#: What the emulator writes as a fresh EFI variable store.
BLANK_STORE = b"virby emulator: a blank EFI variable store\n"


def nestedSupported(played: PlayedMac) -> bool:
    """vz's C{IsNestedVirtualizationSupported}: macOS 15 or later on hardware that has it."""
    return gather(played).nestedVirtualization().ok is True


def _nsError(domain: str, code: int, description: str) -> UsageError:
    """vz's rendering of a framework C{NSError}; the description is the emulator's."""
    return UsageError(
        f'Error Domain={domain} Code={code} Description="{description}" UserInfo={{}}'
    )


def validateTag(tag: str) -> None:
    """C{vz.NewVirtioFileSystemDeviceConfiguration} asks the framework to validate the tag."""
    size = len(tag.encode())
    if size == 0 or size >= TAG_LIMIT:
        raise _nsError(
            "VZErrorDomain",
            2,
            f"Invalid virtio file system tag {tag!r} ({size} bytes): it must be non-empty "
            f"and shorter than {TAG_LIMIT} bytes in UTF-8",
        )


class Console:
    """The guest's serial console: a log file (truncated at start) or vfkit's stdout."""

    def __init__(self, out: IO[str] | None) -> None:
        self._out = out
        self._start = time.monotonic()

    def line(self, text: str) -> None:
        if self._out is not None:
            self._out.write(f"[{time.monotonic() - self._start:10.6f}] {text}\n")
            self._out.flush()


def realize(vm: VM, played: PlayedMac, stdin: int = 0) -> Console:
    """
    vfkit's C{vf.NewVirtualMachine}: refuse what the framework refuses, in its order.

    @param stdin: the file descriptor vfkit would put into raw mode for a C{stdio} console.
    @raise UsageError: with vfkit's text for the first refusal.
    """
    _efiVariableStore(vm.bootloader)
    console = Console(None)
    for device in vm.devices:
        if device.kind == "virtio-blk":
            _stat(device["path"])
        elif device.kind == "virtio-fs":
            _virtioFs(device)
        elif device.kind == "virtio-serial":
            console = _serial(device, stdin)
        elif device.kind == "rosetta":
            _rosetta(device, played)
    return console


def _stat(path: str) -> None:
    try:
        os.stat(path)
    except OSError as e:
        raise UsageError(osError("stat", path, e)) from None


def _efiVariableStore(bootloader: Bootloader) -> None:
    """
    C{pkg/vf/bootloader.go} C{toVzEFIBootloader}: with C{create}, vz makes the store with
    C{VZEFIVariableStoreInitializationOptionAllowOverwrite}, so an existing store is
    replaced by a blank one at every start; without it, the file must exist (C{os.Stat}).
    """
    path = bootloader.variable_store
    if not bootloader.create:
        _stat(path)
        return
    try:
        with open(path, "wb") as f:
            f.write(BLANK_STORE)
    except OSError as e:
        raise _nsError("NSCocoaErrorDomain", 4, f"cannot create {path}: {e.strerror}") from None


def _virtioFs(device: Device) -> None:
    """C{VirtioFs.toVz}: a shared directory that exists, and a valid tag (its base name
    when no C{mountTag} is given)."""
    shared = device["sharedDir"]
    if not shared:
        raise UsageError("missing mandatory 'sharedDir' option for virtio-fs device")
    device.fields["tag"] = device["mountTag"] or _goBase(shared)
    _stat(shared)
    validateTag(device["tag"])


def _goBase(path: str) -> str:
    """Go's C{filepath.Base}."""
    stripped = path.rstrip("/")
    if not path:
        return "."
    if not stripped:
        return "/"
    return stripped.rsplit("/", 1)[-1]


def _serial(device: Device, stdin: int) -> Console:
    """
    C{VirtioSerial.toVz} (C{pkg/vf/virtio.go}): C{stdio} puts stdin into raw mode with
    C{setRawMode}, whose C{tcgetattr} fails unless stdin is a terminal; a log file is
    opened with C{append: false}, so it is created or truncated now.
    """
    if device["stdio"]:
        _setRawMode(stdin)
        return Console(sys.stdout)
    path = device["logFilePath"]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise _nsError("NSPOSIXErrorDomain", e.errno or 5, osError("open", path, e)) from None
    return Console(os.fdopen(fd, "w"))


def _setRawMode(fd: int) -> None:
    """C{setRawMode}: no echo, no canonical input, no CR-to-NL; vfkit never restores it."""
    try:
        attributes = termios.tcgetattr(fd)
    except termios.error as e:
        raise UsageError(strerror(e.args[0])) from None
    attributes[0] &= ~termios.ICRNL
    attributes[3] &= ~(termios.ICANON | termios.ECHO)
    termios.tcsetattr(fd, termios.TCSANOW, attributes)


def _rosetta(device: Device, played: PlayedMac) -> None:
    """
    C{pkg/vf/rosetta_arm64.go} (C{rosetta_amd64.go} on Intel): the share needs a tag,
    Rosetta available on this Mac (vz's C{LinuxRosettaDirectoryShareAvailability}: not
    supported before macOS 13 or off Apple silicon, else installed or not), then the share
    itself (vz's C{NewLinuxRosettaDirectoryShare}), then a valid tag.

    When Rosetta is missing: without C{install}, C{rosetta is not installed}, whatever
    C{ignore-if-missing} says; with C{install}, vfkit asks the framework to install it (the
    played Mac never can), and when that fails, without C{ignore-if-missing} it ends with
    C{failed to install rosetta: ...}; with it, vfkit logs that it goes on without Rosetta,
    prints the install error, and goes on to make the share anyway, which the framework
    refuses while Rosetta is not installed: so C{ignore-if-missing} never boots a VM here.
    """
    if not played.appleSilicon:
        raise UsageError("rosetta is unsupported on non-arm64 platforms")
    if not device["mountTag"]:
        raise UsageError("missing mandatory 'mountTage' option for rosetta share")
    version = played.macosVersion
    if version is not None and version < ROSETTA_MIN_MACOS:
        raise UsageError("rosetta is not supported")
    if played.rosetta != "installed":
        if not device["install"]:
            raise UsageError("rosetta is not installed")
        if not device["ignoreIfMissing"]:
            raise UsageError(f"failed to install rosetta: {CANNOT_INSTALL_ROSETTA}")
        vfkitLog("info", "Rosetta installation failed. Continuing without Rosetta.")
        sys.stderr.write(f"{CANNOT_INSTALL_ROSETTA}\n")
        sys.stderr.flush()
        refused = _nsError(
            "VZErrorDomain",
            ROSETTA_SHARE_ERROR_CODE,
            "virby emulator: Rosetta is not installed, so there is no Rosetta share",
        )
        raise UsageError(f"failed to create a new rosetta directory share: {refused}")
    try:
        validateTag(device["mountTag"])
    except UsageError as e:
        raise UsageError(
            f"failed to create a new virtio file system configuration for rosetta: {e}"
        ) from None
