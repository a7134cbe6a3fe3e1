"""
The fresh disk of ephemeral mode: the child's copy on a real directory, and the daemon's
side (spawn, timeout, cancel, failure) on a fake process reactor and a task.Clock.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from tests.fakes import FakeReactor
from virby import disk, locks
from virby.config import MIB, fromMapping
from virby.daemon import freshdisk
from virby.daemon.freshdisk import FreshDiskError, make, makeFreshDisk
from virby.daemon.hypervisor import VfkitHypervisor
from virby.daemon.lifecycle import BootPhase
from virby.daemon.observers import OneShot
from virby.layout import VM_LOCK
from virby.locks import FileLock

SIZE = 8 * MIB


def write_disk(path: Path, size: int, marker: bytes, at: int = 0) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(at)
        f.write(marker)


@pytest.fixture
def wd(tmp_path: Path) -> Path:
    write_disk(tmp_path / "base.img", 2 * MIB, b"the image")
    return tmp_path


def test_a_fresh_copy_replaces_what_the_last_run_left_and_is_grown(wd: Path) -> None:
    write_disk(wd / "diff.img", SIZE, b"left by a build", at=4 * MIB)
    done = make(str(wd), SIZE)
    data = (wd / "diff.img").read_bytes()
    assert len(data) == SIZE and data.startswith(b"the image")
    assert b"left by a build" not in data
    assert os.stat(wd / "diff.img").st_mode & 0o777 == 0o600
    assert "made a fresh diff.img from base.img" in done and f"{SIZE} bytes (grown)" in done
    assert (wd / "base.img").read_bytes().startswith(b"the image"), "base.img is untouched"


def test_an_image_bigger_than_disk_size_is_never_shrunk(wd: Path) -> None:
    make(str(wd), MIB)
    assert os.stat(wd / "diff.img").st_size == 2 * MIB


def test_a_killed_copys_leftover_is_removed_and_nothing_else(wd: Path) -> None:
    ours = wd / f".diff.img.0123abcd{disk.TEMP_SUFFIX}"
    theirs = wd / f".mac.0123abcd{disk.TEMP_SUFFIX}"
    ours.write_bytes(b"half a copy")
    theirs.write_bytes(b"not ours")
    make(str(wd), SIZE)
    assert not ours.exists() and theirs.exists()


def test_the_copy_holds_the_lock_prepare_holds(wd: Path, monkeypatch) -> None:
    held: list[str] = []

    @contextlib.contextmanager
    def locked(path: str) -> Iterator[None]:
        held.append(path)
        yield
        held.append("released")

    copies: list[str] = []
    real_copy = disk.copy
    monkeypatch.setattr(locks, "locked", locked)
    monkeypatch.setattr(
        disk, "copy", lambda *a, **k: copies.append(str(held)) or real_copy(*a, **k)
    )
    make(str(wd), SIZE)
    assert held == [str(wd), "released"]
    assert copies == [str([str(wd)])], "the copy ran inside the lock"


def test_no_base_image_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FreshDiskError) as caught:
        make(str(tmp_path), SIZE)
    assert str(caught.value) == (
        f"{tmp_path}/base.img is missing: run `virby prepare --config FILE` "
        "(the nix-darwin activation runs it)"
    )


def test_a_full_volume_is_one_line(wd: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(wd / ".diff.img.x.virby-tmp"))

    monkeypatch.setattr(disk, "copy", full)
    with pytest.raises(FreshDiskError) as caught:
        make(str(wd), SIZE)
    assert "No space left on device; free space on its volume" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_main_prints_one_line_and_exits(wd: Path, capsys) -> None:
    assert freshdisk.main([str(wd), str(SIZE)]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and err == ""
    assert freshdisk.main([str(wd / "nowhere"), str(SIZE)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "is missing" in err
    assert freshdisk.main(["only-one"]) == 2


def test_the_child_imports_what_the_daemon_imports() -> None:
    path = freshdisk.childEnvironment({"HOME": "/h"})["PYTHONPATH"].split(os.pathsep)
    assert path == [entry for entry in sys.path if entry]


# -- the daemon's side


def results(d) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


def test_the_child_runs_with_this_python_and_its_line_is_the_result(tmp_path) -> None:
    reactor = FakeReactor()
    got = results(makeFreshDisk(reactor, str(tmp_path), SIZE, 30.0))
    ((protocol, executable, args, env, path, _),) = reactor.spawned
    assert executable == sys.executable and path == str(tmp_path)
    assert args == [sys.executable, "-m", "virby.daemon.freshdisk", str(tmp_path), str(SIZE)]
    assert env["PYTHONPATH"] and protocol.transport.stdinClosed
    protocol.outReceived(b"made a fresh diff.img from base.img (reflink)\n")
    protocol.processEnded(Failure(ProcessDone(0)))
    assert got == ["made a fresh diff.img from base.img (reflink)"]
    assert reactor.getDelayedCalls() == [], "the timeout is cancelled"


def test_the_childs_error_line_fails_the_result(tmp_path) -> None:
    reactor = FakeReactor()
    got = results(makeFreshDisk(reactor, str(tmp_path), SIZE, 30.0))
    protocol = reactor.spawned[0][0]
    protocol.errReceived(b"/wd/base.img is missing: run `virby prepare --config FILE`\n")
    protocol.processEnded(Failure(ProcessTerminated(1)))
    (failure,) = got
    assert failure.check(FreshDiskError)
    assert str(failure.value) == (
        "no fresh diff.img: /wd/base.img is missing: run `virby prepare --config FILE`"
    )


def test_a_copy_that_takes_too_long_is_killed(tmp_path) -> None:
    reactor = FakeReactor()
    got = results(makeFreshDisk(reactor, str(tmp_path), SIZE, 30.0))
    protocol = reactor.spawned[0][0]
    reactor.advance(29)
    assert protocol.transport.signals == [] and got == []
    reactor.advance(1)
    assert protocol.transport.signals == ["KILL"]
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    (failure,) = got
    assert failure.check(FreshDiskError)
    assert "took longer than 30s (start-timeout)" in str(failure.value)


def test_a_boot_given_up_kills_the_copy(tmp_path) -> None:
    reactor = FakeReactor()
    d = makeFreshDisk(reactor, str(tmp_path), SIZE, 30.0)
    got = results(d)
    protocol = reactor.spawned[0][0]
    d.cancel()
    assert protocol.transport.signals == ["KILL"]
    assert got[0].check(CancelledError)
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    assert len(got) == 1 and reactor.getDelayedCalls() == []


def test_a_python_that_cannot_run_is_one_line(tmp_path) -> None:
    refusing = FakeReactor(refuse=OSError(2, "No such file or directory"))
    got = results(makeFreshDisk(refusing, str(tmp_path), SIZE, 30.0, executable="/nope"))
    assert got[0].check(FreshDiskError) and "cannot run /nope" in str(got[0].value)


def hypervisor(tmp_path: Path, reactor, **settings) -> VfkitHypervisor:
    (tmp_path / "vm_sshd_keys").mkdir(exist_ok=True)
    write_disk(tmp_path / "base.img", 2 * MIB, b"the image")
    config = fromMapping(
        {"working-directory": str(tmp_path), "disk-size": "1GiB", "start-timeout": 45,
         **settings}
    )  # fmt: skip
    made = VfkitHypervisor(reactor, config, "/bin/vfkit")
    checked: OneShot[None] = OneShot()
    made._orphanCheck = checked
    checked.fire(None)
    return made


def unheard(phase: BootPhase, what: str) -> None:
    """A boot's phases, where a test does not look at them."""


def test_ephemeral_boots_start_vfkit_only_after_the_fresh_disk(short_tmp) -> None:
    reactor = FakeReactor()
    phases: list[BootPhase] = []
    made = hypervisor(short_tmp, reactor, ephemeral=True)
    spawned = results(made.spawn(lambda phase, what: phases.append(phase)))
    assert phases == [BootPhase.FRESH_DISK]
    ((protocol, _, args, _, _, _),) = reactor.spawned
    assert args[2:] == ["virby.daemon.freshdisk", str(short_tmp), str(1024 * MIB)]
    assert reactor.getDelayedCalls()[0].getTime() == 45, "bounded by start-timeout"
    write_disk(short_tmp / "diff.img", MIB, b"")  # what the child made
    protocol.processEnded(Failure(ProcessDone(0)))
    assert len(reactor.spawned) == 2 and reactor.spawned[1][1] == "/bin/vfkit"
    assert spawned and not isinstance(spawned[0], Failure)
    assert phases == [BootPhase.FRESH_DISK, BootPhase.LEASE]


def test_a_failed_fresh_disk_fails_the_boot_without_vfkit(short_tmp) -> None:
    reactor = FakeReactor()
    spawned = results(hypervisor(short_tmp, reactor, ephemeral=True).spawn(unheard))
    protocol = reactor.spawned[0][0]
    protocol.errReceived(b"cannot make a fresh diff.img from base.img: No space left\n")
    protocol.processEnded(Failure(ProcessTerminated(1)))
    assert len(reactor.spawned) == 1, "no vfkit"
    assert spawned[0].check(FreshDiskError)
    assert str(spawned[0].value).startswith("no fresh diff.img: cannot make")


def test_the_vm_lock_is_held_for_the_copy_and_let_go_when_it_fails(short_tmp) -> None:
    reactor = FakeReactor()
    spawned = results(hypervisor(short_tmp, reactor, ephemeral=True).spawn(unheard))
    assert FileLock(str(short_tmp / VM_LOCK)).acquire() is False, "held during the copy"
    protocol = reactor.spawned[0][0]
    protocol.processEnded(Failure(ProcessTerminated(1)))
    assert spawned[0].check(FreshDiskError)
    assert FileLock(str(short_tmp / VM_LOCK)).acquire() is True, "released"


def test_a_boot_given_up_during_the_copy_lets_the_vm_lock_go(short_tmp) -> None:
    reactor = FakeReactor()
    spawning = hypervisor(short_tmp, reactor, ephemeral=True).spawn(unheard)
    spawned = results(spawning)
    spawning.cancel()
    assert reactor.spawned[0][0].transport.signals == ["KILL"]
    assert spawned[0].check(CancelledError)
    assert FileLock(str(short_tmp / VM_LOCK)).acquire() is True


def test_without_ephemeral_the_disk_is_left_alone(short_tmp) -> None:
    reactor = FakeReactor()
    write_disk(short_tmp / "diff.img", MIB, b"kept")
    results(hypervisor(short_tmp, reactor).spawn(unheard))
    ((_, executable, _, _, _, _),) = reactor.spawned
    assert executable == "/bin/vfkit"
