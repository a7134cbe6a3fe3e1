"""vfkit's command line, console, and graceful stop, on fakes and a task.Clock."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from tests.fakes import FakeProcessTransport, FakeReactor, logObserver
from virby.config import fromMapping
from virby.daemon.rest import RestError
from virby.daemon.vfkit import (
    ExitStatus,
    StopTimings,
    VfkitProcess,
    VfkitProtocol,
    VfkitStartError,
    readTail,
    vfkitError,
)
from virby.hostfacts import HostFacts
from virby.layout import WorkingDirectoryError
from virby.vfkitflags import HostPlan, VfkitNotFound, findVfkit, planHost, vfkitArguments

MAC = "02:94:00:00:00:01"


def config(**extra):
    return fromMapping({"working-directory": "/var/lib/virby", **extra})


def test_the_command_line_of_the_design() -> None:
    assert vfkitArguments(config(), "/bin/vfkit", MAC, createVariableStore=True) == [
        "/bin/vfkit",
        "--cpus", "8",
        "--memory", "6144",
        "--bootloader", "efi,variable-store=/var/lib/virby/efistore.nvram,create",
        "--device", "virtio-blk,path=/var/lib/virby/diff.img",
        "--device", "virtio-fs,sharedDir=/var/lib/virby/vm_sshd_keys,mountTag=sshd-keys",
        "--device", "virtio-net,nat,mac=02:94:00:00:00:01",
        "--device", "virtio-serial,logFilePath=/var/lib/virby/serial.log",
        "--device", "virtio-rng",
        "--device", "virtio-balloon",
        "--timesync", "vsockPort=1234",
        "--restful-uri", "unix:///var/lib/virby/vfkit.sock",
    ]  # fmt: skip


def test_options_extend_the_command_line() -> None:
    args = vfkitArguments(
        config(
            **{
                "rosetta": True,
                "nested-virtualization": True,
                "cores": 2,
                "memory": 2048,
                "shared-dirs": {"src": "/Users/me/src", "data": "/data"},
            }
        ),
        "vfkit",
        MAC,
        createVariableStore=False,
    )
    assert "efi,variable-store=/var/lib/virby/efistore.nvram" in args
    assert args[args.index("--cpus") + 1] == "2" and args[args.index("--memory") + 1] == "2048"
    assert args[-7:] == [
        "--device", "rosetta,mountTag=rosetta",
        "--nested",
        "--device", "virtio-fs,sharedDir=/data,mountTag=data",
        "--device", "virtio-fs,sharedDir=/Users/me/src,mountTag=src",
    ]  # fmt: skip


def test_find_vfkit(tmp_path) -> None:
    program = tmp_path / "vfkit"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert findVfkit("vfkit", path=str(tmp_path)) == str(program)
    assert findVfkit(str(program)) == str(program)
    with pytest.raises(VfkitNotFound, match="not found on PATH; install vfkit"):
        findVfkit("vfkit", path=str(tmp_path / "nowhere"))
    program.chmod(stat.S_IRUSR)
    with pytest.raises(VfkitNotFound):
        findVfkit(str(program))


def test_the_console_is_never_stdio() -> None:
    """vfkit puts a stdio console's stdin into raw mode, which fails on the daemon's pipe."""
    args = vfkitArguments(config(), "vfkit", MAC, createVariableStore=False)
    consoles = [
        args[i + 1] for i, a in enumerate(args) if a == "--device" and "serial" in args[i + 1]
    ]
    assert consoles == ["virtio-serial,logFilePath=/var/lib/virby/serial.log"]


def test_nested_follows_the_plan_not_only_the_config() -> None:
    cfg = config(**{"nested-virtualization": True})
    assert "--nested" in vfkitArguments(cfg, "vfkit", MAC, False)
    assert "--nested" not in vfkitArguments(cfg, "vfkit", MAC, False, nested=False)


def test_read_tail_reads_only_the_end(tmp_path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"one\r\ntwo\nthree\nfour\nfi")
    assert readTail(str(log), 3) == ["three", "four", "fi"]
    assert readTail(str(log), 10) == ["one", "two", "three", "four", "fi"]
    assert readTail(str(log), 0) == []
    assert readTail(str(tmp_path / "missing"), 5) == []


def test_read_tail_of_a_huge_console_reads_only_its_end(tmp_path) -> None:
    log = tmp_path / "serial.log"
    with open(log, "wb") as f:
        f.truncate(1 << 30)  # a sparse gigabyte of console: reading it all would take long
        f.seek(0, os.SEEK_END)
        f.write(b"\n".join(b"line %d" % i for i in range(5000)) + b"\n")
    assert readTail(str(log), 2) == ["line 4998", "line 4999"]
    cut = readTail(str(log), 100000, limit=4096)
    assert cut[-1] == "line 4999" and len(cut) < 4096 // len("line 4999")
    assert cut[0].startswith("line "), "the line cut by the seek is dropped"


def test_vfkits_usage_text_stays_out_of_the_log(capsys) -> None:
    from twisted.logger import globalLogPublisher

    seen: list[str] = []

    def observer(event) -> None:
        if (
            event.get("log_namespace") == "virby.daemon.vfkit"
            and event["log_level"].name != "debug"
        ):
            seen.append(event["line"])

    globalLogPublisher.addObserver(logObserver(observer))
    try:
        protocol = VfkitProtocol()
        protocol.errReceived(b'time="x" level=info msg="virtual machine parameters:"\n')
        protocol.errReceived(b"Error: inappropriate ioctl for device\nUsage:\n  vfkit [flags]\n")
        protocol.errReceived(
            b"\nFlags:\n  -c, --cpus uint   vCPUs\n\ninappropriate ioctl for device"
        )
        protocol.processEnded(Failure(ProcessDone(0)))
    finally:
        globalLogPublisher.removeObserver(logObserver(observer))
    assert seen == [
        'time="x" level=info msg="virtual machine parameters:"',
        "Error: inappropriate ioctl for device",
    ]


def test_exit_is_reported_to_every_waiter() -> None:
    protocol = VfkitProtocol()
    first: list[ExitStatus] = []
    second: list[ExitStatus] = []
    protocol.whenEnded().addCallback(lambda s: first.append(s))
    protocol.whenEnded().addCallback(second.append)
    protocol.processEnded(Failure(ProcessTerminated(None, signal=9)))
    assert first == second == [ExitStatus(None, 9)]
    assert first[0].describe() == "was killed by signal 9"
    late: list[ExitStatus] = []
    protocol.whenEnded().addCallback(late.append)
    assert late == first


class FakeRest:
    def __init__(self, clock: Clock, protocol: VfkitProtocol, works: bool, powers_off: set[str]):
        self.clock = clock
        self.protocol = protocol
        self.works = works
        self.powers_off = powers_off
        self.requests: list[tuple[float, str]] = []

    async def request(self, state: str) -> None:
        self.requests.append((self.clock.seconds(), state))
        if not self.works:
            raise RestError("unreachable")
        if state in self.powers_off:
            self.clock.callLater(1, self.protocol.processEnded, Failure(ProcessDone(0)))


def process(tmp_path, works=True, powers_off=("Stop",), dies_on=("TERM",), **settings):
    clock = FakeReactor()
    protocol = VfkitProtocol()
    transport = FakeProcessTransport(4242, protocol, dies_on)
    rest = FakeRest(clock, protocol, works, set(powers_off))
    cfg = fromMapping({"working-directory": str(tmp_path), **settings})
    (tmp_path / "vfkit.pid").write_text("4242")
    (tmp_path / "vfkit.sock").write_text("")
    return (
        VfkitProcess(clock, cfg, protocol, transport, rest, StopTimings(), mac=MAC),
        clock,
        rest,
        transport,
    )


def results(d: Deferred) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


def test_acpi_stop_is_enough_for_a_healthy_guest(short_tmp) -> None:
    vm, clock, rest, transport = process(short_tmp)
    done = results(vm.stop())
    clock.advance(1)
    assert done == [ExitStatus(0, None)]
    assert [s for _, s in rest.requests] == ["Stop"] and transport.signals == []
    assert not (short_tmp / "vfkit.pid").exists() and not (short_tmp / "vfkit.sock").exists()


def test_a_guest_that_ignores_acpi_is_hard_stopped(short_tmp) -> None:
    vm, clock, rest, transport = process(short_tmp, powers_off={"HardStop"})
    done = results(vm.stop())
    clock.advance(7)
    assert [(t, s) for t, s in rest.requests] == [(0, "Stop"), (7, "HardStop")]
    clock.advance(1)
    assert done == [ExitStatus(0, None)] and transport.signals == []


def test_without_an_api_signals_follow_at_once(short_tmp) -> None:
    vm, clock, _rest, transport = process(short_tmp, works=False, dies_on={"KILL"})
    done = results(vm.stop())
    assert transport.signals == ["TERM"], "no API: no waiting for ACPI"
    clock.advance(2)
    assert transport.signals == ["TERM", "KILL"]
    assert done == [ExitStatus(None, 15)]


def test_the_whole_sequence_fits_in_fifteen_seconds(short_tmp) -> None:
    vm, clock, _rest, transport = process(short_tmp, powers_off=set(), dies_on=set())
    done = results(vm.stop())
    for _ in range(150):
        clock.advance(0.1)
    assert transport.signals == ["TERM", "KILL"]
    assert done == [None]
    t = StopTimings()
    assert t.rest_timeout * 2 + t.acpi + t.hard + t.term + t.kill <= 15


def test_concurrent_stops_share_one_sequence(short_tmp) -> None:
    vm, clock, rest, _ = process(short_tmp)
    first, second = results(vm.stop()), results(vm.stop())
    clock.advance(1)
    assert first == second == [ExitStatus(0, None)]
    assert len(rest.requests) == 1


def test_runtime_files_of_another_process_are_left_alone(short_tmp) -> None:
    vm, _clock, _, _ = process(short_tmp)
    (short_tmp / "vfkit.pid").write_text("777")
    vm.protocol.processEnded(Failure(ProcessDone(0)))
    assert (short_tmp / "vfkit.pid").exists() and (short_tmp / "vfkit.sock").exists()


def test_start_checks_the_working_directory_and_writes_the_pidfile(short_tmp) -> None:
    reactor = FakeReactor(4242)
    cfg = fromMapping({"working-directory": str(short_tmp / "wd")})
    with pytest.raises(WorkingDirectoryError, match="missing: run `virby prepare"):
        VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC)
    os.mkdir(short_tmp / "wd")
    with pytest.raises(WorkingDirectoryError, match=r"diff\.img is missing"):
        VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC)
    (short_tmp / "wd" / "diff.img").write_bytes(b"")
    os.mkdir(short_tmp / "wd" / "vm_sshd_keys")
    (short_tmp / "wd" / "vfkit.sock").write_text("stale")
    vm = VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC)
    _, executable, args, _, path, fds = reactor.spawned[0]
    assert executable == "/bin/vfkit" and args[0] == "/bin/vfkit"
    assert "efi,variable-store=" + str(short_tmp / "wd" / "efistore.nvram") + ",create" in args
    assert path == str(short_tmp / "wd") and fds == {0: "w", 1: "r", 2: "r"}
    assert (short_tmp / "wd" / "vfkit.pid").read_text() == "4242"
    assert not (short_tmp / "wd" / "vfkit.sock").exists(), "a stale socket is removed"
    assert vm.pid == 4242
    (short_tmp / "wd" / "efistore.nvram").write_bytes(b"")
    VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC)
    assert not [a for a in reactor.spawned[1].args if a.endswith(",create")]


def test_stop_of_an_exited_vm_is_immediate(short_tmp) -> None:
    vm, _clock, rest, _ = process(short_tmp)
    vm.protocol.processEnded(Failure(ProcessDone(0)))
    assert results(vm.stop()) == [ExitStatus(0, None)]
    assert rest.requests == []
    assert succeed(None)


def test_the_console_tail_comes_from_serial_log_and_survives_the_exit(short_tmp) -> None:
    vm, _clock, _rest, _ = process(short_tmp)
    serial = short_tmp / "serial.log"
    serial.write_text("EFI stub\nsystemd[1]: Reached target Network.\nlogin:")
    assert vm.consoleTail(2) == ["systemd[1]: Reached target Network.", "login:"]
    vm.protocol.processEnded(Failure(ProcessDone(0)))
    assert not serial.exists(), "without debug the console goes with the VM"
    assert vm.consoleTail(3) == ["EFI stub", "systemd[1]: Reached target Network.", "login:"]


def test_with_debug_serial_log_is_kept(short_tmp) -> None:
    vm, _clock, _rest, _ = process(short_tmp, debug=True)
    (short_tmp / "serial.log").write_text("kernel panic\n")
    vm.protocol.processEnded(Failure(ProcessDone(1)))
    assert (short_tmp / "serial.log").read_text() == "kernel panic\n"
    assert vm.consoleTail() == ["kernel panic"]


def test_start_removes_the_last_console(short_tmp) -> None:
    reactor = FakeReactor(4242)
    cfg = fromMapping({"working-directory": str(short_tmp)})
    (short_tmp / "diff.img").write_bytes(b"x")
    os.mkdir(short_tmp / "vm_sshd_keys")
    (short_tmp / "serial.log").write_text("the last boot's console\n")
    vm = VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC)
    assert vm.consoleTail() == [], "a vfkit that fails before opening it shows no old console"


def test_start_passes_nested_as_planned(short_tmp) -> None:
    reactor = FakeReactor(4242)
    cfg = fromMapping({"working-directory": str(short_tmp), "nested-virtualization": True})
    (short_tmp / "diff.img").write_bytes(b"x")
    os.mkdir(short_tmp / "vm_sshd_keys")
    VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC, plan=HostPlan(nested=False))
    VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC, plan=HostPlan(nested=True))
    assert ["--nested" in args for _, _, args, *_ in reactor.spawned] == [False, True]


def facts(cpu="Apple M4 Pro", macos=(15, 1), rosetta=True, arm=True) -> HostFacts:
    return HostFacts(cpu=cpu, appleSilicon=arm, macos=macos, rosetta_installed=rosetta,
                     probes=())  # fmt: skip


def test_the_mac_is_not_asked_when_nothing_depends_on_it() -> None:
    def never() -> HostFacts:
        raise AssertionError("asked")

    assert planHost(config(), never) == HostPlan()


@pytest.mark.parametrize(
    ("mac", "nested", "words"),
    [
        (facts(), True, None),
        (facts(cpu="Apple M1 Pro"), False, "it needs Apple M3 or later, and this Mac has Apple M1"),
        (facts(cpu="Apple M3", macos=(14, 6)), False, "needs macOS 15 or later, and this Mac "
                                                       "runs macOS 14.6"),
        (facts(cpu="Intel(R) Core(TM) i9", arm=False, rosetta=None), False, "needs Apple silicon"),
        (facts(cpu=None, macos=None), True, "cannot tell"),
    ],
)  # fmt: skip
def test_nested_is_dropped_with_a_warning_where_the_mac_cannot(mac, nested, words) -> None:
    plan = planHost(config(**{"nested-virtualization": True}), lambda: mac)
    assert plan.nested is nested and plan.refusal is None
    if words is None:
        assert plan.warnings == ()
    else:
        (warning,) = plan.warnings
        assert warning.startswith("nested-virtualization is on, but") and words in warning
        assert ("booting the VM without --nested" in warning) is (not nested)


def test_missing_rosetta_refuses_boots_with_the_fix() -> None:
    plan = planHost(config(rosetta=True), lambda: facts(cpu="Apple M1", rosetta=False))
    assert plan.refusal == plan.warnings[0]
    assert plan.refusal == (
        "rosetta is on, but Rosetta is not installed on this Mac: run "
        "`softwareupdate --install-rosetta --agree-to-license`, then restart virbyd; "
        "until then no VM boots"
    )
    assert planHost(config(rosetta=True), lambda: facts()).refusal is None


# -- what a stop does when vfkit's API does not answer: against a real REST client


class HungAPI:
    """A unix socket that accepts requests and never answers them, like a hung vfkit."""

    def __init__(self, reactor, path: str) -> None:
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET, Site

        class Hang(Resource):
            isLeaf = True

            def render(self, request):
                return NOT_DONE_YET

        self.port = reactor.listenUNIX(path, Site(Hang()))


def real_process(tmp_path, reactor, dies_on: set[str], timings: StopTimings):
    from virby.daemon.rest import VfkitRestClient

    protocol = VfkitProtocol()
    transport = FakeProcessTransport(4242, protocol, dies_on)
    rest = VfkitRestClient(reactor, str(tmp_path / "vfkit.sock"), timings.rest_timeout)
    cfg = fromMapping({"working-directory": str(tmp_path)})
    return VfkitProcess(reactor, cfg, protocol, transport, rest, timings, mac=MAC), transport


#: Graces long enough that a stop that waited one out would blow the test's bound.
LONG = StopTimings(rest_timeout=0.2, acpi=60.0, hard=60.0, term=60.0, kill=60.0)


@pytest_twisted.ensureDeferred
async def test_a_hung_vfkit_is_not_waited_for(short_tmp, logged) -> None:
    from twisted.internet import reactor

    api = HungAPI(reactor, str(short_tmp / "vfkit.sock"))
    try:
        vm, transport = real_process(short_tmp, reactor, {"TERM"}, LONG)
        status = await vm.stop().addTimeout(20, reactor)
    finally:
        await api.port.stopListening()
    assert status == ExitStatus(None, 15)
    assert transport.signals == ["TERM"], "SIGTERM follows two unanswered requests at once"
    said = " | ".join(logged)
    assert "did not take Stop: vfkit did not answer Stop within 0.2s" in said
    assert "did not take HardStop" in said


@pytest_twisted.ensureDeferred
async def test_a_vfkit_without_its_api_yet_is_signalled_at_once(short_tmp, logged) -> None:
    from twisted.internet import reactor

    vm, transport = real_process(short_tmp, reactor, {"TERM"}, LONG)
    status = await vm.stop().addTimeout(20, reactor)
    assert status == ExitStatus(None, 15) and transport.signals == ["TERM"]
    assert "unreachable" in " | ".join(logged)


def test_a_dropped_answer_to_hardstop_waits_only_for_the_exit(short_tmp) -> None:
    from virby.daemon.rest import RestDropped

    vm, clock, rest, transport = process(short_tmp, powers_off=set(), dies_on=set())

    async def drop(state: str) -> None:
        rest.requests.append((clock.seconds(), state))
        if state == "HardStop":
            clock.callLater(0.1, vm.protocol.processEnded, Failure(ProcessDone(0)))
            raise RestDropped("vfkit closed the connection without answering HardStop")

    rest.request = drop
    done = results(vm.stop())
    clock.advance(7)
    clock.advance(0.1)
    assert done == [ExitStatus(0, None)] and transport.signals == []
    assert [s for _, s in rest.requests] == ["Stop", "HardStop"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ('time="2024-01-01T00:00:00Z" level=error msg="boom: it broke"', "boom: it broke"),
        ('time="x" level=fatal msg=oops', "oops"),
        ('time="x" level=info msg="virtual machine is running"', None),
        ('time="x" level=warning msg="Error configuring guest time synchronization"', None),
        ("nested virtualization is not supported", "nested virtualization is not supported"),
        ('level=error msg="failed action: \\"VZErrorDomain\\""', 'failed action: "VZErrorDomain"'),
    ],
)
def test_vfkit_errors_are_read_from_its_log(line: str, error: str | None) -> None:
    assert vfkitError(line) == error


def test_the_exit_carries_the_error_vfkit_returns_through_cobra() -> None:
    """cmd/vfkit/main.go returns it, cmd/vfkit/root.go prints it: no logrus line at all."""
    protocol = VfkitProtocol()
    protocol.errReceived(b'time="x" level=info msg="waiting for VM to stop"\n')
    why = b"virtualization error: hypervisor virtualization error"
    protocol.errReceived(b"Error: " + why + b"\nUsage:\n  vfkit [flags]\n\nFlags:\n")
    protocol.errReceived(b"      --bootloader string   bootloader configuration\n\n" + why + b"\n")
    protocol.processEnded(Failure(ProcessTerminated(1)))
    status = protocol.status
    assert status is not None
    assert status.describe() == (
        "exited with status 1 (vfkit: virtualization error: hypervisor virtualization error)"
    )


def test_the_exit_carries_vfkits_last_error() -> None:
    protocol = VfkitProtocol()
    protocol.errReceived(b'time="x" level=info msg="virtual machine is running"\n')
    protocol.errReceived(b'time="x" level=error msg="virtualization error: hypervisor vir')
    protocol.errReceived(b'tualization error"\ntime="x" level=info msg="exit handlers ran"\n')
    protocol.processEnded(Failure(ProcessTerminated(1)))
    status = protocol.status
    assert status is not None
    assert status.message == "virtualization error: hypervisor virtualization error"
    assert status.describe() == (
        "exited with status 1 (vfkit: virtualization error: hypervisor virtualization error)"
    )


def test_a_clean_exit_says_nothing_more() -> None:
    protocol = VfkitProtocol()
    protocol.errReceived(b'time="x" level=error msg="failed to shutdown VM"\n')
    protocol.processEnded(Failure(ProcessDone(0)))
    assert protocol.status is not None and protocol.status.describe() == "exited with status 0"


def test_vfkit_inherits_the_vm_lock_and_it_is_let_go_when_vfkit_is_gone(short_tmp) -> None:
    from virby.locks import FileLock

    reactor = FakeReactor(4242)
    wd = short_tmp / "wd"
    (wd / "vm_sshd_keys").mkdir(parents=True)
    (wd / "diff.img").write_bytes(b"")
    cfg = fromMapping({"working-directory": str(wd)})
    lock = FileLock(str(wd / "vm.lock"))
    assert lock.acquire()
    vm = VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC, vmLock=lock)
    fds = reactor.spawned[0].childFDs
    assert fds == {0: "w", 1: "r", 2: "r", 3: lock.fileno()}
    assert not FileLock(str(wd / "vm.lock")).acquire()
    vm.protocol.processEnded(Failure(ProcessDone(0)))
    assert not lock.held and FileLock(str(wd / "vm.lock")).acquire()


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.ENOSPC, "no space left on the device holding {pidfile}: free some space there"),
        (errno.EROFS, "the file system holding {pidfile} is read-only"),
        (errno.EIO, "cannot write {pidfile}: Input/output error"),
    ],
)
def test_a_vfkit_whose_pidfile_cannot_be_written_is_killed_and_reaped(
    short_tmp, monkeypatch, code, cause
) -> None:
    """
    A full disk fails the pidfile after vfkit was spawned: left running, that vfkit would
    hold vm.lock for good and outlive the daemon.  It is killed, and its exit is reaped
    through its protocol.
    """
    (short_tmp / "diff.img").write_bytes(b"")
    os.mkdir(short_tmp / "vm_sshd_keys")
    pidfile = str(short_tmp / "vfkit.pid")

    def full(path: str, data: bytes, mode: int) -> None:
        raise OSError(code, os.strerror(code), path + ".tmp")

    monkeypatch.setattr("virby.daemon.vfkit.writeAtomically", full)
    reactor = FakeReactor(4242, diesOn={"KILL"})
    cfg = fromMapping({"working-directory": str(short_tmp)})
    with capturedLogs() as events, pytest.raises(VfkitStartError) as caught:
        VfkitProcess.start(reactor, cfg, "/bin/vfkit", MAC)
    assert str(caught.value) == "cannot record vfkit's pid: " + cause.format(pidfile=pidfile)
    transport = reactor.transport
    assert transport.signals == ["KILL"]
    assert transport.protocol.status is not None, "its exit was reaped"
    said = [formatEvent(e) for e in events]
    assert "killing vfkit (pid 4242): its start failed" in said
    assert "vfkit (pid 4242) was killed by signal 15" in said
    assert not os.path.exists(pidfile)
