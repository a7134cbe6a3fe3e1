"""
The emulated guest's inside: what it keeps on its disk, and how it takes its SSH keys.

A real VM keeps its state on its disk, C{diff.img}: a guest booted again from the same disk
remembers what it installed, and a fresh copy of C{base.img} does not.  The emulator never
reads a real image, so the guest keeps its state as one small record inside the disk file
itself, at a fixed offset, behind a magic header and a checksum.  A record and not a file
beside the disk, so that only what happens to the disk happens to the state: C{virby
prepare} copying C{base.img} over C{diff.img} forgets it, growing C{diff.img} keeps it, and a
disk the guest never wrote (no magic) is a first boot.  The offset, 64 KiB, lies in the gap
a GPT disk leaves between its partition table (the first 17 KiB) and its first partition (at
1 MiB), so the record would not touch a partition even on a real image.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from importlib import resources

from virby import layout

RECORD_OFFSET = 0x10000
RECORD_END = 0x100000
MAGIC = b"VIRBYGST"
_HEADER = struct.Struct(">8sIII")  # magic, version, payload length, crc32 of the payload
VERSION = 1
#: Where the image's sshd finds its host key, in its C{/etc/ssh} (C{nix/image.nix}).
ETC_HOST_KEY = "ssh_host_ed25519_key"
#: The image's sshd settings that the emulated guest takes as they are (its limits and the
#: ways to log in), from the one file C{nix/image.nix} reads too.
IMAGE_SSHD_SETTINGS = "guest-sshd.json"


def imageSshdSettings() -> dict[str, bool | int | str]:
    """The settings C{nix/image.nix} gives the VM's sshd from C{virby/guest-sshd.json}."""
    text = resources.files("virby").joinpath(IMAGE_SSHD_SETTINGS).read_text(encoding="utf-8")
    settings: dict[str, bool | int | str] = json.loads(text)
    return settings


def _sshdValue(value: bool | int | str) -> str:
    """A value as NixOS writes it into sshdConfig: booleans as yes and no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


@dataclass
class GuestState:
    """What the guest keeps on its disk: its sshd's keys, and how often it booted."""

    host_key: str | None = None
    authorized_keys: str | None = None
    boots: int = 0


class DiskError(Exception):
    """The guest cannot use its disk; the message is what its console would say."""


def readState(disk: str) -> GuestState:
    """The record on C{disk}, or a fresh state when there is none (or a torn one)."""
    try:
        with open(disk, "rb") as f:
            f.seek(RECORD_OFFSET)
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return GuestState()
            magic, version, length, checksum = _HEADER.unpack(header)
            if magic != MAGIC or version != VERSION:
                return GuestState()
            payload = f.read(min(length, RECORD_END - RECORD_OFFSET))
    except OSError as e:
        raise DiskError(f"cannot read {disk}: {e.strerror}") from None
    if len(payload) != length or zlib.crc32(payload) != checksum:
        return GuestState()
    try:
        return GuestState(**json.loads(payload))
    except (ValueError, TypeError):
        return GuestState()


def writeState(disk: str, state: GuestState) -> None:
    """Write the record in one go and flush it, as a journalled filesystem would."""
    payload = json.dumps(asdict(state), sort_keys=True).encode()
    record = _HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload)) + payload
    if RECORD_OFFSET + len(record) > RECORD_END:
        raise DiskError("the guest's state does not fit its record")
    try:
        fd = os.open(disk, os.O_WRONLY)
    except OSError as e:
        raise DiskError(f"cannot write {disk}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size < RECORD_END:
            raise DiskError(f"{disk} is smaller than 1 MiB: no room for a filesystem")
        os.pwrite(fd, record, RECORD_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyUnitFailed(Exception):
    """The key unit failed; sshd, which requires it, does not start."""


def installKeys(share: str | None, state: GuestState, rule: str) -> bool:
    """
    The guest's key unit, C{virby-install-keys} in C{nix/image.nix}, which this mirrors:
    at every boot, before sshd, mount the C{sshd-keys} share read-only, install the host
    key and the authorized key (each atomically), unmount.  Keys made anew by C{virby
    prepare} are therefore taken at the next boot, even from a disk that has older ones.

    C{rule="when-absent"} plays an image made before that unit ran at every boot, whose
    C{ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key} skipped it once a host key was
    installed: the guest then kept its first keys for the life of its disk.

    @return: whether the unit ran (C{False}: skipped by its condition).
    @raise KeyUnitFailed: when the share is missing or unreadable.
    """
    if rule == "when-absent" and state.host_key is not None:
        return False
    if share is None:
        raise KeyUnitFailed(f"mount: {layout.SSHD_KEYS_TAG}: no such virtiofs tag")
    try:
        with open(os.path.join(share, layout.SHARE_HOST_KEY), encoding="ascii") as f:
            host_key = f.read()
        with open(os.path.join(share, layout.SHARE_AUTHORIZED_KEY), encoding="ascii") as f:
            authorized = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyUnitFailed(f"install: cannot read the {layout.SSHD_KEYS_TAG} share: {e}") from None
    state.host_key, state.authorized_keys = host_key, authorized
    return True


def materialize(state: GuestState, etc: str) -> None:
    """Lay the installed keys out where the guest's sshd reads them (its C{/etc/ssh})."""
    if state.host_key is None or state.authorized_keys is None:
        raise KeyUnitFailed("sshd: no host key installed")
    key = os.path.join(etc, ETC_HOST_KEY)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(key)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state.host_key)
    with open(os.path.join(etc, "authorized_keys"), "w") as f:
        f.write(state.authorized_keys)


def sshdConfig(etc: str, address: str, port: int) -> str:
    """
    The emulated guest's sshd: keys only, on its own loopback address, with the image's
    own settings (C{MaxStartups} above all, so that a test sees the VM's limit).  What is
    the emulator's alone is what a process of the user running it needs: no PAM, no strict
    modes, no pid file, and root may log in with a key when that user is root.
    """
    image = [f"{key} {_sshdValue(value)}" for key, value in imageSshdSettings().items()]
    return "\n".join(
        [
            f"ListenAddress {address}:{port}",
            f"HostKey {etc}/{ETC_HOST_KEY}",
            f"AuthorizedKeysFile {etc}/authorized_keys",
            "PidFile none",
            "UsePAM no",
            "StrictModes no",
            *image,
            "PermitRootLogin prohibit-password",
            "LogLevel INFO",
            *_guestEnvironment(),
            "",
        ]
    )


def _guestEnvironment() -> list[str]:
    """
    The guest's Nix configuration.  A real VM has its own C{/etc/nix/nix.conf}; the emulated
    guest runs this host's Nix, whose configuration a test gives in C{NIX_CONF_DIR}.  sshd
    gives its sessions a fresh environment, so it is passed on explicitly.
    """
    conf = os.environ.get("NIX_CONF_DIR")
    return [f"SetEnv NIX_CONF_DIR={conf}"] if conf and " " not in conf else []
