"""bootpd's lease file, written the way bootpd writes it: newest first, octets as ``%x``."""

from __future__ import annotations

import os
import re

from virby.leases import normalizeMac, parseLeases

_BLOCK = re.compile(r"\{[^{}]*\}\n?", re.S)


def bootpdMac(mac: str) -> str:
    """C{"52:54:00:12:03:0a"} -> C{"52:54:0:12:3:a"}: bootpd prints octets without padding."""
    return ":".join(f"{int(octet, 16):x}" for octet in mac.split(":"))


def block(ip: str, mac: str, expiry: int, duid: bool = False) -> str:
    """One lease.  With C{duid}, bootpd's record of a guest that sent a DUID client id."""
    if duid:
        hardware = "ff,f1:f5:dd:7f:0:2:0:0:ab:11:cb:fb:30:b0:97:b6:3a:67"
    else:
        hardware = f"1,{bootpdMac(mac)}"
    return (
        "{\n\tname=virby-vm\n"
        f"\tip_address={ip}\n\thw_address={hardware}\n\tidentifier={hardware}\n"
        f"\tlease={expiry:#x}\n}}\n"
    )


def previousAddress(path: str, mac: str) -> str | None:
    """The address bootpd gave this MAC before, so a stable MAC keeps its address."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            leases = parseLeases(f.read())
    except OSError:
        return None
    wanted = normalizeMac(mac)
    return next((lease.ip_address for lease in leases if lease.mac == wanted), None)


def write(path: str, ip: str, mac: str, expiry: int, duid: bool = False) -> None:
    """Put the new lease on top, drop older ones of the same client, replace atomically."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            existing = f.read()
    except FileNotFoundError:
        existing = ""
    ours = f"hw_address=1,{bootpdMac(mac)}\n"
    kept = [b for b in _BLOCK.findall(existing) if ours not in b and f"ip_address={ip}\n" not in b]
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(block(ip, mac, expiry, duid) + "".join(kept))
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
