"""
The Nix configuration of the tests and benchmarks: what a fresh Debian machine lacks.

Debian's C{nix-bin} ships no C{/etc/nix/nix.conf}, so a Nix run as root wants the build users
of a multi-user install ("the group 'nixbld' specified in 'build-users-group' does not
exist") and first tries cache.nixos.org, which a machine without internet retries for every
call.  Rather than change the machine, every Nix call of the tests gets its own
configuration directory (C{NIX_CONF_DIR}), and so does the emulated guest's Nix: the
emulator passes C{NIX_CONF_DIR} on to its guest's SSH sessions, standing in for the real
VM's own C{/etc/nix/nix.conf}.
"""

from __future__ import annotations

from pathlib import Path

#: Build as the calling user, no binary cache, and no sandbox: the derivations the tests
#: build run /bin/sh from the host, which a sandbox would not have.
NIX_CONF = """\
build-users-group =
substituters =
sandbox = false
"""


def nix_environment(root: Path) -> dict[str, str]:
    """Variables to add to the environment of Nix (and of the daemon) for a test under C{root}."""
    directory = root / "nix-conf"
    directory.mkdir(exist_ok=True)
    (directory / "nix.conf").write_text(NIX_CONF)
    return {"NIX_CONF_DIR": str(directory)}
