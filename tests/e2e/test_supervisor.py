"""
The tests' launchd (L{testbed.supervisor}), proven with a daemon of one line: it takes
the socket from fd 3 as systemd's protocol hands it, answers one connection with its pid,
and exits 0.  What the renewal of the VM rests on is what is proven here: the socket
outlives the daemon, a connection made while none runs waits in its queue for the next,
an always-on job comes back no sooner than its throttle, and an on-demand one at the next
connection.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator

import pytest

from testbed.builder import read_line
from testbed.processes import pids_of
from testbed.supervisor import Exit, Supervisor

pytestmark = pytest.mark.e2e

#: A daemon that answers one connection: it checks systemd's variables as a daemon adopting
#: the socket would (the pid must be its own, which only the wrapper's exec makes so).
ANSWER_ONCE = (
    "import os, socket\n"
    "assert os.environ['LISTEN_PID'] == str(os.getpid()), 'LISTEN_PID is not mine'\n"
    "assert os.environ['LISTEN_FDS'] == '1'\n"
    "listener = socket.socket(fileno=3)\n"
    "listener.setblocking(True)\n"
    "connection, _ = listener.accept()\n"
    "connection.sendall(b'answered by %d\\n' % os.getpid())\n"
    "connection.close()\n"
)


@pytest.fixture
def supervise() -> Iterator[Callable[..., Supervisor]]:
    """Make supervisors of this test's daemon of one line; kill what a failure left."""
    made: list[Supervisor] = []

    def make(*, keepAlive: bool, throttle: float) -> Supervisor:
        command = [sys.executable, "-c", ANSWER_ONCE]
        supervisor = Supervisor(command, keepAlive=keepAlive, throttle=throttle)
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        supervisor.process.kill_all()


def ask(port: int) -> bytes:
    """Connect to the job's port and read the one line its daemon answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        return read_line(connection)


def test_the_socket_outlives_the_daemon_and_queues_for_the_next(supervise) -> None:
    supervisor = supervise(keepAlive=False, throttle=0)
    assert supervisor.starts() == [], "on demand: nothing runs before a connection"
    first = ask(supervisor.port)
    (start,) = supervisor.starts()
    assert first == b"answered by %d\n" % start.pid
    assert supervisor.waitExits(1) == [Exit(start.pid, 0)]
    assert supervisor.starts() == [start], "on demand: nothing runs until a connection"
    # No daemon runs now: the kernel takes the connection into the held socket's queue.
    with socket.create_connection(("127.0.0.1", supervisor.port), timeout=10) as waiting:
        assert read_line(waiting) == b"answered by %d\n" % supervisor.starts()[1].pid
    assert [exit.status for exit in supervisor.waitExits(2)] == [0, 0]
    assert supervisor.stop() == 0


def test_on_demand_waits_for_a_connection_to_start_again(supervise) -> None:
    supervisor = supervise(keepAlive=False, throttle=0)
    ask(supervisor.port)
    supervisor.waitExits(1)
    supervisor.process.wait_for_count(r"^supervisor: waiting for a connection$", 2)
    # Bounded: with no throttle a job that did not wait would be back at once.
    with pytest.raises(AssertionError, match="1 seen"):
        supervisor.waitStarts(2, timeout=2)
    second = ask(supervisor.port)
    assert second == b"answered by %d\n" % supervisor.starts()[1].pid
    assert supervisor.stop() == 0


def test_keep_alive_starts_at_once_and_again_no_sooner_than_the_throttle(supervise) -> None:
    throttle = 2.0
    supervisor = supervise(keepAlive=True, throttle=throttle)
    (first,) = supervisor.waitStarts(1)
    assert ask(supervisor.port) == b"answered by %d\n" % first.pid
    assert supervisor.waitExits(1) == [Exit(first.pid, 0)]
    supervisor.process.wait_for_line(r"supervisor: throttled: starting in")
    # Made while the job waits out its throttle: the next daemon answers it.
    assert ask(supervisor.port) == b"answered by %d\n" % supervisor.starts()[1].pid
    second = supervisor.starts()[1]
    assert second.at - first.at >= throttle, "started again within the throttle"
    assert supervisor.waitStarts(3)[2].pid not in (first.pid, second.pid)
    assert supervisor.stop() == 0


def test_stop_ends_the_daemon_closes_the_socket_and_leaves_no_process(supervise) -> None:
    supervisor = supervise(keepAlive=True, throttle=0)
    (running,) = supervisor.waitStarts(1)
    supervisor_pid = supervisor.process.pid
    assert supervisor.stop() == 0
    assert supervisor.exits() == [Exit(running.pid, -15)], "stopped by SIGTERM, as launchd does"
    assert "supervisor: stopped" in supervisor.text()
    for pid in (supervisor_pid, running.pid):
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} is still running"
    assert pids_of(r"LISTEN_PID=\$\$") == [], "a wrapper is left"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", supervisor.port), timeout=10)


def test_the_real_daemon_exits_and_the_next_one_serves_the_waiting_ssh(make_builder) -> None:
    """On demand, as the module's default job: the port stays, the next daemon boots anew."""
    builder = make_builder()
    supervisor = builder.supervised(throttle=0)
    assert builder.ssh("echo", "first").stdout == "first\n", supervisor.text()
    (first,) = supervisor.starts()
    os.kill(first.pid, signal.SIGTERM)
    assert supervisor.waitExits(1) == [Exit(first.pid, 0)], supervisor.text()
    assert builder.emulators() == [], "the daemon stops its VM as it exits"
    supervisor.process.wait_for_count(r"^supervisor: waiting for a connection$", 2)
    result = builder.ssh("echo", "second")
    assert result.stdout == "second\n", result.stderr + supervisor.text()
    (_, second) = supervisor.starts()
    assert second.pid != first.pid and len(builder.emulators()) == 1
    assert supervisor.stop() == 0
    assert supervisor.exits() == [Exit(first.pid, 0), Exit(second.pid, 0)]
    assert builder.emulators() == [] and builder.guests() == []


def test_the_real_daemon_always_on_is_started_again_at_once(make_builder) -> None:
    builder = make_builder(**{"on-demand": False})
    supervisor = builder.supervised(throttle=1)
    (first,) = supervisor.waitStarts(1)
    supervisor.process.wait_for_line(r"VM ready at", timeout=60)
    os.kill(first.pid, signal.SIGTERM)
    assert supervisor.waitExits(1) == [Exit(first.pid, 0)], supervisor.text()
    second = supervisor.waitStarts(2)[1]
    supervisor.process.wait_for_line(r"VM ready at", timeout=60)
    assert builder.ssh("echo", "again").stdout == "again\n", supervisor.text()
    assert second.pid != first.pid and len(builder.emulators()) == 1
    assert supervisor.stop() == 0
    assert builder.emulators() == [] and builder.guests() == []
