"""
C{virby prepare}: make the working directory, the VM's disks and the SSH keys, as root, from
the nix-darwin activation script, before the daemon serves anything.

It runs at every activation, so it must be safe to run again and again: a run with nothing
to do changes nothing (not even an mtime), and a run killed at any moment is finished by the
next one.  Every file is written under a temporary name and renamed, and the image path is
recorded last, so an interrupted switch to a new image is simply redone.

The names and modes of what it makes are those of L{virby.layout} (and of
C{docs/working-directory.md}): the directory owner-only (0711 with allow-user-ssh, so other
users can reach the two files made for them but still cannot list it), the disks and private
keys 0600, the public halves, C{ssh_known_hosts} and the image record 0644.

Whether the image changed is decided by its path: a Nix store path changes with its content.
A changed image is the only reason C{diff.img} (the VM's state) is ever replaced; a larger
C{disk-size} grows it in place, and a smaller one is only a warning.  It also makes new SSH
keys, and keeps the ones they replace, for a VM of the old image that may still be running,
until the daemon's next boot retires them (L{virby.rotation}).

With C{ephemeral}, C{diff.img} is the daemon's: it makes a fresh one from C{base.img} before
every boot (L{virby.daemon.freshdisk}), grown to C{disk-size}, so prepare keeps C{base.img} and the
keys as always but neither makes, replaces nor grows C{diff.img}.  One that is there stays
until the next boot replaces it: the VM may be running on it while the activation runs.

The runtime files (those the daemon and vfkit make) are not made here; C{--owner} hands the
whole tree, them included, to the daemon's user so that it can write there.

The image itself may not exist yet: the switch no longer builds it.  Given the image's
derivation (C{--image-derivation}), prepare has Nix realise it (L{virby.cli.realise}), with
a GC root in the working directory, and without an image it still completes: the keys and
the directory are made, an older image's disks are kept, and the cause is recorded for the
daemon's refusal of a boot (C{docs/one-switch.md}).

Before anything is touched, the shared directories are checked as that user
(L{virby.shares}): vfkit runs as it and fails every boot on a share it cannot reach, so
prepare refuses such a share, naming the folder in the way and the fix.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, overload

from virby import disk, keys, rotation, shares
from virby.cli import realise as realisation
from virby.cli import renew
from virby.config import MIB, Config
from virby.errors import VirbyError
from virby.layout import (
    AUTHORIZED_KEY,
    BASE_IMAGE,
    CLIENT_KEY,
    DIFF_IMAGE,
    HOST_KEY,
    HOST_PUBLIC_KEY,
    IMAGE_DERIVATION,
    IMAGE_FAILURE,
    IMAGE_RECORD,
    KNOWN_HOSTS,
    PREPARED_MODES,
    PREVIOUS_CLIENT_KEY,
    PREVIOUS_SHARED_CLIENT_KEY,
    PRIVATE,
    PRIVATE_DIRECTORY,
    PUBLIC,
    SHARED_CLIENT_KEY,
    SSHD_KEYS,
    checkWorkingDirectory,
    directoryMode,
)
from virby.locks import locked
from virby.sshconfig import sshConfigBlock

Report = Callable[[str], None]


class PrepareError(VirbyError):
    """C{virby prepare} cannot do its job; the message names the cause and the fix."""


@dataclass(frozen=True)
class Owner:
    """Who the tree is handed to (C{--owner USER[:GROUP]})."""

    uid: int
    gid: int


def parseOwner(text: str) -> Owner:
    """
    Resolve C{USER[:GROUP]} (names or numbers); the group defaults to the user's own.

    @raise PrepareError: when the user or group does not exist.
    """
    user, _, group = text.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise PrepareError(
            f"--owner: no user {user!r} on this system; create it or pass another user"
        ) from None
    if not group:
        return Owner(entry.pw_uid, entry.pw_gid)
    try:
        gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise PrepareError(
            f"--owner: no group {group!r} on this system; create it or pass another group"
        ) from None
    return Owner(entry.pw_uid, gid)


def _size(n: int) -> str:
    """Show a byte count the way disk-size is written."""
    for unit, factor in (("TiB", 1024 * 1024 * MIB), ("GiB", 1024 * MIB), ("MiB", MIB)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"


@overload
def _checkImage(image: str | None, missingOk: Literal[False] = False) -> str: ...


@overload
def _checkImage(image: str | None, missingOk: bool) -> str | None: ...


def _checkImage(image: str | None, missingOk: bool = False) -> str | None:
    """
    Refuse before touching anything when the image cannot be copied.

    @param missingOk: return C{None} for an image that does not exist (yet).
    """
    if image is None:
        raise PrepareError('image: not set; pass --image or set "image" in the config')
    try:
        info = os.stat(image)
    except OSError as e:
        if missingOk and isinstance(e, FileNotFoundError):
            return None
        raise PrepareError(
            f"image: cannot use {image}: {e.strerror}; build the VM image or fix "
            '"image" in the config'
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise PrepareError(f'image: {image} is not a file; point "image" at the raw EFI image')
    if not os.access(image, os.R_OK):
        raise PrepareError(f"image: {image} is not readable; run virby prepare as root")
    return image


def _chmod(path: str, mode: int) -> None:
    """Set C{mode} only when it differs, so that a run with nothing to do changes nothing."""
    if stat.S_IMODE(os.lstat(path).st_mode) != mode:
        os.chmod(path, mode)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


_write = disk.writeAtomically


def recordedImage(config: Config) -> str | None:
    """The image path the disks were last made from, or C{None} if none was recorded."""
    data = _read(config.path(IMAGE_RECORD))
    return data.decode("utf-8", "replace").strip() or None if data is not None else None


def keysConsistent(config: Config) -> bool:
    """
    Whether every key file is there and they all belong together: the public halves and the
    pinned host key derive from the private keys.  A run killed while writing a new set of
    keys leaves a mixed set, which this catches so the next run makes a whole new set.

    C{ssh_known_hosts} pins the current host key on its first line; a second line, the
    previous set's host key (L{virby.rotation}), belongs too when it pins one valid key.
    """
    try:
        host = keys.publicOfPrivate(_read(config.path(HOST_KEY)) or b"")
        client = keys.publicOfPrivate(_read(config.path(CLIENT_KEY)) or b"")
        host_public = (_read(config.path(HOST_PUBLIC_KEY)) or b"").decode("ascii")
        authorized = (_read(config.path(AUTHORIZED_KEY)) or b"").decode("ascii")
        pinned = keys.pinnedKeys((_read(config.path(KNOWN_HOSTS)) or b"").decode("ascii"))
        return (
            keys.barePublic(host_public) == host
            and keys.barePublic(authorized) == client
            and pinned is not None
            and pinned[0] == host
        )
    except (ValueError, UnicodeDecodeError):
        return False


def previousHostKey(config: Config) -> str | None:
    """
    The previous set's host key when the whole previous set is kept: pinned on the second
    line of C{ssh_known_hosts}, with its client key beside it; C{None} otherwise.
    """
    try:
        pinned = keys.pinnedKeys((_read(config.path(KNOWN_HOSTS)) or b"").decode("ascii"))
        keys.publicOfPrivate(_read(config.path(PREVIOUS_CLIENT_KEY)) or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    return pinned[1] if pinned is not None and len(pinned) == 2 else None


def _makeKeys(config: Config, previousHost: str | None = None) -> None:
    """
    Write a new host key and client key, each file atomically, C{ssh_known_hosts} last; the
    record comes later.

    @param previousHost: the previous set's host key, pinned on the second line.
    """
    host = keys.generate("virby-vm-host")
    client = keys.generate("virby-client")
    pins = keys.knownHostsLine(host.public)
    if previousHost is not None:
        pins += keys.knownHostsLine(previousHost)
    _write(config.path(HOST_KEY), host.private, PRIVATE)
    _write(config.path(AUTHORIZED_KEY), (client.public + "\n").encode("ascii"), PUBLIC)
    _write(config.path(CLIENT_KEY), client.private, PRIVATE)
    _write(config.path(HOST_PUBLIC_KEY), (host.public + "\n").encode("ascii"), PUBLIC)
    _write(config.path(KNOWN_HOSTS), pins.encode("ascii"), PUBLIC)


_MADE = "made new SSH keys for the VM and its client"


def _keepKeys(config: Config, newImage: bool, inform: Report) -> None:
    """
    Make new keys when the image is new or the set is not whole, keeping the previous set
    for a VM that may still run on it (L{virby.rotation}):

    - keys not whole (a run killed while writing them): a whole new set, and no previous
      one, since neither the old VM's host key nor its client key can be trusted to be
      there;
    - a new image and no previous set: the current set becomes the previous one (its client
      key copied to L{PREVIOUS_CLIENT_KEY}, its host key pinned on the second line);
    - a new image and a previous set already: that set is kept as it is, since it was not
      retired, so no VM booted on the current set, which alone is replaced.

    With nothing to do, what is left of a previous set that is not whole is dropped.
    """
    wd = config.working_directory
    if not keysConsistent(config):
        _makeKeys(config)
        rotation.dropPrevious(wd)
        inform(_MADE)
        return
    previous = previousHostKey(config)
    if not newImage:
        if previous is None and rotation.dropPrevious(wd):
            inform("removed what was left of the previous SSH keys")
        return
    if previous is not None:
        _makeKeys(config, previous)
        inform(f"{_MADE}; the previous keys stay until no VM runs on them")
        return
    # What is left of a set that is not whole goes first: a run killed right after the
    # copy below must not leave the current client key beside some other pin.
    rotation.dropPrevious(wd)
    client = _read(config.path(CLIENT_KEY))
    assert client is not None
    if _read(config.path(PREVIOUS_CLIENT_KEY)) != client:
        _write(config.path(PREVIOUS_CLIENT_KEY), client, PRIVATE)
    pinned = keys.pinnedKeys((_read(config.path(KNOWN_HOSTS)) or b"").decode("ascii"))
    assert pinned is not None
    _makeKeys(config, pinned[0])
    inform(f"{_MADE}; the ones they replace stay until no VM runs on them")


def _shareClientKey(config: Config, inform: Report) -> None:
    """
    Keep the everyone-readable copies of the client key, and of the previous one while it is
    kept, exactly when allow-user-ssh is on.
    """
    for source, shared in (
        (CLIENT_KEY, SHARED_CLIENT_KEY),
        (PREVIOUS_CLIENT_KEY, PREVIOUS_SHARED_CLIENT_KEY),
    ):
        path = config.path(shared)
        private = _read(config.path(source)) if config.allow_user_ssh else None
        if private is None:
            if os.path.lexists(path):
                os.unlink(path)
                why = "allow-user-ssh is off" if not config.allow_user_ssh else f"no {source}"
                inform(f"removed {shared} ({why})")
        elif _read(path) != private:
            _write(path, private, PUBLIC)
            inform(f"wrote {shared} for local users (allow-user-ssh is on)")


def _prepareDisks(config: Config, image: str, changed: bool, inform: Report) -> None:
    """
    Copy and clone the image when it changed (or a disk is missing); with C{ephemeral}, only
    C{base.img}, which the daemon clones before every boot.
    """
    base, diff = config.path(BASE_IMAGE), config.path(DIFF_IMAGE)
    if changed or not os.path.exists(base):
        method = disk.copy(image, base, PRIVATE)
        inform(f"copied {image} to {BASE_IMAGE} ({method})")
    if config.ephemeral:
        return
    if changed or not os.path.exists(diff):
        method = disk.copy(base, diff, PRIVATE)
        inform(f"made {DIFF_IMAGE} from {BASE_IMAGE} ({method})")


def _grow(config: Config, warn: Report, inform: Report) -> None:
    resize = disk.grow(config.path(DIFF_IMAGE), config.disk_size)
    if resize.grown:
        inform(f"grew {DIFF_IMAGE} from {_size(resize.before)} to {_size(resize.after)}")
    elif resize.before > config.disk_size:
        warn(
            f"disk-size {_size(config.disk_size)} is smaller than {DIFF_IMAGE} "
            f"({_size(resize.before)}); keeping it, since a disk is never shrunk"
        )


def _handOver(root: str, owner: Owner) -> None:
    """Give the whole tree to the daemon's user, which writes its runtime files there."""
    for directory, subdirectories, files in os.walk(root):
        for name in [directory, *(os.path.join(directory, n) for n in subdirectories + files)]:
            info = os.lstat(name)
            if (info.st_uid, info.st_gid) != (owner.uid, owner.gid):
                os.lchown(name, owner.uid, owner.gid)


def _stderr(prefix: str) -> Report:
    def report(message: str) -> None:
        sys.stderr.write(f"virby prepare: {prefix}{message}\n")

    return report


def _checkShares(config: Config, owner: Owner | None, ask: shares.Ask, warn: Report) -> None:
    """
    Refuse a shared directory the daemon's user cannot reach: vfkit, which runs as that
    user, would fail every boot on it.  One that does not exist only warns, since a volume
    may be mounted later; so does a check that cannot be made (a caller that is not root, a
    volume that does not answer): prepare does not guess.

    The daemon's user is the one the tree is handed to.  The activation script passes
    C{--owner _virby:virby} and runs prepare in nix-darwin's launchd step, after its users
    step has made C{_virby}, so that user exists by then (and L{parseOwner} refuses one that
    does not).  Without C{--owner} the tree stays the caller's, and so would a daemon run by
    hand on it: the shares are checked as the caller.
    """
    if not config.shared_dirs:
        return
    if owner is None:
        account: shares.Account | None = shares.Account.caller()
    else:
        account = shares.Account.of(owner.uid, owner.gid)
    reach = shares.check(config.shared_dirs, account, ask)
    refused = [found for found in reach.unreachable if not found.missing]
    if refused:
        more = len(refused) - 1
        also = f" ({more} more shared {'directory' if more == 1 else 'directories'} too)"
        raise PrepareError(refused[0].line() + (also if more else ""))
    for found in reach.unreachable:
        warn(found.line())
    if reach.unknown is not None:
        warn(f"shared-dirs: not checked: {reach.unknown}; run `sudo virby doctor` later")


def prepare(
    config: Config,
    owner: str | None = None,
    warn: Report | None = None,
    inform: Report | None = None,
    *,
    ask: shares.Ask = shares.askAs,
    derivation: str | None = None,
    realise: bool = True,
    run: realisation.Runner = realisation.runShowingProgress,
    explain: Report | None = None,
    stage0: realisation.Stage0 | None = None,
) -> None:
    """
    Bring the working directory to the state the config asks for; see the module docstring.

    A missing image is not an error: prepare first has Nix realise it from C{derivation}
    (or from the derivation a previous run recorded for this same image), and when that
    fails it still makes the directory and the keys, records why (L{IMAGE_FAILURE}, which
    the daemon's refusal of a boot repeats), keeps the disks of an older image, and calls
    C{explain} with the cause and the ways forward.

    @param owner: C{USER[:GROUP]} to hand the tree to, or C{None} to leave owners alone.
    @param warn: called with each warning (default: a line on stderr).
    @param inform: called with each change made (default: silent).
    @param ask: how the shared directories are asked about as the daemon's user
        (L{shares.askAs}).
    @param derivation: the image's derivation (C{--image-derivation}), recorded for a
        later run.
    @param realise: whether to realise a missing image now (C{--no-realise}: not yet).
    @param run: how nix-store is run (L{realisation.runShowingProgress}).
    @param explain: called with the paragraph that says why there is no image.
    @param stage0: the temporary builder to start when Nix has none for the image's system
        (C{--stage0-runner}), or C{None}.
    @raise PrepareError: with one line, before anything is touched when the input is bad.
    """
    warn = warn or _stderr("warning: ")
    inform = inform or (lambda message: None)
    explain = explain or _stderr("")
    wanted = _wanted(config, derivation) if config.image is not None else None
    # Refused before anything is touched: no image named, or one that cannot be copied.  A
    # missing one is refused too unless its derivation is known, which can give it.
    image = _checkImage(config.image, missingOk=wanted is not None)
    assert config.image is not None
    who = parseOwner(owner) if owner is not None else None
    _checkShares(config, who, ask, warn)
    wd = config.working_directory
    checkWorkingDirectory(wd, absentOk=True)
    try:
        os.makedirs(wd, PRIVATE_DIRECTORY, exist_ok=True)
        cause = None
        if wanted is not None and realise and not realisation.rooted(wd, wanted):
            # Outside the lock: a build can take long, and an ephemeral boot takes the lock.
            cause = realisation.realise(wd, wanted, run=run, stage0=stage0)
            image = _checkImage(config.image, missingOk=True)
            if image is not None and cause is not None:
                warn(f"the image has no GC root in {wd}: {cause}")
        if image is None and cause is None:
            cause = "not built yet (the switch builds it after the daemon is loaded)"
        with locked(wd):
            if image is None:
                assert cause is not None
                _noImageLocked(config, cause, inform)
            else:
                _prepareLocked(config, image, warn, inform)
                if os.path.lexists(config.path(IMAGE_FAILURE)):
                    os.unlink(config.path(IMAGE_FAILURE))
            if (
                derivation is not None
                and wanted is not None
                and _read(config.path(IMAGE_DERIVATION)) != wanted.encode()
            ):
                _write(config.path(IMAGE_DERIVATION), wanted.encode(), PUBLIC)
            if who is not None:
                _handOver(wd, who)
        if image is None and cause is not None and realise:
            explain(realisation.noImageParagraph(config.image, cause))
    except OSError as e:
        where = f" {e.filename}" if e.filename else f" {wd}"
        raise PrepareError(
            f"cannot prepare{where}: {e.strerror or e}; free space or fix permissions and "
            "run virby prepare again"
        ) from None


def _wanted(config: Config, derivation: str | None) -> realisation.Wanted | None:
    """
    The derivation to realise the config's image from: the one passed, or the one the last
    activation recorded when it gives this same image (a later C{sudo virby prepare}).
    """
    assert config.image is not None
    if derivation is not None:
        return realisation.Wanted(derivation, config.image)
    known = realisation.recorded(config.working_directory)
    return known if known is not None and known.image == config.image else None


def _makeDirectories(config: Config, inform: Report) -> None:
    """The working directory and the keys' share, with their modes, and no leftovers."""
    wd = config.working_directory
    _chmod(wd, directoryMode(config.allow_user_ssh))
    share = config.path(SSHD_KEYS)
    os.makedirs(share, PRIVATE_DIRECTORY, exist_ok=True)
    _chmod(share, PRIVATE_DIRECTORY)
    for directory in (wd, share):
        for name in disk.removeTemporaries(directory):
            inform(f"removed {name} left by an interrupted run")


def _noImageLocked(config: Config, cause: str, inform: Report) -> None:
    """
    The directory without the image: keys and modes as always, the disks of an older image
    left alone (its VM may be the builder that builds the new one), and the cause recorded.
    """
    _makeDirectories(config, inform)
    _keepKeys(config, False, inform)
    _shareClientKey(config, inform)
    line = cause.replace("\n", " ").strip()
    if _read(config.path(IMAGE_FAILURE)) != f"{line}\n".encode():
        _write(config.path(IMAGE_FAILURE), f"{line}\n".encode(), PUBLIC)
    for name, mode in PREPARED_MODES.items():
        if os.path.lexists(config.path(name)):
            _chmod(config.path(name), mode)


def _prepareLocked(config: Config, image: str, warn: Report, inform: Report) -> None:
    _makeDirectories(config, inform)
    changed = recordedImage(config) != image
    _prepareDisks(config, image, changed, inform)
    if not config.ephemeral:
        _grow(config, warn, inform)
    _keepKeys(config, changed, inform)
    _shareClientKey(config, inform)
    for name, mode in PREPARED_MODES.items():
        if os.path.lexists(config.path(name)):
            _chmod(config.path(name), mode)
    if changed:
        _write(config.path(IMAGE_RECORD), f"{image}\n".encode(), PUBLIC)
        inform(f"recorded {image} as the image of {config.working_directory}")


def _say(message: str) -> None:
    sys.stdout.write(f"virby prepare: {message}\n")


def run(
    config: Config,
    owner: str | None,
    print_ssh_config: bool,
    imageDerivation: str | None = None,
    realise: bool = True,
    stage0: realisation.Stage0 | None = None,
    askToRenew: Callable[[Config], str | None] = renew.askToRenew,
) -> int:
    """
    The C{virby prepare} command; expected failures raise L{VirbyError} for the caller.  No
    image is not a failure: the switch that runs this must complete.

    Once the directory is prepared, the running daemon is asked to move to it
    (L{renew.askToRenew}), and what it answers is printed.

    @param askToRenew: how the daemon is asked.
    """
    if print_ssh_config:
        sys.stdout.write(sshConfigBlock(config))
        return 0
    prepare(config, owner, inform=_say, derivation=imageDerivation, realise=realise, stage0=stage0)
    answer = askToRenew(config)
    if answer is not None:
        _say(answer)
    return 0
