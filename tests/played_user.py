"""
The daemon's user, played from the modes on disk.

L{virby.shares} asks what the daemon's user may reach in a child switched to that user,
which only root can do; the tests run as whoever runs them (root on a development machine,
an unprivileged build user in the package's check phase, beside a real C{_virby}).  So they
hand the code a L{PlayedUser} instead: it answers the same questions from the modes, owners
and groups of what the test made, for a user who owns none of it and is in none of its
groups.  It sees no ACL, as a test's files have none.  The folders above the test's own
directory (C{within}) are the test run's, private to whoever runs it: the played user is
let through them, and played from that directory down.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from virby.shares import Account, Question


def _strangers() -> Account:
    """An account that is neither this process's user nor in any of its groups."""
    mine = {os.getegid(), *os.getgroups()}
    uid = next(n for n in range(348, 10**6) if n != os.geteuid())
    gid = next(n for n in range(348, 10**6) if n not in mine)
    return Account("_virby", uid, gid)


#: The user the tests play: called as the module's user, with ids nothing here has.
PLAYED = _strangers()


class PlayedUser:
    """
    Answers C{access(2)} as L{PLAYED} would get: every folder above a path must be
    searchable, then the path must allow the mode, each by the one class of its mode bits
    that applies (owner, else group, else others).  Above C{within}, everything may be
    searched.

    @ivar asked: every call, as (account, questions).
    """

    def __init__(self, within: str | os.PathLike[str], account: Account = PLAYED) -> None:
        self.within = os.path.normpath(os.fspath(within))
        self.account = account
        self.asked: list[tuple[Account, list[Question]]] = []

    def __call__(self, account: Account, questions: Sequence[Question]) -> list[bool]:
        self.asked.append((account, list(questions)))
        return [self.may(path, mode) for path, mode in questions]

    def may(self, path: str, mode: int) -> bool:
        path = os.path.normpath(path)
        above = []
        parent = os.path.dirname(path)
        while parent != os.path.dirname(parent):
            above.append(parent)
            parent = os.path.dirname(parent)
        above.append(parent)
        return all(self._allows(folder, os.X_OK) for folder in above) and self._allows(path, mode)

    def _allows(self, path: str, mode: int) -> bool:
        if os.path.commonpath([path, self.within]) != self.within:
            return mode == os.X_OK  # the test run's own folders, above the test's
        try:
            info = os.stat(path)
        except OSError:
            return False
        if info.st_uid == self.account.uid:
            shift = 6
        elif info.st_gid == self.account.gid:
            shift = 3
        else:
            shift = 0
        bits = (stat.S_IMODE(info.st_mode) >> shift) & 0o7
        return bits & mode == mode
