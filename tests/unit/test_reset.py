"""``virby reset``: the VM stopped, then ``diff.img`` made anew from ``base.img``, safely."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import pytest

from virby import disk
from virby.cli import reset
from virby.cli.client import DaemonDown, NotAllowed
from virby.config import GIB, fromMapping
from virby.errors import VirbyError
from virby.locks import FileLock
from virby.wire import Refused

BASE = b"the image" + b"\0" * 4096


def workingDirectory(short_tmp: Path) -> Any:
    (short_tmp / "base.img").write_bytes(BASE)
    (short_tmp / "diff.img").write_bytes(b"a broken disk")
    return fromMapping({"working-directory": str(short_tmp), "disk-size": "1GiB"})


class Daemon:
    """The control socket's side of a stop, scripted."""

    def __init__(self, reply: dict[str, Any] | None = None, error: Exception | None = None):
        self.reply = reply or {"ok": True, "stopped": True, "closed_connections": 0}
        self.error = error
        self.asked: list[tuple[str, str, bool]] = []

    def __call__(self, path: str, command: str, *, force: bool, timeout: float) -> dict:
        self.asked.append((os.path.basename(path), command, force))
        if self.error is not None:
            raise self.error
        return self.reply


def resetWith(config: Any, daemon: Daemon, force: bool = False) -> str:
    out = io.StringIO()
    assert reset.runReset(config, force, out, askDaemon=daemon) == 0
    return out.getvalue()


def assertRemade(short_tmp: Path) -> None:
    diff = short_tmp / "diff.img"
    with diff.open("rb") as f:
        assert f.read(len(BASE)) == BASE
    assert diff.stat().st_size == GIB
    assert diff.stat().st_mode & 0o777 == 0o600


def test_with_no_daemon_it_just_remakes_the_disk(short_tmp) -> None:
    config = workingDirectory(short_tmp)
    daemon = Daemon(error=DaemonDown("the daemon is not running"))
    said = resetWith(config, daemon)
    assertRemade(short_tmp)
    assert said.startswith("Virby: no daemon is running; made diff.img anew from base.img (")
    assert said.endswith("), 1GiB; the next build (or `virby start`) boots it\n")


@pytest.mark.parametrize("force", [False, True])
def test_it_stops_the_vm_through_the_daemon_first(short_tmp, force) -> None:
    config = workingDirectory(short_tmp)
    daemon = Daemon({"ok": True, "stopped": True, "closed_connections": 2 if force else 0})
    said = resetWith(config, daemon, force)
    assert daemon.asked == [("control.sock", "stop", force)]
    assertRemade(short_tmp)
    assert said.startswith(
        "Virby: stopped the VM and closed 2 connections; " if force else "Virby: stopped the VM; "
    )


def test_open_connections_refuse_it_and_keep_the_disk(short_tmp) -> None:
    config = workingDirectory(short_tmp)
    busy = Refused("1 connection is open (a build may be running): `virby stop --force`")
    with pytest.raises(VirbyError) as caught:
        resetWith(config, Daemon(error=busy))
    assert str(caught.value) == (
        "the VM was not stopped, so its disk is kept: 1 connection is open (a build may be "
        "running): `virby reset --force`"
    )
    assert (short_tmp / "diff.img").read_bytes() == b"a broken disk"


def test_a_vm_still_holding_the_disk_refuses_it(short_tmp) -> None:
    """vfkit holds vm.lock for its life: one a dead daemon left, or one booted at once."""
    config = workingDirectory(short_tmp)
    vfkit = FileLock(str(short_tmp / "vm.lock"))
    assert vfkit.acquire()
    try:
        with pytest.raises(VirbyError) as caught:
            resetWith(config, Daemon(error=DaemonDown("down")))
    finally:
        vfkit.release()
    assert str(caught.value) == (
        f"a VM still runs on {short_tmp / 'diff.img'} (pid {os.getpid()} holds "
        f"{short_tmp / 'vm.lock'}): stop it with `virby stop`, then reset again"
    )
    assert (short_tmp / "diff.img").read_bytes() == b"a broken disk"


def test_the_copy_holds_the_vm_lock_and_the_directory_lock(short_tmp, monkeypatch) -> None:
    """So no boot, no virby prepare and no fresh disk of the daemon can race it."""
    config = workingDirectory(short_tmp)
    held: list[str] = []
    copy = disk.copy

    @contextlib.contextmanager
    def recordingLock(path: str):
        held.append(f"locked {path}")
        yield
        held.append(f"unlocked {path}")

    def recordingCopy(source: str, destination: str, mode: int) -> str:
        other = FileLock(str(short_tmp / "vm.lock"))
        held.append(f"vm.lock free: {other.acquire()}")
        return copy(source, destination, mode)

    monkeypatch.setattr(reset, "locked", recordingLock)
    monkeypatch.setattr(disk, "copy", recordingCopy)
    resetWith(config, Daemon(error=DaemonDown("down")))
    assert held == [f"locked {short_tmp}", "vm.lock free: False", f"unlocked {short_tmp}"]
    assert FileLock(str(short_tmp / "vm.lock")).acquire(), "released after"


def test_the_new_disk_and_the_lock_go_to_the_owner_of_base_img(short_tmp, monkeypatch) -> None:
    """As root, the files made belong to the daemon's user, as prepare left base.img."""
    config = workingDirectory(short_tmp)
    given: list[tuple[str, int, int]] = []
    realStat = os.stat

    class Owned:
        def __init__(self, info: os.stat_result, uid: int) -> None:
            self.st_uid, self.st_gid = uid, uid
            self.st_mode, self.st_size = info.st_mode, info.st_size

    def stat(target: Any, *args: Any, **kwargs: Any) -> Any:
        info = realStat(target, *args, **kwargs)
        return Owned(info, 4242) if str(target).endswith("base.img") else info

    def chown(target: Any, uid: int, gid: int) -> None:
        given.append((os.path.basename(str(target)) if isinstance(target, str) else "fd", uid, gid))

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "chown", chown)
    resetWith(config, Daemon(error=DaemonDown("down")))
    assert given == [("fd", 4242, 4242), ("diff.img", 4242, 4242)]


def test_a_user_who_cannot_write_the_directory_is_told_to_use_sudo(short_tmp, monkeypatch) -> None:
    config = workingDirectory(short_tmp)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    daemon = Daemon()
    with pytest.raises(VirbyError) as caught:
        resetWith(config, daemon)
    assert str(caught.value) == (
        f"cannot write {short_tmp} as uid {os.getuid()}: run `sudo virby reset` (the working "
        "directory is the daemon's own)"
    )
    assert daemon.asked == [], "a reset that cannot write the disk does not stop the VM"


def test_the_daemon_refusing_this_user_is_told_to_use_sudo(short_tmp) -> None:
    config = workingDirectory(short_tmp)
    with pytest.raises(VirbyError, match=r"run `sudo virby reset`"):
        resetWith(config, Daemon(error=NotAllowed("only root")))


def test_no_base_image_says_to_prepare(short_tmp) -> None:
    config = workingDirectory(short_tmp)
    (short_tmp / "base.img").unlink()
    with pytest.raises(VirbyError) as caught:
        resetWith(config, Daemon())
    assert str(caught.value).startswith(f"{short_tmp / 'base.img'} is missing: run `virby prepare")


def test_the_command_line(short_tmp, capsys) -> None:
    """No control socket there: no daemon runs, and the disk is just made anew."""
    from virby import cli

    workingDirectory(short_tmp)
    assert cli.main(["reset", "--working-directory", str(short_tmp), "--disk-size", "1GiB"]) == 0
    assert capsys.readouterr().out.startswith("Virby: no daemon is running; made diff.img anew")
    assertRemade(short_tmp)
