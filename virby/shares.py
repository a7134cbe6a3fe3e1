"""
Whether the daemon's user can reach each shared directory (C{shared-dirs}): the check that
C{virby prepare} and C{virby doctor} make.

vfkit runs as the daemon's user (launchd starts the daemon as C{_virby}; vfkit is its
child).  For each C{virtio-fs} share, vfkit's C{VirtioFs.toVz} (C{pkg/vf/virtio.go}) calls
vz's C{NewSharedDirectory}, which C{os.Stat}s the directory first (vz
C{shared_directory.go}); the error goes back up and vfkit exits before the VM starts, with
a line such as C{stat /Users/me/src: permission denied}.  So a share that this user cannot
reach makes every boot fail, although root, who runs C{prepare} (and usually C{doctor}),
reaches it.  A macOS home folder is C{drwxr-x---} by default: a folder in someone's home is
such a share.  What the guest can then read there is what that user can read.

Two things decide what the user may do, and C{st_mode} shows neither whole:

 - the modes and the ACLs of the directory and of every folder above it.  An ACL
   (C{chmod +a}, the fix this module proposes) may grant what the mode does not, and
   C{stat} does not show it.  So the verdict is the system's own: a short child process,
   switched to the user's uid, gid and groups, answers C{access(2)} for each folder
   (L{askAs}).  The modes appear in a refusal only to explain it.
 - macOS's privacy protection (TCC), which keeps daemons out of the Desktop, Documents and
   Downloads folders and iCloud Drive (C{~/Library/Mobile Documents}) whatever the modes and
   ACLs say.  A child started from the activation script is no launchd daemon, and the
   system may answer it otherwise, so these folders are refused by name (L{protected}).

Only root can switch to another user: unless the caller is that user, asking needs root,
and L{CannotAsk} says so; each command decides what that means for it.  This is for
short-lived commands, never for a running reactor: it blocks, for at most L{ASK_TIMEOUT}.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import select
import shlex
import signal
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from virby.errors import VirbyError

#: A network volume that does not answer must not hang a switch: the child gets this long.
ASK_TIMEOUT = 10.0

#: The folders of a home that macOS's privacy protection keeps from daemons.
PROTECTED = ("Desktop", "Documents", "Downloads", "Library/Mobile Documents")
_PROTECTED = re.compile(
    r"(?:/System/Volumes/Data)?/Users/[^/]+/(?:"
    + "|".join(re.escape(name) for name in PROTECTED)
    + r")(?=/|$)",
    re.IGNORECASE,  # APFS is case-insensitive by default: ~/documents is ~/Documents
)

#: The ACL entries each fix grants: a folder above the share only needs to be passed
#: through; the share itself must be listed too.
SEARCH_ACL = "allow search"
SHARE_ACL = "allow list,search,readattr"


class CannotAsk(VirbyError):
    """Only root can ask as another user."""


class AskFailed(VirbyError):
    """The child that asks as the user did not answer (a volume that hangs, a broken child)."""


class NoAccount(VirbyError):
    """The daemon's user does not exist (yet)."""


@dataclass(frozen=True)
class Account:
    """
    Who the daemon runs as: the user's name and uid, and the group launchd gives it
    (C{None}: the user's own, from its passwd entry, as launchd uses without a GroupName).
    """

    name: str
    uid: int
    gid: int | None = None

    @classmethod
    def of(cls, uid: int, gid: int | None = None) -> Account | None:
        """The user C{uid}, with C{gid} as its group (its own by default); C{None} if none."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return None
        return cls(entry.pw_name, uid, entry.pw_gid if gid is None else gid)

    @classmethod
    def named(cls, name: str) -> Account | None:
        """The user called C{name}, or C{None} when there is none."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    @classmethod
    def caller(cls) -> Account:
        """This process's own user."""
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, os.getegid())


#: One question: may the user do C{mode} (C{os.X_OK}, C{os.R_OK | os.X_OK}) on a path?
Question = tuple[str, int]
#: Asks the questions as the account; one answer each, in order.
Ask = Callable[[Account, Sequence[Question]], Sequence[bool]]


def become(account: Account) -> None:
    """
    Take C{account}'s identity for good, as launchd starts the daemon: its groups
    (C{initgroups}, which also reads the groups the user is a member of), its group, then
    its uid, after which there is no way back.

    @raise KeyError: when the group is the user's own and the user has no passwd entry.
    """
    gid = pwd.getpwnam(account.name).pw_gid if account.gid is None else account.gid
    os.initgroups(account.name, gid)
    os.setgid(gid)
    os.setuid(account.uid)


def askAs(
    account: Account,
    questions: Sequence[Question],
    *,
    euid: int | None = None,
    timeout: float = ASK_TIMEOUT,
    switch: Callable[[Account], None] = become,
) -> list[bool]:
    """
    Answer each question with C{access(2)} in a forked child that has become C{account}
    (L{become}): the system decides, ACLs included.  A fork, not a new program: the child
    needs nothing the user might not be allowed to read, such as this interpreter.

    @param euid: the caller's effective uid (this process's by default); when it is
        C{account}'s, the child asks as it is.
    @raise CannotAsk: when the caller is neither root nor C{account}.
    @raise AskFailed: when the child fails or does not answer within C{timeout}.
    """
    euid = os.geteuid() if euid is None else euid
    if account.uid != euid and euid != 0:
        raise CannotAsk(f"only root can ask what {account.name} may reach")
    readable, writable = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(readable)
        os.close(writable)
        raise AskFailed(f"cannot ask as {account.name}: {e.strerror or e}") from None
    if pid == 0:  # the child: it never returns
        code = 1
        try:
            os.close(readable)
            if account.uid != euid:
                switch(account)
            answers = b"".join(b"1" if os.access(p, m) else b"0" for p, m in questions)
            view = memoryview(answers)
            while view:
                view = view[os.write(writable, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(writable)
    try:
        received = _receive(readable, timeout)
    finally:
        os.close(readable)
    if received is None:
        # Stuck, as on a network volume that does not answer: killed, and not waited for,
        # since a process stuck inside the kernel dies only when the call returns.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, os.WNOHANG)
        raise AskFailed(
            f"asking as {account.name} took more than {timeout:g}s (a volume that does not answer?)"
        )
    # The pipe closed: the child is exiting.
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status != 0 or len(received) != len(questions):
        raise AskFailed(f"asking as {account.name} failed (the child's status was {status})")
    return [answer == ord("1") for answer in received]


def _receive(fd: int, timeout: float) -> bytes | None:
    """Everything the child writes until it closes the pipe; C{None} past C{timeout}."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def protected(directory: str) -> str | None:
    """
    The privacy-protected folder C{directory} is (or is in), for the path as given and as
    it resolves; C{None} when it is in none.
    """
    for path in dict.fromkeys([os.path.normpath(directory), os.path.realpath(directory)]):
        match = _PROTECTED.match(path)
        if match is not None:
            return match.group(0)
    return None


def foldersAbove(directory: str) -> list[str]:
    """
    Every folder that must be passed through to reach C{directory}, from C{/} down: those
    above it as written, then those above where it resolves (a symbolic link on the way
    leads through other folders).
    """
    found: dict[str, None] = {}
    for path in (os.path.normpath(directory), os.path.realpath(directory)):
        parent = os.path.dirname(path)
        chain = []
        while True:
            chain.append(parent)
            up = os.path.dirname(parent)
            if up == parent:
                break
            parent = up
        found.update(dict.fromkeys(reversed(chain)))
    return [path for path in found if path != os.path.normpath(directory)]


@dataclass(frozen=True)
class Unreachable:
    """
    A share the daemon's user cannot reach, and why: C{problem} names the folder in the way,
    C{fix} what to run or change.  C{missing}: the directory does not exist, which may end
    by itself (a volume mounted later) where the rest needs a change.
    """

    tag: str
    directory: str
    problem: str
    fix: str
    missing: bool = False

    def line(self) -> str:
        return f'shared-dirs: "{self.tag}" ({self.directory}): {self.problem}; fix: {self.fix}'


@dataclass
class Reach:
    """
    What was found: the shares that cannot be reached, those that can, and, when the rest
    could not be asked, why (L{CannotAsk}, L{AskFailed} or L{NoAccount}).
    """

    unreachable: list[Unreachable] = field(default_factory=list)
    reachable: list[str] = field(default_factory=list)
    unknown: VirbyError | None = None


def check(shared: Mapping[str, str], account: Account | None, ask: Ask = askAs) -> Reach:
    """
    Whether C{account} can reach each shared directory (tag to path): the privacy-protected
    folders first, by name; then, as the caller, whether each directory exists; then, as
    C{account}, whether it may search every folder above and list the directory itself.
    All the questions go to one child.
    """
    reach = Reach()
    pending: dict[str, list[Question]] = {}
    for tag, directory in sorted(shared.items()):
        folder = protected(directory)
        if folder is not None:
            reach.unreachable.append(_protected(tag, directory, folder))
            continue
        try:
            info = os.stat(directory)
        except FileNotFoundError:
            reach.unreachable.append(
                Unreachable(
                    tag,
                    directory,
                    "it does not exist, and vfkit stops the boot at a share it cannot stat",
                    "make it (or mount its volume), or remove the share",
                    missing=True,
                )
            )
            continue
        except OSError:
            pass  # the caller may not look there; the user's own answer decides
        else:
            if not stat.S_ISDIR(info.st_mode):
                reach.unreachable.append(
                    Unreachable(
                        tag, directory, "it is not a directory", "share a directory instead"
                    )
                )
                continue
        pending[tag] = [(path, os.X_OK) for path in foldersAbove(directory)]
        pending[tag].append((directory, os.R_OK | os.X_OK))
    if not pending:
        return reach
    if account is None:
        reach.unknown = NoAccount("the daemon's user does not exist")
        return reach
    questions = [question for asked in pending.values() for question in asked]
    try:
        answers = iter(ask(account, questions))
    except (CannotAsk, AskFailed) as e:
        reach.unknown = e
        return reach
    for tag, asked in pending.items():
        denied = [path for (path, _), allowed in zip(asked, answers, strict=False) if not allowed]
        if denied:
            reach.unreachable.append(_denied(tag, shared[tag], denied, account))
        else:
            reach.reachable.append(tag)
    reach.unreachable.sort(key=lambda found: found.tag)
    return reach


def _protected(tag: str, directory: str, folder: str) -> Unreachable:
    return Unreachable(
        tag,
        directory,
        f"{folder} is kept from daemons such as vfkit by macOS's privacy protection, "
        "whatever its modes and ACLs say",
        "share a folder outside Desktop, Documents, Downloads and iCloud Drive, and "
        "outside /Users (e.g. under /opt)",
    )


def _denied(tag: str, directory: str, denied: list[str], account: Account) -> Unreachable:
    """The first folder in the way names the problem; the fix lets the user through all."""
    first = denied[0]
    verb = "list" if first == directory else "search"
    problem = f"{account.name} may not {verb} {first}{_described(first)}"
    above = [path for path in denied if path != directory]
    grants = []
    if above:
        paths = " ".join(shlex.quote(path) for path in above)
        grants.append(f'sudo chmod +a "{account.name} {SEARCH_ACL}" {paths}')
    if directory in denied:
        grants.append(f'sudo chmod +a "{account.name} {SHARE_ACL}" {shlex.quote(directory)}')
    elsewhere = " outside /Users" if directory.startswith("/Users/") else ""
    fix = f"{' && '.join(grants)}, or share a folder{elsewhere} that {account.name} can reach"
    return Unreachable(tag, directory, problem, fix)


def _described(path: str) -> str:
    """C{ (drwxr-x--- me:staff)}, to explain a refusal; nothing when the caller cannot look."""
    try:
        info = os.stat(path)
    except OSError:
        return ""
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f" ({stat.filemode(info.st_mode)} {owner}:{group})"
