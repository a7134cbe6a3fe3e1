"""
The SSH keys across a change of image: the previous set stays usable while a VM booted on it
may still run, and is retired at the next boot.

C{virby prepare} makes a new set of keys whenever the image changes.  A VM still running on
the old image keeps the keys it copied from the C{sshd-keys} share at its boot: its host key
is the old one, and it authorizes only the old client key.  The daemon keeps handing new
connections to that VM until none uses it, so for that time both sets must work for ssh:

- C{ssh_known_hosts} pins the current host key on its first line and the previous one on a
  second, both under C{virby-vm-key}.  OpenSSH accepts a host key that any line for the alias
  pins: C{check_hostkeys_by_key_or_type} (C{hostfile.c}) returns C{HOST_OK} at the first line
  whose key equals the server's, while a line with another key only sets C{HOST_CHANGED} and
  the loop goes on; C{check_host_key} (C{sshconnect.c}) asks it of the lines loaded for the
  alias.  The order of the lines does not matter to ssh; the current key comes first so
  that the file reads as the current set and what is kept besides.
- The ssh configuration names the previous client key after the current one
  (L{virby.sshconfig}), and prepare keeps the previous client key (and, with
  C{allow-user-ssh}, its copy for every user) under L{PREVIOUS_CLIENT_KEY}.

The previous set is retired (L{retirePrevious}) by the daemon at every boot, under the VM
lock, before vfkit starts: no VM runs then, and the VM about to boot copies the current set.
So a previous set that is still there means no VM has booted on the current set since it was
made, and a second new image before a boot keeps it and replaces only the current set: the VM
that may be running is the one on the previous set.

Each file is replaced atomically.  A set that is not whole (a second line without the
previous client key, or the reverse: a run killed between two files) is of no use to ssh, and
prepare drops what is left of it; the retirement finishes whatever a killed one left.

Plain blocking file operations on a few small files, cheap enough for the daemon's reactor
(as its MAC file is, L{virby.disk.writeAtomically}).
"""

from __future__ import annotations

import contextlib
import os
import stat

from virby.disk import writeAtomically
from virby.layout import KNOWN_HOSTS, PREVIOUS_CLIENT_KEY, PREVIOUS_SHARED_CLIENT_KEY
from virby.locks import lockedIfFree

#: The files of the previous set besides its line in C{ssh_known_hosts}.
PREVIOUS_FILES = (PREVIOUS_CLIENT_KEY, PREVIOUS_SHARED_CLIENT_KEY)


def dropPrevious(workingDirectory: str) -> bool:
    """
    Forget the previous set: C{ssh_known_hosts} back to its first line (atomically, at the
    mode it had), then the previous client keys removed.  The caller holds the working
    directory's lock (L{virby.locks.locked}).

    @return: whether anything was there to drop.
    @raise OSError: when a file cannot be read, written or removed.
    """
    dropped = False
    knownHosts = os.path.join(workingDirectory, KNOWN_HOSTS)
    try:
        with open(knownHosts, "rb") as f:
            lines = f.read().splitlines(keepends=True)
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except FileNotFoundError:
        lines, mode = [], 0
    if len(lines) > 1:
        writeAtomically(knownHosts, lines[0], mode)
        dropped = True
    for name in PREVIOUS_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(workingDirectory, name))
            dropped = True
    return dropped


def retirePrevious(workingDirectory: str) -> bool:
    """
    Retire the previous set, called when no VM runs (the daemon holds the VM lock, before a
    boot).  The working directory's lock is taken without waiting: while C{virby prepare}
    holds it (it may be writing a new set), nothing is retired, and the next boot tries
    again.

    @return: whether anything was retired.
    @raise OSError: when the directory or a file cannot be used.
    """
    with lockedIfFree(workingDirectory) as held:
        if not held:
            return False
        return dropPrevious(workingDirectory)
