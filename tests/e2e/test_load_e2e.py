"""
200 builds connecting at once, end to end: real twistd, the vfkit emulator, a real sshd
guest.  Each burst arrives while the daemon is stopped (SIGSTOP), as it would while it is
busy: the kernel's accept queue alone must hold it, and then every client must be served
by one boot.  A client "served" has the guest's SSH banner; a client refused sees its
connection closed.  None may hang.
"""

from __future__ import annotations

import selectors
import shutil
import signal
import socket
import sys
import time

import pytest

from testbed.builder import Builder, tool
from testbed.processes import ProcessUnderTest

pytestmark = pytest.mark.e2e

CLIENTS = 200

#: Hands the socket on as systemd does (fd 3, LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES).
ACTIVATOR = """
import os, sys
os.dup2({fd}, 3)
os.close({fd})
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="builder")
os.execv(sys.argv[1], sys.argv[1:])
"""


def start(builder: Builder, *flags: str, prefix=(), reactor=(), pass_fds=()) -> ProcessUnderTest:
    """The daemon as launchd would start it, behind C{prefix} (a limit, an activator)."""
    daemon = ProcessUnderTest(
        [*prefix, tool("twistd"), *reactor, "--nodaemon", "--pidfile=", "virby",
         "--config", str(builder.config), *flags],
        env=builder.env, cwd=str(builder.root), pass_fds=pass_fds,
    )  # fmt: skip
    builder.daemons.append(daemon)
    return daemon


def burst(
    builder: Builder, daemon: ProcessUnderTest, clients: int = CLIENTS, hangUp: bool = False
) -> dict[str, int]:
    """
    Connect C{clients} at once while the daemon is stopped, let it run, and wait for each
    to get a banner (served) or see its connection closed (refused).  Clients with neither
    after the deadline are lost.  With C{hangUp}, each client closes once it has its
    answer, as a build that ends would; otherwise all stay open to the end.
    """
    daemon.signal(signal.SIGSTOP)
    sockets = []
    try:
        for _ in range(clients):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", builder.port))
            sockets.append(client)
    finally:
        daemon.signal(signal.SIGCONT)
    outcome = {"served": 0, "refused": 0, "lost": 0}
    received = {client: b"" for client in sockets}
    deadline = time.monotonic() + 120
    with selectors.DefaultSelector() as selector:
        for client in sockets:
            selector.register(client, selectors.EVENT_READ)
        while received and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                fileobj = key.fileobj
                assert isinstance(fileobj, socket.socket)
                client = fileobj
                try:
                    data = client.recv(256)
                except OSError:
                    data = b""
                received[client] += data
                if not data or b"\n" in received[client]:
                    served = received[client].startswith(b"SSH-2.0-")
                    outcome["served" if served else "refused"] += 1
                    selector.unregister(client)
                    del received[client]
                    if hangUp:
                        client.close()
    outcome["lost"] = len(received)
    for client in sockets:
        client.close()
    return outcome


def test_200_at_cold_start_through_a_tcp_listener_all_served_by_one_boot(make_builder) -> None:
    builder = make_builder()
    daemon = start(builder)
    daemon.wait_for_line(r"serving the builder on")
    assert burst(builder, daemon) == {"served": CLIENTS, "refused": 0, "lost": 0}
    assert daemon.text().count("booting the VM") == 1
    assert len(builder.emulators()) == 1


def test_200_at_cold_start_through_an_adopted_socket_all_served_by_one_boot(
    make_builder,
) -> None:
    """An activator that listened with a short queue (16), as a default launchd socket on a
    Mac listens with kern.ipc.somaxconn (128)."""
    builder = make_builder()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", builder.port))
    listener.listen(16)
    fd = listener.fileno()
    try:
        activator = [sys.executable, "-c", ACTIVATOR.format(fd=fd)]
        daemon = start(
            builder, "--listen", "systemd:domain=INET:index=0", prefix=activator, pass_fds=[fd]
        )
    finally:
        listener.close()
    daemon.wait_for_line(r"serving the builder on")
    assert burst(builder, daemon) == {"served": CLIENTS, "refused": 0, "lost": 0}
    assert daemon.text().count("booting the VM") == 1
    assert len(builder.emulators()) == 1


def test_200_at_cold_start_under_systemd_socket_activate_all_served_by_one_boot(
    make_builder,
) -> None:
    """Started by its first connection, as launchd starts an on-demand job."""
    builder = make_builder()
    activator = [
        shutil.which("systemd-socket-activate") or "systemd-socket-activate",
        "-l", f"127.0.0.1:{builder.port}", "--fdname=builder",
        "-E", "VIRBY_EMULATOR_LEASES_FILE", "-E", "VIRBY_EMULATOR_GUEST_PORT",
        "-E", "VIRBY_EMULATOR_BOOT_DELAY", "-E", "PATH",
    ]  # fmt: skip
    daemon = start(builder, "--listen", "systemd:domain=INET:index=0", prefix=activator)
    daemon.wait_for_line(r"Listening on")
    assert burst(builder, daemon) == {"served": CLIENTS, "refused": 0, "lost": 0}
    assert daemon.text().count("booting the VM") == 1
    assert len(builder.emulators()) == 1


def test_500_at_cold_start_all_served_past_the_guests_listen_queue(make_builder) -> None:
    """
    Told the VM is up in one turn, 500 waiting clients would connect to the guest at once
    and overflow its sshd's listen queue (128); a bounded number of connects in flight, and
    a retry of a guest connection that stays silent, serve them all, with one boot.
    """
    builder = make_builder()
    daemon = start(builder)
    daemon.wait_for_line(r"serving the builder on")
    started = time.monotonic()
    assert burst(builder, daemon, clients=500) == {"served": 500, "refused": 0, "lost": 0}
    assert time.monotonic() - started < 90
    assert daemon.text().count("booting the VM") == 1
    assert "closing the connection" not in daemon.text()


def prlimit(soft: int, hard: int) -> list[str]:
    program = shutil.which("prlimit")
    if program is None:
        pytest.skip("prlimit (util-linux) is not installed")
    return [program, f"--nofile={soft}:{hard}", "--"]


def test_200_at_cold_start_under_launchds_default_of_256_open_files(make_builder) -> None:
    builder = make_builder()
    daemon = start(builder, prefix=prlimit(256, 8192))
    daemon.wait_for_line(r"open files: 4096 \(started with 256, hard limit 8192\)")
    daemon.wait_for_line(r"serving the builder on")
    assert burst(builder, daemon) == {"served": CLIENTS, "refused": 0, "lost": 0}
    assert daemon.text().count("booting the VM") == 1


def test_the_select_reactor_is_held_below_its_ceiling(make_builder) -> None:
    """macOS's default reactor is select: the daemon stays below descriptor 1024."""
    builder = make_builder()
    daemon = start(builder, prefix=prlimit(256, 8192), reactor=["--reactor=select"])
    daemon.wait_for_line(
        r"open files: 1024 \(started with 256, hard limit 8192\); serving up to 416 "
        r"connections at once, beside up to 64 pipes for splice\(2\) \(the select reactor "
        r"watches descriptors below 1024 only\)"
    )
    daemon.wait_for_line(r"serving the builder on")
    assert burst(builder, daemon) == {"served": CLIENTS, "refused": 0, "lost": 0}


def test_past_the_limit_connections_wait_in_the_accept_queue_and_are_all_served(
    make_builder,
) -> None:
    """
    A hard limit of 128 open files: 64 kept, 8 pipes of two, 24 connections of two.  300
    clients at once, each closing after the banner: the daemon stops accepting at 24 and
    takes the next as each one ends; none is closed unserved.
    """
    builder = make_builder()
    daemon = start(builder, prefix=prlimit(128, 128))
    daemon.wait_for_line(r"open files: 128 \(started with 128, hard limit 128\); serving up to 24")
    daemon.wait_for_line(r"serving the builder on")
    started = time.monotonic()
    outcome = burst(builder, daemon, clients=300, hangUp=True)
    assert outcome == {"served": 300, "refused": 0, "lost": 0}
    assert time.monotonic() - started < 90
    daemon.wait_for_line(r"holding new connections in the accept queue: 24 are open")
    daemon.wait_for_line(r"accepting again: new connections waited in the accept queue")
    text = daemon.text()
    assert "closing a new connection" not in text and "closed " not in text
    assert "Traceback" not in text and "Too many open files" not in text
    assert daemon.text().count("booting the VM") == 1
