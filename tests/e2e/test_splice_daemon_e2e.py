"""
The splice in the whole daemon: the first client of a boot gets the readiness probe's
connection, the bytes are counted for C{virby status}, clients that hang up while the VM boots
stop counting at once, and a VM that dies while they wait closes each of them once, in order.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from testbed.builder import Builder

pytestmark = pytest.mark.e2e


@pytest.fixture
def builder(tmp_path):
    made = Builder(tmp_path, debug=True)
    yield made
    made.cleanup()


def test_the_first_client_of_a_boot_gets_the_probes_connection_and_bytes_count(builder):
    daemon = builder.start()
    result = builder.ssh("head", "-c", "100000", "/dev/zero")
    assert result.returncode == 0, result.stderr + daemon.text()
    assert len(result.stdout) == 100_000
    daemon.wait_for_line(r"gets the readiness probe's connection")
    assert builder.ssh("true").returncode == 0
    status = builder.status()
    assert status["bytes_from_guest"] > 100_000 and status["bytes_to_guest"] > 1000, status
    assert daemon.text().count("gets the readiness probe's connection") == 1, "once a boot"


@pytest.fixture
def booting(builder):
    # The boot hangs until the test is done with it.
    builder.env["VIRBY_EMULATOR_BOOT_DELAY"] = "120"
    return builder


def test_clients_that_hang_up_while_the_vm_boots_stop_counting(booting) -> None:
    builder = booting
    daemon = builder.start()
    clients = [socket.create_connection(("127.0.0.1", builder.port), timeout=30) for _ in range(5)]
    daemon.wait_for_line(r"vfkit: .*virtual machine is running")
    stays = socket.create_connection(("127.0.0.1", builder.port), timeout=30)
    try:
        for client in clients:
            client.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            client.close()
        for _ in clients:
            daemon.wait_for_line(r"hung up before the guest answered")
        status = builder.status()
        assert status["state"] == "booting"
        # The one that stays waits for the boot: it counts once, as waiting.
        assert (status["active_connections"], status["waiting_connections"]) == (0, 1), status
    finally:
        stays.close()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0


def test_a_vfkit_that_dies_during_a_boot_closes_each_waiting_client_once_and_in_order(
    booting,
) -> None:
    builder = booting
    daemon = builder.start()
    client = socket.create_connection(("127.0.0.1", builder.port), timeout=30)
    try:
        daemon.wait_for_line(r"vfkit: .*virtual machine is running")
        (emulator,) = builder.emulators()
        os.kill(emulator, signal.SIGKILL)
        daemon.wait_for_line(r"the VM was killed by signal 9")
        assert client.recv(16) == b"", "an orderly close: an EOF, not a reset"
        daemon.wait_for_line(r"closing the connection from .*127\.0\.0\.1")
    finally:
        client.close()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert daemon.text().count("closing the connection from") == 1, daemon.text()
