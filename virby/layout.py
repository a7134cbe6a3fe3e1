"""
The working directory's layout: the name and mode of everything Virby keeps there, who makes
it, and the one check that the directory can be used.

Everything reads its names from here: C{virby prepare}, the daemon, vfkit's command line,
the orphan check, the fresh disk, C{virby doctor}, the ssh configuration, and the emulated
guest, which finds the keys in the C{sshd-keys} share under the names the image
(C{nix/image.nix}) installs them from.  C{docs/working-directory.md} states the same table,
and a test keeps the two in step.

Modes are the point of most of these files: the directory is owner-only, so the private keys,
the control socket and vfkit's REST socket are out of other users' reach even when a mode
inside were loosened; with C{allow-user-ssh} it is traversable (0711), so other users can
read the files made for them, and still cannot list it.  What vfkit makes (its socket,
the console, the firmware's variables) gets the daemon's umask, L{DAEMON_UMASK}.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from virby.errors import VirbyError

# -- modes

PRIVATE = 0o600
PUBLIC = 0o644
PRIVATE_DIRECTORY = 0o700
#: The directory's mode with allow-user-ssh: others may reach a file they know the name of.
REACHABLE_DIRECTORY = 0o711
#: The daemon's umask: what vfkit creates (its REST socket above all) is owner-only.
DAEMON_UMASK = 0o077

# -- what prepare makes

BASE_IMAGE = "base.img"
DIFF_IMAGE = "diff.img"
#: The directory shared into the VM, and the tag the image mounts it by.
SSHD_KEYS = "vm_sshd_keys"
SSHD_KEYS_TAG = "sshd-keys"
#: The two files inside the share, as the guest finds them there.
SHARE_HOST_KEY = "ssh_host_ed25519_key"
SHARE_AUTHORIZED_KEY = "ssh_user_ed25519_key.pub"
HOST_KEY = f"{SSHD_KEYS}/{SHARE_HOST_KEY}"
AUTHORIZED_KEY = f"{SSHD_KEYS}/{SHARE_AUTHORIZED_KEY}"
CLIENT_KEY = "ssh_user_ed25519_key"
HOST_PUBLIC_KEY = "ssh_host_ed25519_key.pub"
KNOWN_HOSTS = "ssh_known_hosts"
#: The client key readable by every local user (only with allow-user-ssh).
SHARED_CLIENT_KEY = "ssh_user_ed25519_key.shared"
#: The client key of the set before the current one, kept while a VM booted on that set may
#: still run (a new image makes new keys, and the old VM keeps its own until it stops); the
#: daemon retires it at the next boot (L{virby.rotation}).  Its host key is the second line
#: of L{KNOWN_HOSTS}.
PREVIOUS_CLIENT_KEY = f"{CLIENT_KEY}.previous"
#: Its copy readable by every local user (only with allow-user-ssh).
PREVIOUS_SHARED_CLIENT_KEY = f"{SHARED_CLIENT_KEY}.previous"
#: The image path the disks were made from: a different path means a new image.
IMAGE_RECORD = "image-path"
#: The GC root of the realised image (a symlink to its store path), so that Nix's garbage
#: collector keeps it; made by C{nix-store --realise --add-root}.
IMAGE_ROOT = "image"
#: The image's derivation and the image path it gives, one a line: what a later C{virby
#: prepare} realises when the image is still missing.
IMAGE_DERIVATION = "image-derivation"
#: Why the image is missing (one line), while it is; read by the daemon to refuse a boot.
IMAGE_FAILURE = "image-failure"

# -- what the daemon and vfkit make

EFI_STORE = "efistore.nvram"
MAC = "mac"
VFKIT_PIDFILE = "vfkit.pid"
REST_SOCKET = "vfkit.sock"
SERIAL_LOG = "serial.log"
CONTROL_SOCKET = "control.sock"
DAEMON_LOCK = "daemon.lock"
VM_LOCK = "vm.lock"
#: Older daemons locked the control socket with a symlink naming their pid: junk now.
OLD_SOCKET_LOCK = CONTROL_SOCKET + ".lock"

#: The tag of the Rosetta share, which the image mounts too: no shared-dirs tag may take it.
ROSETTA_TAG = "rosetta"

#: The unix sockets in the directory; the longest of their paths must fit macOS's C{sun_path}
#: (104 bytes with the terminating NUL, which vfkit and Twisted need too).
SOCKETS = (REST_SOCKET, CONTROL_SOCKET)
MAX_UNIX_SOCKET_PATH = 103


@dataclass(frozen=True)
class Entry:
    """
    One file (or directory) of the working directory.

    @ivar mode: the mode it is kept at, or C{None} where vfkit makes it (L{DAEMON_UMASK}).
    @ivar maker: C{"prepare"}, C{"daemon"} or C{"vfkit"}.
    """

    name: str
    mode: int | None
    maker: str
    what: str


ENTRIES: tuple[Entry, ...] = (
    Entry(BASE_IMAGE, PRIVATE, "prepare", "the image as built"),
    Entry(DIFF_IMAGE, PRIVATE, "prepare", "the VM's writable disk (the daemon's with ephemeral)"),
    Entry(SSHD_KEYS, PRIVATE_DIRECTORY, "prepare", f"shared into the VM as {SSHD_KEYS_TAG}"),
    Entry(HOST_KEY, PRIVATE, "prepare", "the VM's host key"),
    Entry(AUTHORIZED_KEY, PUBLIC, "prepare", "the client's public key, authorized in the VM"),
    Entry(CLIENT_KEY, PRIVATE, "prepare", "the client's private key"),
    Entry(HOST_PUBLIC_KEY, PUBLIC, "prepare", "the VM's public host key"),
    Entry(KNOWN_HOSTS, PUBLIC, "prepare", "pins the host key (then the previous one)"),
    Entry(SHARED_CLIENT_KEY, PUBLIC, "prepare", "with allow-user-ssh: the client key for all"),
    Entry(PREVIOUS_CLIENT_KEY, PRIVATE, "prepare", "until retired: the previous client key"),
    Entry(
        PREVIOUS_SHARED_CLIENT_KEY,
        PUBLIC,
        "prepare",
        "until retired, with allow-user-ssh: the previous client key for all",
    ),
    Entry(IMAGE_RECORD, PUBLIC, "prepare", "the image path the disks were made from"),
    Entry(IMAGE_DERIVATION, PUBLIC, "prepare", "the image's derivation and its image path"),
    Entry(IMAGE_FAILURE, PUBLIC, "prepare", "while there is no image: why"),
    # A symlink, which nix-store makes: its own mode means nothing.
    Entry(IMAGE_ROOT, 0o777, "nix", "the image's GC root, a symlink to its store path"),
    Entry(MAC, PUBLIC, "daemon", "the VM's stable MAC (bootpd keys leases by MAC)"),
    Entry(DAEMON_LOCK, PRIVATE, "daemon", "held for the daemon's whole life"),
    Entry(CONTROL_SOCKET, PRIVATE, "daemon", "what virby status, start, stop and doctor ask"),
    Entry(VM_LOCK, PRIVATE, "daemon", "held by the daemon and its vfkit for the VM's life"),
    Entry(VFKIT_PIDFILE, PUBLIC, "daemon", "the running vfkit's pid"),
    Entry(EFI_STORE, None, "vfkit", "the firmware's variables"),
    Entry(REST_SOCKET, None, "vfkit", "vfkit's REST API"),
    Entry(SERIAL_LOG, None, "vfkit", "the guest's console"),
)

#: What C{virby prepare} makes, and the mode it keeps each at (the record is written last).
PREPARED_MODES: dict[str, int] = {
    entry.name: entry.mode
    for entry in ENTRIES
    if entry.maker == "prepare" and entry.mode is not None and entry.name != SSHD_KEYS
}
#: What a boot needs that only C{virby prepare} makes.
BOOT_NEEDS = (DIFF_IMAGE, SSHD_KEYS)


#: What to do when there is no image yet: the ways a person can get one.
NO_IMAGE_FIX = (
    "give Nix a Linux builder (nix.linux-builder, or a machine in nix.buildMachines) or copy "
    "the image built elsewhere to this Mac, then run `sudo virby prepare`"
)


def noImageYet(workingDirectory: str) -> str | None:
    """
    The one line that refuses a boot while no image has been prepared (neither disk is
    there, and none was ever made: the image could not be realised yet), naming why, from
    L{IMAGE_FAILURE}, and what to do; C{None} once there is an image.
    """
    for made in (BASE_IMAGE, DIFF_IMAGE, IMAGE_RECORD):
        # A disk made once and lost since (removed by hand) is not "no image yet": the
        # boot goes on to say which disk is missing and that prepare makes it again.
        if os.path.exists(os.path.join(workingDirectory, made)):
            return None
    try:
        with open(os.path.join(workingDirectory, IMAGE_FAILURE), encoding="utf-8") as f:
            why = f.readline().strip()
    except (OSError, UnicodeDecodeError):
        why = ""
    return f"no image yet: {why or 'the VM image has not been built'}; {NO_IMAGE_FIX}"


def directoryMode(allowUserSsh: bool) -> int:
    """The working directory's own mode."""
    return REACHABLE_DIRECTORY if allowUserSsh else PRIVATE_DIRECTORY


def longestSocket(workingDirectory: str) -> tuple[str, int]:
    """The socket in the directory whose path is longest, and that path's length in bytes."""
    sizes = {name: len(os.path.join(workingDirectory, name).encode()) for name in SOCKETS}
    name = max(sizes, key=sizes.__getitem__)
    return name, sizes[name]


# -- the one check

#: What repairs a working directory, whatever is wrong with it.
PREPARE_FIX = "run `virby prepare --config FILE` (the nix-darwin activation runs it)"


class WorkingDirectoryError(VirbyError):
    """
    The working directory cannot be used; the message names what is wrong and the fix.

    @ivar problem: what is wrong, without the fix.
    @ivar fix: what to do about it.
    @ivar denied: this process lacks the rights to look (another user could).
    """

    def __init__(self, problem: str, fix: str = PREPARE_FIX, denied: bool = False) -> None:
        super().__init__(f"{problem}: {fix}")
        self.problem = problem
        self.fix = fix
        self.denied = denied


def checkWorkingDirectory(
    path: str,
    needs: Iterable[str] = (),
    *,
    absentOk: bool = False,
    writable: bool = True,
) -> os.stat_result | None:
    """
    Check that the working directory at C{path} can be used, before anything is touched.

    @param needs: names inside it that must be there (what a boot needs, L{BOOT_NEEDS}).
    @param absentOk: C{virby prepare} makes a missing directory, and is the fix for the rest.
    @param writable: whether this process must be able to write there.
    @return: the directory's C{stat}, or C{None} when it is absent and that is fine.
    @raise WorkingDirectoryError: with one line naming the problem and the fix.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if absentOk:
            return None
        raise WorkingDirectoryError(f"working directory {path} is missing") from None
    except PermissionError as e:
        raise WorkingDirectoryError(
            f"working directory {path} cannot be reached by uid {os.getuid()} ({e.strerror})",
            "run the command as root",
            denied=True,
        ) from None
    except OSError as e:
        raise WorkingDirectoryError(
            f"working directory {path} cannot be used ({e.strerror or e})",
            'fix it or set another "working-directory"',
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise WorkingDirectoryError(
            f"working directory {path} exists and is not a directory",
            'move it away or set another "working-directory"',
        )
    if writable and readOnly(path):
        raise WorkingDirectoryError(
            f"working directory {path} is on a read-only file system",
            'mount it read-write, or set a "working-directory" on a writable one',
        )
    if writable and not os.access(path, os.W_OK | os.X_OK):
        raise WorkingDirectoryError(
            f"working directory {path} is not writable by uid {os.getuid()}",
            "run virby prepare as root"
            if absentOk
            else f"{PREPARE_FIX} with --owner set to the daemon's user",
        )
    for name in needs:
        if not os.path.exists(os.path.join(path, name)):
            raise WorkingDirectoryError(f"{os.path.join(path, name)} is missing")
    return info


def readOnly(path: str) -> bool:
    """
    Whether C{path} is on a file system mounted read-only (C{EROFS} for every write): no
    user, root included, can write there, so "run it as root" would be the wrong fix.
    """
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
