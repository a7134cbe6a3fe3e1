"""The service tree: startup checks, listening, status document, shutdown order."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import capturedLogs, formatEvent

from tests.fakes import FakeHypervisor, FakeReactor, logObserver, readyGuest
from virby.config import fromMapping
from virby.daemon.hypervisor import BootError, VfkitHypervisor
from virby.daemon.lifecycle import Lifecycle
from virby.daemon.logfile import CHECK_INTERVAL, LogFile
from virby.daemon.proxy import ProxyFactory
from virby.daemon.readiness import ReadyGuest
from virby.daemon.service import DaemonCommands, DaemonService, StartupError, makeDaemonService
from virby.vfkitflags import HostPlan


@pytest.fixture
def signals() -> Iterator[dict[signal.Signals, Any]]:
    """
    The daemon installs the process's SIGTERM, SIGINT and SIGHUP handlers: the test sees
    pytest's, and gets them back afterwards, so that ^C still stops the test run.
    """
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {signum: signal.getsignal(signum) for signum in signums}
    yield saved
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def config(tmp_path, **extra):
    return fromMapping({"working-directory": str(tmp_path), **extra})


def fake_vfkit(tmp_path) -> str:
    program = tmp_path / "bin" / "vfkit"
    program.parent.mkdir(exist_ok=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    return str(program)


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("no-wd", "is missing: run `virby prepare"),
        ("no-vfkit", "was not found"),
        ("bad-endpoint", "listen endpoint 'nonsense:1' is not valid"),
    ],
)
def test_startup_problems_are_one_line_and_exit_1(short_tmp, capsys, setup, words) -> None:
    wd = short_tmp / "wd"
    if setup != "no-wd":
        wd.mkdir()
    vfkit = str(short_tmp / "missing") if setup == "no-vfkit" else fake_vfkit(short_tmp)
    listen = "nonsense:1" if setup == "bad-endpoint" else "tcp:0:interface=127.0.0.1"
    cfg = fromMapping({"working-directory": str(wd), "vfkit": vfkit, "listen": listen})
    with pytest.raises(SystemExit) as caught:
        makeDaemonService(cfg, FakeReactor())
    assert caught.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def service(short_tmp, reactor, endpoint=None, onDemand=True) -> DaemonService:
    cfg = config(short_tmp)
    hypervisor = FakeHypervisor(readyGuest, slowSpawn=True)
    lifecycle = Lifecycle(reactor, hypervisor, onDemand=onDemand, ttl=60)
    endpoint = endpoint or TCP4ServerEndpoint(reactor, 31222, interface="127.0.0.1")
    return DaemonService(reactor, cfg, endpoint, hypervisor, lifecycle)


def test_start_listens_and_describes_itself(short_tmp) -> None:
    reactor = FakeReactor()
    daemon = service(short_tmp, reactor)
    daemon.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (31222, "127.0.0.1")
    ]
    unix = reactor.unixServers[0]
    assert unix[0] == str(short_tmp / "control.sock") and unix[3] == 0o600
    reactor.advance(5)
    document = daemon.describe()
    assert document["state"] == "stopped"
    assert document["daemon_pid"] == os.getpid() and document["daemon_uptime"] == 5
    assert document["listening"] and document["ttl"] == 10800
    assert document["start_timeout"] == 180 and document["boot_phase"] is None
    assert (document["bytes_to_guest"], document["bytes_from_guest"]) == (0, 0)


@pytest.mark.parametrize(
    ("interface", "warned"), [("127.0.0.1", False), ("0.0.0.0", True), ("192.168.1.5", True)]
)
def test_a_listen_address_other_hosts_reach_is_named_at_start(short_tmp, interface, warned) -> None:
    class Port:
        def getHost(self) -> IPv4Address:
            return IPv4Address("TCP", interface, 31222)

        def stopListening(self) -> None:
            pass

    class Endpoint:
        def listen(self, factory) -> Deferred:
            return succeed(Port())

    reactor = FakeReactor()
    endpoint = Endpoint()
    with capturedLogs() as events:
        service(short_tmp, reactor, endpoint).startService()
    lines = [formatEvent(e) for e in events if "other hosts can reach" in formatEvent(e)]
    assert lines == (
        [
            f"the builder listens on {interface}:31222, which other hosts can reach: only "
            "loopback peers are served, the others are refused; listen on 127.0.0.1 or ::1 "
            "instead"
        ]
        if warned
        else []
    )


def test_a_port_in_use_is_one_line(short_tmp) -> None:
    from twisted.internet import reactor

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        endpoint = TCP4ServerEndpoint(reactor, busy.getsockname()[1], interface="127.0.0.1")
        daemon = service(short_tmp, FakeReactor(), endpoint)
        with pytest.raises(StartupError) as caught:
            daemon.startService()
        assert "cannot listen on" in str(caught.value) and "in use" in str(caught.value)
        assert "\n" not in str(caught.value)
    finally:
        busy.close()


def test_shutdown_stops_listening_then_the_vm_then_the_control_socket(short_tmp) -> None:
    reactor = FakeReactor()
    daemon = service(short_tmp, reactor)
    daemon.startService()
    done: list = []
    daemon.stopService().addBoth(done.append)
    assert done == [None]
    assert daemon.lifecycle.state.value == "shutdown"


def test_a_mac_that_cannot_nest_boots_without_nested_and_says_why(
    short_tmp, monkeypatch, signals
) -> None:
    from twisted.logger import globalLogPublisher

    monkeypatch.setenv("VIRBY_EMULATOR_CPU", "Apple M1")
    monkeypatch.setattr("sys.platform", "linux")
    (short_tmp / "wd").mkdir()
    cfg = fromMapping(
        {"working-directory": str(short_tmp / "wd"), "vfkit": fake_vfkit(short_tmp),
         "listen": "tcp:0:interface=127.0.0.1", "nested-virtualization": True}
    )  # fmt: skip
    logged: list[str] = []
    observer = lambda event: logged.append(event.get("warning", ""))  # noqa: E731
    globalLogPublisher.addObserver(logObserver(observer))
    try:
        daemon = makeDaemonService(cfg, FakeReactor())
    finally:
        globalLogPublisher.removeObserver(logObserver(observer))
    warning = (
        "nested-virtualization is on, but this Mac cannot run it: it needs Apple M3 or "
        "later, and this Mac has Apple M1; booting the VM without --nested"
    )
    assert [line for line in logged if line] == [warning]
    assert daemon.describe()["warnings"] == [warning]
    assert all(signal.getsignal(signum) is not before for signum, before in signals.items())
    assert isinstance(daemon._hypervisor, VfkitHypervisor)
    assert daemon._hypervisor.plan.nested is False


def test_once_running_the_daemon_checks_on_its_clock_whether_its_log_was_rotated(
    short_tmp, monkeypatch, signals
) -> None:
    checked: list[str | None] = []
    monkeypatch.setattr(LogFile, "rotated", lambda self: checked.append(self.path) or False)
    (short_tmp / "wd").mkdir()
    cfg = fromMapping(
        {"working-directory": str(short_tmp / "wd"), "vfkit": fake_vfkit(short_tmp),
         "listen": "tcp:0:interface=127.0.0.1"}
    )  # fmt: skip
    reactor = FakeReactor()
    makeDaemonService(cfg, reactor)
    reactor.run()
    assert checked == []
    reactor.advance(CHECK_INTERVAL)
    reactor.advance(CHECK_INTERVAL)
    assert len(checked) == 2


def test_missing_rosetta_refuses_each_boot_at_once_without_vfkit(short_tmp) -> None:
    cfg = config(short_tmp, rosetta=True)
    refusal = "rosetta is on, but Rosetta is not installed on this Mac: run it"
    # The refusal comes before any use of the reactor: there is none.
    hypervisor = VfkitHypervisor(
        None,  # type: ignore[arg-type]
        cfg,
        "/nonexistent/vfkit",
        HostPlan(refusal=refusal),
    )
    failures: list = []
    hypervisor.spawn(noReport).addErrback(failures.append)
    assert failures and failures[0].check(BootError)
    assert str(failures[0].value) == refusal
    assert not (short_tmp / "vfkit.pid").exists()


def test_the_status_document_has_no_warnings_when_all_is_well(short_tmp) -> None:
    daemon = service(short_tmp, FakeReactor())
    assert daemon.describe()["warnings"] == []


def test_a_boot_without_a_lease_says_when_the_guest_sent_a_duid(short_tmp) -> None:
    from tests.unit.test_leases import DUID_ONLY
    from virby.daemon.readiness import BootTimeout

    leases = short_tmp / "dhcpd_leases"
    leases.write_text(DUID_ONLY)
    prepared(short_tmp)
    (short_tmp / "mac").write_text("52:54:00:12:03:0a\n")
    cfg = config(short_tmp, **{"leases-file": str(leases), "start-timeout": 5})
    reactor = FakeReactor(4242)
    hypervisor = VfkitHypervisor(reactor, cfg, "/bin/vfkit")
    (vm,) = outcome(hypervisor.spawn(noReport))
    assert vm.mac == "52:54:00:12:03:0a", "the VM carries the MAC it was started with"
    waiting = outcome(hypervisor.waitReady(vm, noReport))
    reactor.advance(5)
    reactor.advance(1)
    (failure,) = waiting
    assert failure.check(BootTimeout) and failure.value.reason == "no-lease"
    message = str(failure.value)
    assert "DUID client id" in message and 'clientid ""' in message and "\n" not in message


# -- one daemon per working directory, and a start that fails leaves nothing


def test_a_stale_pid_never_stops_a_start(short_tmp) -> None:
    (short_tmp / "daemon.lock").write_text(f"{os.getppid()}\n")
    os.symlink(str(os.getppid()), short_tmp / "control.sock.lock")  # an older version's lock
    daemon = service(short_tmp, FakeReactor())
    daemon.startService()
    assert (short_tmp / "daemon.lock").read_text() == f"{os.getpid()}\n"
    assert not os.path.lexists(short_tmp / "control.sock.lock")
    done: list = []
    daemon.stopService().addBoth(done.append)
    assert done == [None] and not (short_tmp / "daemon.lock").exists()


@pytest.mark.parametrize("junk", ["file", "socket", "symlink"])
def test_junk_at_the_control_socket_is_replaced(short_tmp, junk) -> None:
    path = short_tmp / "control.sock"
    if junk == "file":
        path.write_text("junk")
    elif junk == "socket":
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(path))
    else:
        os.symlink("/nonexistent", path)
    reactor = FakeReactor()
    service(short_tmp, reactor).startService()
    assert not os.path.lexists(path), "cleared before listening"
    assert reactor.unixServers[0][0] == str(path)


def test_a_directory_at_the_control_socket_is_one_line(short_tmp) -> None:
    (short_tmp / "control.sock").mkdir()
    with pytest.raises(StartupError) as caught:
        service(short_tmp, FakeReactor()).startService()
    assert "is a directory, not the control socket: remove it" in str(caught.value)
    assert not (short_tmp / "daemon.lock").exists()


def test_a_second_daemon_on_one_working_directory_is_one_line(short_tmp) -> None:
    first = service(short_tmp, FakeReactor())
    first.startService()
    second = service(short_tmp, FakeReactor())
    with pytest.raises(StartupError) as caught:
        second.startService()
    message = str(caught.value)
    assert f"another virby daemon (pid {os.getpid()}) is already serving {short_tmp}" in message
    assert "\n" not in message
    assert (short_tmp / "daemon.lock").exists(), "the first daemon keeps its lock"


def test_a_failed_start_leaves_nothing_behind(short_tmp) -> None:
    from twisted.internet import reactor

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        endpoint = TCP4ServerEndpoint(reactor, busy.getsockname()[1], interface="127.0.0.1")
        with pytest.raises(StartupError):
            service(short_tmp, FakeReactor(), endpoint).startService()
    finally:
        busy.close()
    assert sorted(os.listdir(short_tmp)) == [], "no control.sock, no lock file"


# -- no second VM on a disk a live process holds


def prepared(tmp_path):
    (tmp_path / "vm_sshd_keys").mkdir()
    (tmp_path / "diff.img").write_bytes(b"")
    return config(tmp_path)


def noReport(phase, what) -> None:
    """A boot's phases, where a test does not look at them."""


def outcome(d) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


def test_no_vm_boots_while_a_process_holds_the_vm_lock(short_tmp) -> None:
    from virby.locks import FileLock

    held = FileLock(str(short_tmp / "vm.lock"))
    assert held.acquire()
    reactor = FakeReactor(4242)
    hypervisor = VfkitHypervisor(reactor, prepared(short_tmp), "/bin/vfkit")
    (failure,) = outcome(hypervisor.spawn(noReport))
    assert failure.check(BootError)
    assert f"a VM of {short_tmp} is still running: a process holds {short_tmp}/vm.lock" in str(
        failure.value
    )
    assert reactor.spawned == []
    held.release()
    (vm,) = outcome(hypervisor.spawn(noReport))
    assert 3 in reactor.spawned[0].childFDs and vm.pid == 4242


def test_an_orphan_that_could_not_be_stopped_is_checked_again(short_tmp, monkeypatch) -> None:
    import virby.daemon.hypervisor
    from virby.daemon.orphans import OrphanError

    attempts: list = []

    async def stubborn(reactor, working_directory):
        attempts.append(working_directory)
        if len(attempts) == 1:
            raise OrphanError("the VM left by a previous daemon (vfkit pid 7) survived SIGKILL")
        return None

    monkeypatch.setattr(virby.daemon.hypervisor, "stopOrphan", stubborn)
    reactor = FakeReactor(4242)
    hypervisor = virby.daemon.hypervisor.VfkitHypervisor(reactor, prepared(short_tmp), "/bin/vfkit")
    (failure,) = outcome(hypervisor.spawn(noReport))
    assert failure.check(OrphanError) and reactor.spawned == []
    (vm,) = outcome(hypervisor.spawn(noReport))
    assert len(attempts) == 2 and vm.pid == 4242
    outcome(hypervisor.spawn(noReport))
    assert len(attempts) == 2, "a check that succeeded is not repeated"


def test_the_builder_port_serves_as_many_connections_as_its_descriptors_allow(short_tmp) -> None:
    from virby.daemon.capacity import ConnectionLimit, DescriptorLimit

    reactor = FakeReactor()
    cfg = config(short_tmp)
    hypervisor = FakeHypervisor(readyGuest, slowSpawn=True)
    lifecycle = Lifecycle(reactor, hypervisor, onDemand=True, ttl=60)
    endpoint = TCP4ServerEndpoint(reactor, 31222, interface="127.0.0.1")
    limit = DescriptorLimit(256, 1024, None, None)
    DaemonService(reactor, cfg, endpoint, hypervisor, lifecycle, limit).startService()
    factory = reactor.tcpServers[0][1]
    assert isinstance(factory, ConnectionLimit) and factory.limit == 480


@pytest.mark.linux
def test_the_relays_pipes_are_held_to_the_budget_that_counts_the_connections(short_tmp) -> None:
    from virby.daemon.capacity import ConnectionLimit, DescriptorLimit

    reactor = FakeReactor()
    hypervisor = FakeHypervisor(readyGuest, slowSpawn=True)
    lifecycle = Lifecycle(reactor, hypervisor, onDemand=True, ttl=60)
    endpoint = TCP4ServerEndpoint(reactor, 31222, interface="127.0.0.1")
    limit = DescriptorLimit(256, 1024, None, None, pipes=64)
    daemon = DaemonService(reactor, config(short_tmp), endpoint, hypervisor, lifecycle, limit)
    daemon.startService()
    factory = reactor.tcpServers[0][1]
    assert isinstance(factory, ConnectionLimit) and factory.limit == (1024 - 64 - 128) // 2
    assert isinstance(factory.wrapped, ProxyFactory)
    pool = factory.wrapped.pipes
    assert pool is not None
    taken = [pool.take() for _ in range(65)]
    assert taken[-1] is None and None not in taken[:-1], "the pool lends 64 pipes, no more"
    for pipe in taken[:-1]:
        assert pipe is not None
        pool.discard(pipe)


def test_the_control_commands_start_stop_and_describe(short_tmp) -> None:
    reactor = FakeReactor()
    hypervisor = FakeHypervisor(
        readyGuest, readyAtOnce=ReadyGuest("192.168.64.2", 22), quickStop=True, console=[]
    )
    lifecycle = Lifecycle(reactor, hypervisor, onDemand=True, ttl=60)
    daemon = DaemonService(
        reactor, config(short_tmp), TCP4ServerEndpoint(reactor, 0), hypervisor, lifecycle
    )
    commands = DaemonCommands(daemon)
    started: list = []
    commands.start().addBoth(started.append)
    assert started == [
        {"booted": True, "vm_ip": "192.168.64.2", "vm_port": 22, "boot_seconds": 0.0}
    ]
    assert commands.status()["state"] == "running"
    stopped: list = []
    commands.stop(False).addBoth(stopped.append)
    assert stopped == [{"stopped": True, "closed_connections": 0}]
    assert commands.status()["state"] == "stopped"
