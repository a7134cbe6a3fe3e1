"""
The C{Host virby-vm} block that the nix-darwin module installs as
C{/etc/ssh/ssh_config.d/100-virby-vm.conf}, so that C{ssh virby-vm} and Nix's builder
connections reach the VM through the daemon's port.

It is generated here, in one place, so that C{virby ssh-config} (and C{virby prepare
--print-ssh-config}, its older spelling) shows a person exactly what ssh will do, and the Nix
side (C{nix/lib/ssh-config.nix}) is checked against it.  The choices:

- C{HostName 127.0.0.1}, not C{localhost}, which can resolve to C{::1} where nothing listens.
- C{HostKeyAlias virby-vm-key} with C{StrictHostKeyChecking yes}: the VM's key is pinned
  under one name, whatever port or address it is reached by, and a mismatch is refused.
- C{IdentitiesOnly yes}: an agent holding many keys would otherwise exhaust the server's
  C{MaxAuthTries} before the right key is offered.
- No C{ConnectTimeout}: a cold boot takes seconds, during which the daemon holds the
  connection open on purpose.
- C{IdentityFile} is the client key ssh can read: with C{allow-user-ssh}, the copy every
  local user may read (L{SHARED_CLIENT_KEY}), as the module installs it; else the owner-only
  key itself, which only root (and the daemon's user) can read.
- A second C{IdentityFile}, the same name with C{.previous} (L{PREVIOUS_CLIENT_KEY}, or
  L{virby.layout.PREVIOUS_SHARED_CLIENT_KEY} with C{allow-user-ssh}): the client key of the
  set before a new image, which a VM still running that image authorizes
  (L{virby.rotation}).  ssh offers the identities in order, so the current key goes first
  and a VM on the current set never sees the other.  Most of the time the file is missing,
  which costs nothing, as OpenSSH's source shows: C{ssh.c} loads each identity's public half
  through C{check_load}, which ignores C{ENOENT} (a C{debug} line only);
  C{load_identity_file} in C{sshconnect2.c}, which runs only when the key's turn comes
  (after the current key was refused), logs C{no such identity} at C{INFO} for a file named
  in the user's own config (C{-F}, C{~/.ssh/config}, C{-i}), and at C{DEBUG3} for one from
  the system's config, where the module installs this block: there ssh says nothing.
- C{Port} is where the daemon really accepts: the port of a C{tcp:} C{listen} string when
  it names one, else C{port} (the port launchd binds for an adopted socket).
"""

from __future__ import annotations

from virby.config import Config
from virby.keys import HOST_KEY_ALIAS
from virby.layout import CLIENT_KEY, KNOWN_HOSTS, PREVIOUS_CLIENT_KEY, SHARED_CLIENT_KEY

HOST = "virby-vm"
USER = "builder"
#: What the previous client key's name adds to the current one's (L{PREVIOUS_CLIENT_KEY}).
PREVIOUS_SUFFIX = PREVIOUS_CLIENT_KEY.removeprefix(CLIENT_KEY)


def _quoted(path: str) -> str:
    """ssh_config splits arguments on white space unless they are in double quotes."""
    return f'"{path}"' if any(c.isspace() for c in path) else path


def sshConfigBlock(config: Config, identityFile: str | None = None) -> str:
    """
    The ssh_config text for C{Host virby-vm}, ending with a newline.

    @param identityFile: the client key to log in with; when C{None}, the one the module
        names: the readable copy with C{allow-user-ssh}, else the private key itself.  The
        previous key, tried second, is its name with L{PREVIOUS_SUFFIX}.
    """
    if identityFile is None:
        identityFile = config.path(SHARED_CLIENT_KEY if config.allow_user_ssh else CLIENT_KEY)
    lines = [
        f"Host {HOST}",
        "  HostName 127.0.0.1",
        f"  Port {config.builderPort}",
        f"  User {USER}",
        f"  HostKeyAlias {HOST_KEY_ALIAS}",
        f"  IdentityFile {_quoted(identityFile)}",
        f"  IdentityFile {_quoted(identityFile + PREVIOUS_SUFFIX)}",
        f"  UserKnownHostsFile {_quoted(config.path(KNOWN_HOSTS))}",
        "  StrictHostKeyChecking yes",
        "  IdentitiesOnly yes",
    ]
    return "\n".join(lines) + "\n"
