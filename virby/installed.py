"""
What is installed for the daemon now, as opposed to what a running daemon started with: its
config file, the image and keys C{virby prepare} made, and the Virby package itself.

The launchd job names stable paths (C{/etc/virby/virbyd --config /etc/virby/config.json}, see
C{nix/module.nix}), so a switch that brings a new image, config or Virby leaves the job
alone and the daemon running: nix-darwin would otherwise reload it, cutting every build
running through it.  The daemon reads this at start and again when C{virby prepare} asks it
to renew (L{virby.daemon.lifecycle.Lifecycle.renew}); what differs says whether it must move,
and the renewal's reply names it for the person at the switch.

The package is told, not read: the program launchd starts cannot say which path it was
started as (nixpkgs' Python wrapper sets C{sys.argv[0]} to the script's own store path, and
the kernel drops the original C{argv[0]} of an interpreted script), so the command that
asks for the renewal, which runs from the package the switch installed, names its own
package directory (L{packageDirectory}), and the daemon compares it with its own.

Pure reads of a few small files: no reactor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from virby.layout import HOST_PUBLIC_KEY, IMAGE_RECORD


@dataclass(frozen=True)
class Installed:
    """
    One reading.  C{None} is a file that could not be read, or a part not known (no config
    file, or an unreadable one).

    @ivar config: the config file's bytes.
    @ivar image: what C{image-path} records: the image the disks were made from.
    @ivar keys: the VM's public host key, which changes with every new set of keys.
    """

    config: bytes | None
    image: bytes | None
    keys: bytes | None

    def changesSince(self, before: Installed) -> list[str]:
        """What differs from C{before}, named for a person, in a fixed order."""
        return [
            _NAMES[field.name]
            for field in fields(self)
            if getattr(self, field.name) != getattr(before, field.name)
        ]


_NAMES = {
    "config": "config",
    "image": "image",
    "keys": "SSH keys",
}


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def readInstalled(configFile: str | None, workingDirectory: str) -> Installed:
    """
    Read what is installed now.

    @param configFile: the config file the daemon was given, or C{None} for none.
    """
    return Installed(
        config=_read(configFile),
        image=_read(os.path.join(workingDirectory, IMAGE_RECORD)),
        keys=_read(os.path.join(workingDirectory, HOST_PUBLIC_KEY)),
    )


#: How the renewal names a new Virby package.
PACKAGE = "Virby package"


def packageDirectory() -> str:
    """
    Where this Virby's code is, its links resolved: a store path under Nix, which changes
    with every new package.
    """
    import virby

    return os.path.realpath(os.path.dirname(virby.__file__))


def describeChanges(changes: list[str]) -> str:
    """C{["image", "SSH keys"]} as C{"new image and SSH keys"}."""
    if not changes:
        return "nothing new"
    if len(changes) == 1:
        return f"new {changes[0]}"
    return f"new {', '.join(changes[:-1])} and {changes[-1]}"
