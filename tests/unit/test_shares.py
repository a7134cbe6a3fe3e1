"""
Whether the daemon's user can reach each shared directory: the privacy-protected folders by
name, the rest as that user, in a child (played by L{tests.played_user} where the test is
not root, and asked for real as this process's own user).
"""

from __future__ import annotations

import os
import pwd
import select
import stat
import struct
from pathlib import Path

import pytest

from tests.played_user import PLAYED, PlayedUser
from virby import shares
from virby.shares import Account, AskFailed, CannotAsk, NoAccount


@pytest.mark.parametrize(
    "path",
    [
        "/Users/me/Desktop",
        "/Users/me/Documents/src",
        "/Users/me/Downloads/x/y",
        "/Users/me/Library/Mobile Documents/com~apple~CloudDocs/src",
        "/users/me/documents/src",  # APFS is case-insensitive
        "/System/Volumes/Data/Users/me/Documents/src",
    ],
)
def test_the_privacy_protected_folders_are_known_by_name(path: str) -> None:
    folder = shares.protected(path)
    assert folder is not None and path.startswith(folder)


@pytest.mark.parametrize(
    "path", ["/Users/me/src", "/Users/me/Documentsx", "/opt/Documents", "/Users/Documents"]
)
def test_other_folders_are_not_protected(path: str) -> None:
    assert shares.protected(path) is None


def test_a_link_into_a_protected_folder_is_protected(tmp_path: Path) -> None:
    (tmp_path / "src").symlink_to("/Users/me/Documents/src")
    assert shares.protected(str(tmp_path / "src")) == "/Users/me/Documents"


def test_the_folders_above_include_those_a_link_leads_through(tmp_path: Path) -> None:
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    above = shares.foldersAbove(str(tmp_path / "link"))
    assert above[0] == "/" and str(tmp_path) in above
    assert str(tmp_path / "real") in above and str(tmp_path / "link") not in above
    assert shares.foldersAbove("/a/b/c/") == ["/", "/a", "/a/b"]


def test_a_folder_in_a_home_is_out_of_reach_and_the_home_is_named(home: Path) -> None:
    played = PlayedUser(home.parent.parent)
    reach = shares.check({"src": str(home / "src")}, PLAYED, played)
    (found,) = reach.unreachable
    assert (found.tag, found.directory, found.missing) == ("src", str(home / "src"), False)
    assert found.problem.startswith(f"_virby may not search {home} (drwxr-x--- ")
    assert f'sudo chmod +a "_virby allow search" {home}' in found.fix
    assert "\n" not in found.line() and found.line().startswith('shared-dirs: "src" (')
    assert reach.reachable == [] and reach.unknown is None


def test_a_share_the_user_may_not_list_needs_its_own_grant(home: Path) -> None:
    home.chmod(0o755)
    (home / "src").chmod(0o700)
    reach = shares.check({"src": str(home / "src")}, PLAYED, PlayedUser(home.parent.parent))
    (found,) = reach.unreachable
    assert found.problem.startswith(f"_virby may not list {home / 'src'} (drwx------ ")
    assert found.fix.startswith(f'sudo chmod +a "_virby allow list,search,readattr" {home}/src,')
    assert "allow search" not in found.fix


def test_a_reachable_share_is_asked_about_once_with_every_folder_on_the_way(home: Path) -> None:
    home.chmod(0o755)
    played = PlayedUser(home.parent.parent)
    other = home.parent.parent / "data"
    other.mkdir()
    reach = shares.check({"src": str(home / "src"), "data": str(other)}, PLAYED, played)
    assert reach.unreachable == [] and reach.reachable == ["data", "src"]
    ((account, questions),) = played.asked
    assert account == PLAYED
    assert (str(home), os.X_OK) in questions and (str(home.parent), os.X_OK) in questions
    assert (str(home / "src"), os.R_OK | os.X_OK) in questions


def test_what_the_system_allows_beyond_the_modes_is_reachable(home: Path) -> None:
    """An ACL may let the user through a drwxr-x--- home: the system's answer decides."""
    reach = shares.check(
        {"src": str(home / "src")}, PLAYED, lambda account, asked: [True] * len(asked)
    )
    assert reach.unreachable == [] and reach.reachable == ["src"]


def test_a_protected_folder_is_refused_whatever_the_system_answers() -> None:
    def never(account: Account, questions: object) -> list[bool]:
        raise AssertionError("a protected folder needs no question")

    reach = shares.check({"docs": "/Users/me/Documents/src"}, PLAYED, never)
    (found,) = reach.unreachable
    assert "/Users/me/Documents is kept from daemons" in found.problem
    assert "outside /Users" in found.fix and not found.missing


def test_a_missing_directory_or_a_file_is_found_as_the_caller(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    shared = {"gone": str(tmp_path / "gone"), "file": str(tmp_path / "file")}
    reach = shares.check(shared, PLAYED, PlayedUser(tmp_path))
    found = {f.tag: f for f in reach.unreachable}
    assert found["gone"].missing and "does not exist" in found["gone"].problem
    assert not found["file"].missing and "not a directory" in found["file"].problem


def test_without_the_user_or_the_right_to_ask_nothing_is_guessed(home: Path) -> None:
    shared = {"src": str(home / "src"), "docs": "/Users/me/Downloads"}
    nobody = shares.check(shared, None, PlayedUser(home))
    assert isinstance(nobody.unknown, NoAccount)
    assert [f.tag for f in nobody.unreachable] == ["docs"]

    def not_root(account: Account, questions: object) -> list[bool]:
        raise CannotAsk("only root can ask")

    assert isinstance(shares.check(shared, PLAYED, not_root).unknown, CannotAsk)


# -- asking in a child


def test_the_child_answers_as_the_system_does_for_this_user(tmp_path: Path) -> None:
    """As this process's own user the child switches nothing, so the answers are its own."""
    (tmp_path / "file").write_text("x")
    me = Account.caller()
    questions = [
        (str(tmp_path), os.R_OK | os.X_OK),
        (str(tmp_path / "gone"), os.X_OK),
        (str(tmp_path / "file" / "under"), os.X_OK),
    ]

    def switch(account: Account) -> None:
        raise AssertionError("no switch to one's own user")

    assert shares.askAs(me, questions, switch=switch) == [True, False, False]
    assert shares.askAs(me, []) == []


def test_the_child_switches_to_another_user_only_for_root(tmp_path: Path) -> None:
    other = Account("_virby", os.geteuid() + 1, os.getegid())
    with pytest.raises(CannotAsk, match="only root"):
        shares.askAs(other, [(str(tmp_path), os.X_OK)], euid=other.uid + 1)

    switched: list[Account] = []

    def switch(account: Account) -> None:
        switched.append(account)  # in the child: the parent never sees this list grow
        raise PermissionError("played: cannot switch")

    with pytest.raises(AskFailed, match="status was 1"):
        shares.askAs(other, [(str(tmp_path), os.X_OK)], euid=0, switch=switch)
    assert switched == []


def test_a_child_that_does_not_answer_is_given_up(tmp_path: Path) -> None:
    def hang(account: Account) -> None:
        select.select([], [], [])  # a stat on a volume that never answers

    other = Account("_virby", os.geteuid() + 1, os.getegid())
    with pytest.raises(AskFailed, match="took more than"):
        shares.askAs(other, [(str(tmp_path), os.X_OK)], euid=0, switch=hang, timeout=0.05)


def test_becoming_the_user_sets_its_groups_then_its_group_then_its_uid(monkeypatch) -> None:
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(os, "initgroups", lambda name, gid: calls.append(("groups", (name, gid))))
    monkeypatch.setattr(os, "setgid", lambda gid: calls.append(("gid", gid)))
    monkeypatch.setattr(os, "setuid", lambda uid: calls.append(("uid", uid)))
    shares.become(Account("_virby", 348, 349))
    assert calls == [("groups", ("_virby", 349)), ("gid", 349), ("uid", 348)]

    # No group given: the user's own, from its passwd entry, as launchd would take it.
    entry = pwd.struct_passwd(("_virby", "*", 348, 350, "", "/var/lib/virby", "/usr/bin/false"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: entry)
    calls.clear()
    shares.become(Account("_virby", 348))
    assert calls == [("groups", ("_virby", 350)), ("gid", 350), ("uid", 348)]


def _posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """Linux's C{system.posix_acl_access}: version 2, then (tag, permissions, id) each."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


@pytest.mark.linux
def test_for_real_an_acl_lets_the_user_through_a_mode_that_does_not(short_tmp: Path) -> None:
    """
    As root, the child becomes another user for real: a home that is drwxr-x---, with an ACL
    entry that lets that user search it, is reachable, and the same home without the entry
    is not.  (Linux's POSIX ACLs here; a Mac's C{chmod +a} entries are the system's too.)
    """
    if os.geteuid() != 0:
        pytest.skip("only root can become another user")
    someone = Account.named("nobody")
    if someone is None:
        pytest.skip("this system has no user nobody")
    short_tmp.chmod(0o755)  # under /tmp, which everyone may search
    home = short_tmp / "me"
    (home / "src").mkdir(parents=True)
    home.chmod(0o750)
    anyone = 0xFFFFFFFF
    acl = _posix_acl(
        (0x01, 0o7, anyone),  # the owner
        (0x02, 0o1, someone.uid),  # the user: search only
        (0x04, 0o5, anyone),  # the group
        (0x10, 0o5, anyone),  # the mask
        (0x20, 0o0, anyone),  # others
    )
    try:
        os.setxattr(home, "system.posix_acl_access", acl)
    except OSError as e:
        pytest.skip(f"no POSIX ACLs on this file system: {e.strerror}")
    assert stat.S_IMODE(home.stat().st_mode) == 0o750
    assert shares.check({"src": str(home / "src")}, someone).reachable == ["src"]
    os.removexattr(home, "system.posix_acl_access")
    (found,) = shares.check({"src": str(home / "src")}, someone).unreachable
    assert found.problem.startswith(f"nobody may not search {home} (drwxr-x--- ")
