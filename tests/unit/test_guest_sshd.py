"""
The VM's sshd settings that the emulated guest shares with the image
(C{virby/guest-sshd.json}, read by C{nix/image.nix} too): its limit on connections that have
not logged in yet must hold every connection the daemon may open at once on a Mac.
"""

from __future__ import annotations

import resource

from twisted.internet.selectreactor import SelectReactor

from virby.daemon.capacity import adjustDescriptorLimit
from virby.emulator.guest import imageSshdSettings, sshdConfig

#: What the nix-darwin module asks launchd for (SoftResourceLimits.NumberOfFiles).
LAUNCHD_SOFT_LIMIT = 4096


def mac_connection_cap() -> int:
    """The most connections the daemon serves at once under launchd on a Mac, where Twisted's
    default reactor is the select reactor."""
    reactor = SelectReactor.__new__(SelectReactor)  # the type is all that counts
    limit = adjustDescriptorLimit(
        reactor,
        getrlimit=lambda which: (LAUNCHD_SOFT_LIMIT, resource.RLIM_INFINITY),
        setrlimit=lambda which, limits: None,
    )
    return limit.connections


def test_the_guest_sshd_refuses_none_of_the_daemons_connections() -> None:
    """
    sshd's MaxStartups is N, or start:rate:full, where past `start` unauthenticated
    connections are refused at random: within the daemon's cap, none may be.
    """
    value = str(imageSshdSettings()["MaxStartups"])
    start, *rest = (int(part) for part in value.split(":"))
    full = rest[-1] if rest else start
    cap = mac_connection_cap()
    assert cap == 480
    assert start >= cap and full >= start, f"MaxStartups {value} below the daemon's {cap}"


def test_the_emulated_guest_takes_the_images_settings_and_no_limit_of_its_own() -> None:
    lines = sshdConfig("/etc-of-guest", "127.0.0.2", 22).splitlines()
    for key, value in imageSshdSettings().items():
        rendered = ("yes" if value else "no") if isinstance(value, bool) else str(value)
        assert lines.count(f"{key} {rendered}") == 1
        assert [line for line in lines if line.split()[0] == key] == [f"{key} {rendered}"]
    assert not [line for line in lines if line.startswith("MaxSessions")]
