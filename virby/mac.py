"""
The VM's stable MAC address, kept in C{<wd>/mac}.

bootpd keys leases by MAC: upstream made a new MAC on every start and burnt a lease each
time, until the /24 pool ran dry.  One MAC per working directory keeps one lease, and bootpd
hands the same address back.
"""

from __future__ import annotations

import os

from virby.disk import writeAtomically
from virby.leases import normalizeMac
from virby.logs import Logger

log = Logger()


def randomMac() -> str:
    """A random locally administered unicast MAC (first octet: bit 1 set, bit 0 clear)."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] | 0x02) & 0xFE
    return ":".join(f"{octet:02x}" for octet in octets)


def stableMac(path: str) -> str:
    """The MAC stored at C{path}, made and stored first if missing or malformed."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            stored = normalizeMac(f.read())
    except FileNotFoundError:
        stored = None
    else:
        if stored is None:
            log.warn("{path} does not hold a MAC address: making a new one", path=path)
    if stored is not None:
        return stored
    mac = randomMac()
    writeAtomically(path, (mac + "\n").encode(), 0o644)
    return mac
