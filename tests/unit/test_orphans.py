"""A VM left by a crashed daemon: found by what only ours has, stopped; nothing else touched."""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure

from tests.fakes import FakeReactor
from virby.daemon.orphans import (
    OrphanError,
    commandLine,
    isAlive,
    isOurVfkit,
    readPid,
    stopOrphan,
)
from virby.reactors import hostReactor

WD = "/var/lib/virby"
OURS = (
    "/nix/store/x-vfkit/bin/vfkit --cpus 8 --memory 6144 "
    "--bootloader efi,variable-store=/var/lib/virby/efistore.nvram "
    "--device virtio-blk,path=/var/lib/virby/diff.img "
    "--device virtio-fs,sharedDir=/var/lib/virby/vm_sshd_keys,mountTag=sshd-keys "
    "--device virtio-net,nat,mac=02:94:00:00:00:01 --restful-uri unix:///var/lib/virby/vfkit.sock"
)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (OURS, True),
        ("/usr/bin/python3 /venv/bin/hypervisor " + OURS.split(" ", 1)[1], True),
        ("/bin/sh /opt/wrapper " + OURS.split(" ", 1)[1], True),
        (OURS.replace("virtio-blk,path=/var/lib/virby/diff.img",
                      "virtio-blk,path=/var/lib/virby/diff.img,readonly"), True),
        (OURS.replace("/var/lib/virby/vfkit.sock", "/var/lib/virby-2/vfkit.sock"), False),
        (OURS.replace("/var/lib/virby/diff.img", "/var/lib/virby/diff.img.bak"), False),
        (OURS.replace("/var/lib/virby/", "/var/lib/virby-old/"), False),
        ("vfkit --cpus 2 --device virtio-blk,path=/Users/me/.crc/crc.img "
         "--restful-uri tcp://localhost:7777", False),
        ("/opt/homebrew/bin/vfkit --restful-uri unix:///Users/me/.podman/machine.sock", False),
        ("/bin/sleep 100", False),
        ("", False),
        (None, False),
    ],
)  # fmt: skip
def test_our_vfkit_is_known_by_its_socket_and_disk(command, expected) -> None:
    assert isOurVfkit(command, WD) is expected


def test_paths_with_spaces_and_regex_characters(tmp_path) -> None:
    wd = "/Volumes/My Disk/virby (1)+"
    command = f"vfkit --device virtio-blk,path={wd}/diff.img --restful-uri unix://{wd}/vfkit.sock"
    assert isOurVfkit(command, wd)
    assert not isOurVfkit(command, "/Volumes/My Disk/virby (1)")


def test_read_pid(tmp_path) -> None:
    path = tmp_path / "vfkit.pid"
    assert readPid(str(path)) is None
    path.write_text("123")
    assert readPid(str(path)) == 123
    for junk in ("12x", "", "99999999999999999999", "-5"):
        path.write_text(junk)
        assert readPid(str(path)) is None


def test_is_alive() -> None:
    assert isAlive(os.getpid())
    assert not isAlive(2**22 + 12345)


@pytest.mark.linux
@pytest_twisted.ensureDeferred
async def test_command_line_reads_the_process_arguments() -> None:
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    command = await commandLine(reactor, os.getpid())
    assert command is not None and "pytest" in command
    assert await commandLine(reactor, 2**22 + 12345) is None


class World:
    """A process table the test controls."""

    def __init__(self, clock: FakeReactor, command: str | None, dies_on: int | None) -> None:
        self.clock = clock
        self.command = command
        self.dies_on = dies_on
        self.living = {4242}
        self.sent: list[tuple[float, int]] = []

    def alive(self, pid: int) -> bool:
        return pid in self.living

    def kill(self, pid: int, signum: int) -> None:
        self.sent.append((self.clock.seconds(), signum))
        if signum == self.dies_on:
            self.clock.callLater(0.5, self.living.discard, pid)

    async def argv(self, reactor, pid: int) -> str | None:
        return self.command


def run(tmp_path, world: World) -> list:
    (tmp_path / "vfkit.pid").write_text("4242")
    d = Deferred.fromCoroutine(
        stopOrphan(world.clock, str(tmp_path), alive=world.alive, kill=world.kill, argv=world.argv)
    )
    box: list = []
    d.addBoth(box.append)
    return box


def ours(tmp_path) -> str:
    return OURS.replace("/var/lib/virby", str(tmp_path))


def test_a_leftover_vfkit_is_terminated(tmp_path) -> None:
    clock = FakeReactor()
    world = World(clock, ours(tmp_path), dies_on=signal.SIGTERM)
    result = run(tmp_path, world)
    assert world.sent == [(0, signal.SIGTERM)]
    for _ in range(10):
        clock.advance(0.1)
    assert result == [4242]
    assert not (tmp_path / "vfkit.pid").exists()


def test_one_started_through_a_wrapper_is_ours_too(tmp_path) -> None:
    clock = FakeReactor()
    command = "/usr/bin/python3 /opt/hypervisor " + ours(tmp_path).split(" ", 1)[1]
    world = World(clock, command, dies_on=signal.SIGTERM)
    result = run(tmp_path, world)
    for _ in range(10):
        clock.advance(0.1)
    assert result == [4242] and world.sent == [(0, signal.SIGTERM)]


def test_one_that_ignores_sigterm_is_killed(tmp_path) -> None:
    clock = FakeReactor()
    world = World(clock, ours(tmp_path), dies_on=signal.SIGKILL)
    result = run(tmp_path, world)
    for _ in range(80):
        clock.advance(0.1)
    assert [s for _, s in world.sent] == [signal.SIGTERM, signal.SIGKILL]
    assert world.sent[1][0] == pytest.approx(5, abs=0.11)
    assert result == [4242]


def test_one_that_survives_sigkill_keeps_its_pidfile_and_is_an_error(tmp_path) -> None:
    clock = FakeReactor()
    world = World(clock, ours(tmp_path), dies_on=None)
    result = run(tmp_path, world)
    for _ in range(80):
        clock.advance(0.1)
    (failure,) = result
    assert failure.check(OrphanError)
    assert "survived SIGKILL" in str(failure.value) and "no second VM" in str(failure.value)
    assert (tmp_path / "vfkit.pid").read_text() == "4242", "kept until it is really gone"


@pytest.mark.parametrize(
    "command",
    [
        "/usr/bin/ssh-agent",
        "/opt/homebrew/bin/vfkit --restful-uri unix:///Users/me/.podman/machine.sock",
        None,
    ],
)
def test_a_process_that_is_not_ours_is_left_alone(tmp_path, command) -> None:
    clock = FakeReactor()
    world = World(clock, command, dies_on=signal.SIGTERM)
    result = run(tmp_path, world)
    assert result == [None] and world.sent == []
    assert not (tmp_path / "vfkit.pid").exists(), "the stale pidfile goes"


def test_a_dead_pid_is_only_cleaned_up(tmp_path) -> None:
    clock = FakeReactor()
    world = World(clock, ours(tmp_path), dies_on=None)
    world.living.clear()
    assert run(tmp_path, world) == [None] and world.sent == []


@pytest_twisted.ensureDeferred
async def test_command_line_through_ps_as_on_macos(monkeypatch, short_tmp) -> None:
    """
    The macOS path: C{ps -ww -o command= -p PID} as a child process, where there is no
    C{/proc}.  The C{ps} here plays BSD's: the command line alone, no header, and exit
    status 1 with nothing printed when no process has the pid.
    """
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)

    import virby.daemon.orphans

    ps = short_tmp / "ps"
    ps.write_text(
        "#!/bin/sh\n"
        '[ "$*" = "-ww -o command= -p 4242" ] || exit 1\n'
        "echo '/usr/bin/vfkit --cpus 2 --restful-uri unix:///var/lib/virby/vfkit.sock'\n"
    )
    ps.chmod(0o755)
    monkeypatch.setattr(virby.daemon.orphans, "PS", str(ps))
    command = await commandLine(reactor, 4242, proc=None)
    assert command == "/usr/bin/vfkit --cpus 2 --restful-uri unix:///var/lib/virby/vfkit.sock"
    assert await commandLine(reactor, 2**22 + 12345, proc=None) is None


@pytest_twisted.ensureDeferred
async def test_a_ps_that_hangs_is_killed_and_the_command_line_is_unknown() -> None:
    """A C{ps} stuck on a loaded Mac must not hold the boot: it is bounded like any child."""
    from tests.fakes import FakeReactor

    reactor = FakeReactor()
    d = Deferred.fromCoroutine(commandLine(reactor, 4242, proc=None, timeout=10.0))
    ((protocol, executable, args, *_),) = reactor.spawned
    assert args == [executable, "-ww", "-o", "command=", "-p", "4242"]
    reactor.advance(10)
    assert protocol.transport.signals == ["KILL"]
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    assert await d is None
