"""
Find the VM's address in bootpd's lease file (C{/var/db/dhcpd_leases}).

Virtualization.framework's NAT hands out addresses with macOS's bootpd, which records each
lease as a brace-delimited block of C{key=value} lines, newest first.  Two traps shape this
parser: bootpd prints MAC octets with C{%x} (C{52:54:0:12:3:a}), so MACs are compared as
bytes, not strings; and when a guest sends a DUID as its DHCP client id, bootpd records
that instead of the MAC (C{hw_address=ff,...}), so only C{1,} (Ethernet) entries can match.
The file is rewritten while we read it, so a block without its closing brace still counts.

The daemon reads the file on its reactor several times a second while a VM boots, so the read
must never block: it is opened with C{O_NONBLOCK} and read only when it is a regular file of
sane size (a FIFO put there by mistake would otherwise freeze the whole daemon), and with
C{O_NOFOLLOW}, so a symbolic link in its place is refused, not followed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from virby.errors import VirbyError, clip

#: The hostname Virby's image sends with DHCP, which bootpd records as the lease's C{name}.
GUEST_HOSTNAME = "virby-vm"

#: bootpd's file for a /24 pool holds a few hundred leases of ~150 bytes; far more than that
#: is not a lease file.
MAX_LEASE_FILE_BYTES = 16 * 1024 * 1024


#: How the file is opened: never blocking (a FIFO), never taking a terminal, and never
#: through a symbolic link as its last component, so the daemon reads bootpd's file and
#: nothing a link there points it at (C{/var} itself is a link on macOS, which is fine:
#: only the last component is refused).
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW


class LeaseFileError(VirbyError):
    """The lease file exists but cannot be read."""


def normalizeMac(text: str) -> str | None:
    """C{"52:54:0:12:3:A"} -> C{"52:54:00:12:03:0a"}; C{None} when C{text} is not a MAC."""
    parts = text.strip().split(":")
    if len(parts) != 6:
        return None
    octets = []
    for part in parts:
        if not 1 <= len(part) <= 2:
            return None
        try:
            octets.append(int(part, 16))
        except ValueError:
            return None
    return ":".join(f"{octet:02x}" for octet in octets)


@dataclass(frozen=True)
class Lease:
    """
    One lease.  C{client_id} is bootpd's C{hw_address} field as it stands, C{<htype>,<id>}:
    C{1,<mac>} for the Ethernet address the guest sent, C{ff,<duid>} when it sent a DUID;
    C{lease} is the expiry in Unix seconds (0 if garbled).
    """

    ip_address: str
    client_id: str | None
    lease: int
    name: str | None

    @property
    def mac(self) -> str | None:
        """
        The normalized MAC of an Ethernet entry; C{None} for a DUID or an unusable one.
        Derived, never stored beside C{client_id}, so the two cannot disagree.
        """
        return _hardware(self.client_id)

    @property
    def isDuid(self) -> bool:
        """bootpd recorded a DUID (type C{ff}) where the MAC should be."""
        return (self.client_id or "").strip().lower().startswith("ff,")


def _blocks(text: str) -> Iterable[dict[str, str]]:
    """The C{{ ... }} blocks as dicts, tolerating a truncated last block and stray lines."""
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line == "{":
            if current is not None:
                yield current
            current = {}
        elif line == "}":
            if current is not None:
                yield current
            current = None
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), value.strip())
    if current is not None:
        yield current


def _hardware(value: str | None) -> str | None:
    if not value:
        return None
    kind, sep, address = value.partition(",")
    if not sep or kind.strip() != "1":
        return None
    return normalizeMac(address)


def _expiry(value: str | None) -> int:
    if not value:
        return 0
    try:
        return int(value, 16) if value.lower().startswith("0x") else int(value)
    except ValueError:
        return 0


def _address(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def parseLeases(text: str) -> list[Lease]:
    """Every usable lease in file order (newest first).  Never raises."""
    leases = []
    for block in _blocks(text):
        ip = _address(block.get("ip_address"))
        if ip is None:
            continue
        leases.append(
            Lease(
                ip_address=ip,
                client_id=block.get("hw_address") or None,
                lease=_expiry(block.get("lease")),
                name=block.get("name") or None,
            )
        )
    return leases


def newestIp(leases: Iterable[Lease], mac: str) -> str | None:
    """The address of the newest lease for C{mac}: largest expiry, first in file on ties."""
    wanted = normalizeMac(mac)
    best: Lease | None = None
    for lease in leases:
        if lease.mac == wanted and (best is None or lease.lease > best.lease):
            best = lease
    return best.ip_address if best else None


class LeaseFile:
    """
    The lease file, re-parsed only when it changed: the daemon asks several times a second
    while a VM boots, and the file can hold hundreds of stale leases.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._leases: list[Lease] = []

    def lookup(self, mac: str) -> str | None:
        """The VM's current address, or C{None} while it has no lease (or no file yet)."""
        return newestIp(self._read(), mac)

    def explainMissing(self, mac: str) -> str | None:
        """
        Why C{mac} has no lease when the file says more than "nothing yet": a lease named
        for the VM whose client id is a DUID means the guest sent the wrong client id, and
        no wait will ever find its MAC.  C{None} when there is nothing to explain.
        """
        try:
            leases = self._read()
        except LeaseFileError:
            return None
        if newestIp(leases, mac) is not None:
            return None
        for lease in leases:
            if lease.name == GUEST_HOSTNAME and lease.isDuid:
                return (
                    f"{self.path} holds a lease for {GUEST_HOSTNAME} ({lease.ip_address}) "
                    f"under a DUID client id (hw_address={clip(lease.client_id or '', 40)}), so "
                    "bootpd recorded no MAC: the guest must send its MAC as DHCP client id "
                    '(Virby\'s image sets dhcpcd `clientid ""` and refuses networkd, whose '
                    "client id is a DUID; rebuild the image from this version)"
                )
        return None

    def _read(self) -> list[Lease]:
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except FileNotFoundError:
            self._stamp, self._leases = None, []
            return []
        except OSError as e:
            raise LeaseFileError(self._explain(e)) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise LeaseFileError(
                    f"cannot read the lease file {self.path}: it is {_kind(info.st_mode)}, not "
                    'a regular file; set "leases-file" to bootpd\'s lease file, '
                    "/var/db/dhcpd_leases"
                )
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp == self._stamp:
                return self._leases
            if info.st_size > MAX_LEASE_FILE_BYTES:
                raise LeaseFileError(
                    f"cannot read the lease file {self.path}: {info.st_size} bytes is too large "
                    'for bootpd\'s lease file; check the "leases-file" setting'
                )
            data = _readAll(fd, MAX_LEASE_FILE_BYTES)
        except OSError as e:
            raise LeaseFileError(self._explain(e)) from None
        finally:
            os.close(fd)
        text = data.decode("utf-8", errors="replace")
        self._stamp, self._leases = stamp, parseLeases(text)
        return self._leases

    def _explain(self, error: OSError) -> str:
        if error.errno in (errno.EACCES, errno.EPERM):
            fix = "bootpd keeps it world-readable; restore that with `sudo chmod 644`"
        elif error.errno == errno.ELOOP:
            return (
                f"cannot read the lease file {self.path}: it is a symbolic link, which is "
                'not followed; set "leases-file" to bootpd\'s lease file itself, '
                "/var/db/dhcpd_leases"
            )
        elif error.errno == errno.EISDIR:
            fix = 'set "leases-file" to bootpd\'s lease file, /var/db/dhcpd_leases'
        else:
            fix = 'check the "leases-file" setting'
        return f"cannot read the lease file {self.path}: {error.strerror or error}; {fix}"


def _readAll(fd: int, limit: int) -> bytes:
    """Read a regular file to its end (at most C{limit} bytes)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = os.read(fd, 1024 * 1024)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit]


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file"
