"""Orphaned vfkit: found through the pidfile, checked, stopped; nothing else signalled."""

from __future__ import annotations

import os
import signal

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from virby.orphans import is_alive, is_vfkit, read_pid, stop_orphan


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/nix/store/x-vfkit/bin/vfkit", "--cpus", "8"], True),
        (["vfkit"], True),
        (["/opt/bin/myvfkit"], True),
        (["/usr/bin/python3", "/venv/bin/vfkit-emulator", "--cpus"], True),
        (["python3", "-m", "virby.emulator"], True),
        (["/bin/sleep", "100"], False),
        ([], False),
    ],
)
def test_is_vfkit(argv, expected) -> None:
    assert is_vfkit(argv, "/opt/bin/myvfkit") is expected


def test_read_pid(tmp_path) -> None:
    path = tmp_path / "vfkit.pid"
    assert read_pid(str(path)) is None
    path.write_text("123")
    assert read_pid(str(path)) == 123
    path.write_text("12x")
    assert read_pid(str(path)) is None


def test_is_alive() -> None:
    assert is_alive(os.getpid())
    assert not is_alive(2**22 + 12345)


class World:
    """A process table the test controls."""

    def __init__(self, clock: Clock, argv: list[str], dies_on: int | None) -> None:
        self.clock = clock
        self.argv = argv
        self.dies_on = dies_on
        self.living = {4242}
        self.sent: list[tuple[float, int]] = []

    def alive(self, pid: int) -> bool:
        return pid in self.living

    def kill(self, pid: int, signum: int) -> None:
        self.sent.append((self.clock.seconds(), signum))
        if signum == self.dies_on:
            self.clock.callLater(0.5, self.living.discard, pid)

    async def command(self, reactor, pid: int) -> list[str]:
        return self.argv


def run(tmp_path, world: World) -> list:
    (tmp_path / "vfkit.pid").write_text("4242")
    d = Deferred.fromCoroutine(
        stop_orphan(
            world.clock,
            str(tmp_path / "vfkit.pid"),
            "vfkit",
            alive=world.alive,
            kill=world.kill,
            argv=world.command,
        )
    )
    box: list = []
    d.addBoth(box.append)
    return box


def test_a_leftover_vfkit_is_terminated(tmp_path) -> None:
    clock = Clock()
    world = World(clock, ["/bin/vfkit", "--cpus", "2"], dies_on=signal.SIGTERM)
    result = run(tmp_path, world)
    assert world.sent == [(0, signal.SIGTERM)]
    for _ in range(10):
        clock.advance(0.1)
    assert result == [4242]
    assert not (tmp_path / "vfkit.pid").exists()


def test_one_that_ignores_sigterm_is_killed(tmp_path) -> None:
    clock = Clock()
    world = World(clock, ["vfkit"], dies_on=signal.SIGKILL)
    result = run(tmp_path, world)
    for _ in range(80):
        clock.advance(0.1)
    assert [s for _, s in world.sent] == [signal.SIGTERM, signal.SIGKILL]
    assert world.sent[1][0] == pytest.approx(5, abs=0.11)
    assert result == [4242]


def test_a_recycled_pid_is_left_alone(tmp_path) -> None:
    clock = Clock()
    world = World(clock, ["/usr/bin/ssh-agent"], dies_on=signal.SIGTERM)
    result = run(tmp_path, world)
    assert result == [None] and world.sent == []
    assert not (tmp_path / "vfkit.pid").exists(), "the stale pidfile goes"


def test_a_dead_pid_is_only_cleaned_up(tmp_path) -> None:
    clock = Clock()
    world = World(clock, ["vfkit"], dies_on=None)
    world.living.clear()
    assert run(tmp_path, world) == [None] and world.sent == []
