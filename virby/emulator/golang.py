"""
Go's error texts and parsers, as vfkit's refusals show them: vfkit prints the error of the
Go call that failed, so the emulator builds the same text from the same parts.  Also
vfkit's log lines, which logrus writes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time


def vfkitLog(level: str, message: str) -> None:
    """vfkit's own log lines, on stderr, in logrus's text format."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sys.stderr.write(f'time="{stamp}" level={level} msg="{message}"\n')
    sys.stderr.flush()


def quote(text: str) -> str:
    """Go's C{%q} for the strings that meet it here (command-line values)."""
    return json.dumps(text, ensure_ascii=False)


def strerror(code: int) -> str:
    """Go's C{syscall.Errno} text: the C text with a lower-case first letter."""
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def pathError(op: str, path: str, code: int) -> str:
    """Go's C{*fs.PathError}, e.g. C{open /x: no such file or directory}."""
    return f"{op} {path}: {strerror(code)}"


def osError(op: str, path: str, error: OSError) -> str:
    return pathError(op, path, error.errno or errno.EIO)


class NumError(ValueError):
    """Go's C{*strconv.NumError}."""

    def __init__(self, function: str, text: str, why: str) -> None:
        super().__init__(f"strconv.{function}: parsing {quote(text)}: {why}")


_PREFIXES = {"0x": 16, "0o": 8, "0b": 2}


def parseUint(text: str, base: int, bits: int) -> int:
    """
    Go's C{strconv.ParseUint}: digits only (no sign, no spaces); with C{base} 0 the prefix
    chooses the base (C{0x}, C{0o}, C{0b}, or a leading C{0} for octal) and C{_} may group
    digits.  @raise NumError: C{invalid syntax} or C{value out of range}, as Go says it.
    """
    digits, chosen = text, base
    if base == 0:
        chosen, prefixed = 10, True
        lowered = text.lower()
        if lowered[:2] in _PREFIXES:
            chosen, digits = _PREFIXES[lowered[:2]], text[2:]
        elif len(text) > 1 and text[0] == "0":
            chosen, digits = 8, text[1:]
        else:
            prefixed = False
        if "_" in digits:
            grouping = r"_?[^_]+(_[^_]+)*" if prefixed else r"[^_]+(_[^_]+)*"
            if not re.fullmatch(grouping, digits):
                raise NumError("ParseUint", text, "invalid syntax")
            digits = digits.replace("_", "")
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"[:chosen]
    if not digits or any(c not in alphabet for c in digits.lower()):
        raise NumError("ParseUint", text, "invalid syntax")
    value = int(digits, chosen)
    if value >= 1 << bits:
        raise NumError("ParseUint", text, "value out of range")
    return value


def parseBool(text: str) -> bool:
    """Go's C{strconv.ParseBool}."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise NumError("ParseBool", text, "invalid syntax")


def parseMac(text: str) -> bytes:
    """
    Go's C{net.ParseMAC}: six, eight or twenty octets written as C{aa:bb:..}, C{aa-bb-..}
    or C{aabb.ccdd...}, hex digits of either case.  @raise ValueError: Go's text.
    """
    invalid = ValueError(f"address {text}: invalid MAC address")
    if len(text) < 14:
        raise invalid
    if text[2] in ":-":
        if (len(text) + 1) % 3:
            raise invalid
        groups = text.split(text[2])
        width = 2
    elif text[4] == ".":
        if (len(text) + 1) % 5:
            raise invalid
        groups = text.split(".")
        width = 4
    else:
        raise invalid
    if any(len(g) != width or not re.fullmatch(r"[0-9A-Fa-f]+", g) for g in groups):
        raise invalid
    octets = bytes.fromhex("".join(groups))
    if len(octets) not in (6, 8, 20):
        raise invalid
    return octets


def macString(octets: bytes) -> str:
    """Go's C{net.HardwareAddr.String}: lower-case, colon-separated."""
    return ":".join(f"{octet:02x}" for octet in octets)
