"""
Clients that wait for a booting VM, end to end: the ones that hang up stop counting at once,
and a VM that dies while they wait closes each of them once, in order.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tests.e2e.builder import Builder

pytestmark = pytest.mark.e2e


@pytest.fixture
def builder(tmp_path):
    made = Builder(tmp_path, debug=True)
    # The boot hangs until the test is done with it.
    made.env["VIRBY_EMULATOR_BOOT_DELAY"] = "120"
    yield made
    made.cleanup()


def test_clients_that_hang_up_while_the_vm_boots_stop_counting(builder) -> None:
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
        assert (status["active_connections"], status["waiting_connections"]) == (1, 1), status
    finally:
        stays.close()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0


def test_a_vfkit_that_dies_during_a_boot_closes_each_waiting_client_once_and_in_order(
    builder,
) -> None:
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
