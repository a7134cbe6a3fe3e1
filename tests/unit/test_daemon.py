"""The service tree: startup checks, listening, status document, shutdown order."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock

from virby.config import from_mapping
from virby.daemon import DaemonService, StartupError, VfkitHypervisor, makeDaemonService
from virby.lifecycle import Lifecycle
from virby.vfkit import HostPlan


def config(tmp_path, **extra):
    return from_mapping({"working-directory": str(tmp_path), **extra})


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
    cfg = from_mapping({"working-directory": str(wd), "vfkit": vfkit, "listen": listen})
    with pytest.raises(SystemExit) as caught:
        makeDaemonService(cfg, MemoryReactorClock())
    assert caught.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and words in lines[0], lines


class IdleHypervisor:
    def __init__(self) -> None:
        self.orphanChecks = 0

    def stopOrphan(self) -> Deferred:
        self.orphanChecks += 1
        return succeed(None)

    def spawn(self) -> Deferred:
        return Deferred()

    def waitReady(self, vm) -> Deferred:
        return Deferred()


def service(short_tmp, reactor, endpoint=None, onDemand=True) -> DaemonService:
    cfg = config(short_tmp)
    hypervisor = IdleHypervisor()
    lifecycle = Lifecycle(reactor, hypervisor, onDemand=onDemand, ttl=60)
    endpoint = endpoint or TCP4ServerEndpoint(reactor, 31222, interface="127.0.0.1")
    return DaemonService(reactor, cfg, endpoint, hypervisor, lifecycle)


def test_start_listens_and_describes_itself(short_tmp) -> None:
    reactor = MemoryReactorClock()
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
    assert (document["bytes_to_guest"], document["bytes_from_guest"]) == (0, 0)


def test_a_port_in_use_is_one_line(short_tmp) -> None:
    from twisted.internet import reactor

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        endpoint = TCP4ServerEndpoint(reactor, busy.getsockname()[1], interface="127.0.0.1")
        daemon = service(short_tmp, MemoryReactorClock(), endpoint)
        with pytest.raises(StartupError) as caught:
            daemon.startService()
        assert "cannot listen on" in str(caught.value) and "in use" in str(caught.value)
        assert "\n" not in str(caught.value)
    finally:
        busy.close()


def test_shutdown_stops_listening_then_the_vm_then_the_control_socket(short_tmp) -> None:
    reactor = MemoryReactorClock()
    daemon = service(short_tmp, reactor)
    daemon.startService()
    done: list = []
    daemon.stopService().addBoth(done.append)
    assert done == [None]
    assert daemon.lifecycle.state.value == "shutdown"


def test_a_mac_that_cannot_nest_boots_without_nested_and_says_why(short_tmp, monkeypatch) -> None:
    from twisted.logger import globalLogPublisher

    monkeypatch.setenv("VIRBY_EMULATOR_CPU", "Apple M1")
    monkeypatch.setattr("sys.platform", "linux")
    (short_tmp / "wd").mkdir()
    cfg = from_mapping(
        {"working-directory": str(short_tmp / "wd"), "vfkit": fake_vfkit(short_tmp),
         "listen": "tcp:0:interface=127.0.0.1", "nested-virtualization": True}
    )  # fmt: skip
    logged: list[str] = []
    observer = lambda event: logged.append(event.get("warning", ""))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        daemon = makeDaemonService(cfg, MemoryReactorClock())
    finally:
        globalLogPublisher.removeObserver(observer)
    warning = (
        "nested-virtualization is on, but this Mac cannot run it: it needs Apple M3 or "
        "later, and this Mac has Apple M1; booting the VM without --nested"
    )
    assert [line for line in logged if line] == [warning]
    assert daemon.describe()["warnings"] == [warning]
    assert daemon._hypervisor.plan.nested is False


def test_missing_rosetta_refuses_each_boot_at_once_without_vfkit(short_tmp) -> None:
    cfg = config(short_tmp, rosetta=True)
    refusal = "rosetta is on, but Rosetta is not installed on this Mac: run it"
    hypervisor = VfkitHypervisor(None, cfg, "/nonexistent/vfkit", HostPlan(refusal=refusal))
    failures: list = []
    hypervisor.spawn().addErrback(failures.append)
    assert failures and failures[0].check(StartupError)
    assert str(failures[0].value) == refusal
    assert not (short_tmp / "vfkit.pid").exists()


def test_the_status_document_has_no_warnings_when_all_is_well(short_tmp) -> None:
    daemon = service(short_tmp, MemoryReactorClock())
    assert daemon.describe()["warnings"] == []
