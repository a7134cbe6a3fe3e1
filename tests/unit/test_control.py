"""
The control protocol: one request, one reply; bounded in size and time; only the daemon's
owner may ask; malformed requests get an error reply.  The server on string transports and a
task.Clock, the client against scripted servers (old and new daemons), the commands.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import socket
import sys
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.fakes import FakeCommands
from virby.cli.client import LAUNCHD_PLIST, DaemonDown, ask
from virby.cli.startstop import WAKE_POLL, WAKE_TIMEOUT, knock, runStart, runStop, startTimeout
from virby.cli.status import EXIT_DOWN
from virby.config import fromMapping
from virby.daemon.control import REPLY_TIMEOUT, REQUEST_TIMEOUT, ControlFactory, socketPeerUid
from virby.daemon.lifecycle import VMBusy
from virby.errors import VirbyError
from virby.wire import MAX_REQUEST, Refused, Request, parseRequest

OWNER = os.geteuid()


def connect(uid: int | None = OWNER, commands: Any = None):
    clock = Clock()
    commands = commands or FakeCommands()
    factory = ControlFactory(commands, clock, peerUid=lambda transport: uid)
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock, commands


def reply(transport: StringTransport) -> dict[str, Any]:
    raw = transport.value()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1, raw
    assert transport.disconnecting, "one reply, then the daemon hangs up"
    document = json.loads(raw)
    assert document["version"] == 1
    return document


def line(**request: Any) -> bytes:
    return json.dumps(request).encode() + b"\n"


# -- the server


def test_status_is_one_request_and_one_reply() -> None:
    protocol, transport, _, _ = connect()
    protocol.dataReceived(line(version=1, command="status"))
    assert reply(transport) == {
        "version": 1,
        "ok": True,
        "status": {"state": "running", "vm_ip": "192.168.64.7"},
    }


def test_a_request_may_come_in_pieces() -> None:
    protocol, transport, _, _ = connect()
    for piece in (b'{"version": 1, ', b'"command": "sta', b'tus"}', b"\n"):
        assert transport.value() == b""
        protocol.dataReceived(piece)
    assert reply(transport)["ok"] is True


def test_start_replies_once_the_vm_is_ready() -> None:
    protocol, transport, _, commands = connect()
    protocol.dataReceived(line(version=1, command="start"))
    assert transport.value() == b"" and len(commands.starts) == 1
    outcome = {"booted": True, "vm_ip": "192.168.64.7", "vm_port": 22, "boot_seconds": 8.4}
    commands.starts[0].callback(outcome)
    assert reply(transport) == {"version": 1, "ok": True, **outcome}


def test_stop_passes_force_and_a_refusal_is_its_line() -> None:
    protocol, transport, _, commands = connect()
    protocol.dataReceived(line(version=1, command="stop", force=True))
    ((force, d),) = commands.stops
    assert force is True
    d.errback(VMBusy("2 connections are open (a build may be running): `virby stop --force`"))
    assert reply(transport) == {
        "version": 1,
        "ok": False,
        "error": "2 connections are open (a build may be running): `virby stop --force`",
    }


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"status\n", "the request is not JSON: send one JSON object on one line"),
        (b"[1]\n", "the request must be a JSON object"),
        (line(command="status"), 'the request has no "version" (an integer; this daemon speaks 1)'),
        (line(version=True, command="status"), 'the request has no "version"'),
        (line(version=2, command="status"),
         "protocol version 2 is not spoken here: this daemon speaks 1; use the virby command "
         "of the same package"),
        (line(version=1, command="reboot"),
         "unknown command 'reboot': the commands are status, start, stop, renew"),
        (line(version=1), "unknown command None: the commands are status, start, stop, renew"),
        (line(version=1, command="stop", forse=True), "unknown key 'forse' in the request"),
        (line(version=1, command="stop", force="yes"), '"force" must be true or false'),
        (line(version=1, command="renew", package=1),
         '"package" must be a string, the directory of a Virby package'),
        (b"\xff\xfe\n", "the request is not JSON"),
    ],
)  # fmt: skip
def test_malformed_requests_get_an_error_reply(raw: bytes, error: str) -> None:
    protocol, transport, _, commands = connect()
    protocol.dataReceived(raw)
    answer = reply(transport)
    assert answer["ok"] is False and answer["error"].startswith(error)
    assert commands.starts == commands.stops == []


def test_a_client_that_sends_nothing_is_cut_off() -> None:
    _, transport, clock, _ = connect()
    clock.advance(REQUEST_TIMEOUT - 0.1)
    assert transport.value() == b""
    clock.advance(0.1)
    assert reply(transport) == {"version": 1, "ok": False, "error": "no request within 5s"}


def test_a_client_that_sends_megabytes_is_cut_off() -> None:
    protocol, transport, _, commands = connect()
    protocol.dataReceived(b"x" * (MAX_REQUEST - 1))
    assert transport.value() == b""
    protocol.dataReceived(b"x" * 1024 * 1024)
    assert reply(transport)["error"] == f"the request is longer than {MAX_REQUEST} bytes"
    protocol.dataReceived(b"x" * 1024 * 1024)  # what is still in flight is ignored
    assert transport.value().count(b"\n") == 1 and commands.starts == []


def test_a_long_line_is_refused_even_with_its_newline() -> None:
    protocol, transport, _, _ = connect()
    protocol.dataReceived(b" " * MAX_REQUEST + line(version=1, command="status"))
    assert reply(transport)["error"] == f"the request is longer than {MAX_REQUEST} bytes"


def test_a_flood_after_the_request_is_cut_off_and_withdraws_the_wait() -> None:
    protocol, transport, _, commands = connect()
    protocol.dataReceived(line(version=1, command="start"))
    protocol.dataReceived(b"x" * MAX_REQUEST)
    assert not transport.disconnecting
    protocol.dataReceived(b"x")
    protocol.connectionLost(None)
    assert commands.cancelled == 1


def test_a_request_ended_by_the_end_of_input_is_answered() -> None:
    """As C{nc -N} and C{socat} send it: the request, then a half-close."""
    protocol, transport, _, _ = connect()
    protocol.dataReceived(line(version=1, command="status"))
    assert reply(transport)["ok"] is True


@pytest.mark.parametrize("raw", [b'{"version": 1, "command": "status"}', b'{"version": 1,', b""])
def test_the_end_of_input_answers_what_was_received(raw: bytes) -> None:
    protocol, transport, _, _ = connect()
    if raw:
        protocol.dataReceived(raw)
    assert transport.value() == b""
    protocol.readConnectionLost()
    answer = reply(transport)
    if raw.endswith(b"}"):
        assert answer["ok"] is True and answer["status"]["state"] == "running"
    elif raw:
        assert answer == {"version": 1, "ok": False, "error": "the request is not JSON: send "
                          "one JSON object on one line"}  # fmt: skip
    else:
        assert answer["error"] == "the input ended before a request: send one JSON object"


def test_the_end_of_input_after_a_request_keeps_its_wait() -> None:
    protocol, transport, _, commands = connect()
    protocol.dataReceived(line(version=1, command="start"))
    protocol.readConnectionLost()
    assert commands.cancelled == 0 and transport.value() == b""
    commands.starts[0].callback({"booted": False})
    assert reply(transport)["booted"] is False


def test_the_protocol_is_half_closeable() -> None:
    """Else the reactor closes the whole connection at a client's half-close (C{nc -N})."""
    from twisted.internet.interfaces import IHalfCloseableProtocol

    from virby.daemon.control import ControlProtocol

    assert IHalfCloseableProtocol.implementedBy(ControlProtocol)


def test_the_control_socket_queues_as_many_as_the_builder_port() -> None:
    from virby.daemon.capacity import BACKLOG
    from virby.daemon.control import controlEndpoint

    assert controlEndpoint(Clock(), "/nonexistent/control.sock")._backlog == BACKLOG  # type: ignore[arg-type]


def test_a_client_that_does_not_read_its_reply_is_cut_off() -> None:
    aborted: list[bool] = []
    protocol, transport, clock, _ = connect()
    transport.abortConnection = lambda: aborted.append(True)
    protocol.dataReceived(line(version=1, command="status"))
    clock.advance(REPLY_TIMEOUT)
    assert aborted == [True]


def test_a_client_that_leaves_withdraws_its_start_but_the_boot_goes_on() -> None:
    protocol, _, clock, commands = connect()
    protocol.dataReceived(line(version=1, command="start"))
    protocol.connectionLost(None)
    assert commands.cancelled == 1
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("uid", [1000, None])
def test_only_the_daemons_owner_and_root_may_ask(uid) -> None:
    protocol, transport, _, commands = connect(uid=uid)
    answer = reply(transport)
    assert answer["ok"] is False
    assert answer["error"].startswith("only root and the daemon's user (")
    assert answer["error"].endswith(") may ask the daemon: run the command with sudo")
    protocol.dataReceived(line(version=1, command="stop", force=True))
    assert commands.stops == [], "nothing a refused peer sends is read"


def test_root_may_ask() -> None:
    protocol, transport, _, _ = connect(uid=0)
    protocol.dataReceived(line(version=1, command="status"))
    assert reply(transport)["ok"] is True


def test_a_bug_in_a_command_is_an_error_reply_and_the_daemon_goes_on(caplog) -> None:
    class Broken(FakeCommands):
        def status(self) -> dict[str, Any]:
            raise RuntimeError("bug")

    protocol, transport, _, _ = connect(commands=Broken())
    protocol.dataReceived(line(version=1, command="status"))
    assert reply(transport) == {
        "version": 1,
        "ok": False,
        "error": "the request failed: see the daemon's log",
    }


def test_the_peer_of_a_unix_socket_is_known() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert socketPeerUid(a) == os.getuid()


def test_parse_request() -> None:
    assert parseRequest(b'{"version": 1, "command": "stop", "force": true}') == Request(
        "stop", True
    )
    assert parseRequest(b'{"version": 1, "command": "start"}') == Request("start", False)
    assert parseRequest(b'{"version": 1, "command": "renew", "package": "/p"}') == Request(
        "renew", package="/p"
    )


# -- the client, against scripted daemons


def serve_once(path: str, respond) -> int:
    """A daemon that takes one connection in a child process; returns its pid."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            connection, _ = server.accept()
            respond(connection)
            connection.close()
        finally:
            os._exit(0)
    server.close()
    return pid


def asked(short_tmp, respond, command: str = "status", **kwargs: Any) -> dict[str, Any]:
    path = str(short_tmp / "control.sock")
    pid = serve_once(path, respond)
    try:
        return ask(path, command, timeout=10, **kwargs)
    finally:
        os.waitpid(pid, 0)


def answer_when_told(server: socket.socket) -> tuple[int, int]:
    """
    A daemon in a child process that accepts one connection on C{server} and answers its
    status only once a byte is written to the returned descriptor; returns its pid too.
    """
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.read(go_read, 1)
            connection, _ = server.accept()
            read_request(connection)
            connection.sendall(b'{"version": 1, "ok": true, "status": {"state": "busy"}}\n')
            connection.close()
        finally:
            os._exit(0)
    os.close(go_read)
    return pid, go_write


def read_request(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        data += connection.recv(4096)
    return data


def test_the_client_sends_one_line_and_reads_one_reply(short_tmp) -> None:
    def respond(connection: socket.socket) -> None:
        request = json.loads(read_request(connection))
        connection.sendall(json.dumps({"version": 1, "ok": True, "got": request}).encode() + b"\n")

    got = asked(short_tmp, respond, "stop", force=True)["got"]
    assert got == {"version": 1, "command": "stop", "force": True}


def test_an_error_reply_is_refused_with_its_line(short_tmp) -> None:
    def respond(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b'{"version": 1, "ok": false, "error": "1 connection is open"}\n')

    with pytest.raises(Refused, match=r"^1 connection is open$"):
        asked(short_tmp, respond, "stop")


def old_daemon(connection: socket.socket) -> None:
    """Before the protocol: the status document at once, nothing read, then close."""
    connection.sendall(json.dumps({"state": "stopped", "daemon_pid": 7}).encode() + b"\n")


def test_status_still_works_against_a_daemon_from_before_the_protocol(short_tmp) -> None:
    assert asked(short_tmp, old_daemon) == {
        "ok": True,
        "status": {"state": "stopped", "daemon_pid": 7},
    }


def test_start_against_a_daemon_from_before_the_protocol_says_restart_it(short_tmp) -> None:
    with pytest.raises(Refused) as caught:
        asked(short_tmp, old_daemon, "start")
    assert str(caught.value).startswith("the daemon running now predates `virby start`")


def test_a_daemon_that_never_answers_times_out_in_one_line(short_tmp) -> None:
    path = str(short_tmp / "control.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    with server, pytest.raises(VirbyError) as caught:
        ask(path, "status", timeout=0.2)
    assert str(caught.value) == f"the daemon did not answer on {path} within 0s"


def fill_accept_queue(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket that accepts nothing, its queue full of connections."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(0)
    queued: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return server, queued
        queued.append(s)


@pytest.mark.linux
def test_a_full_accept_queue_is_waited_out(short_tmp, monkeypatch) -> None:
    """Linux refuses a connect to a full unix socket queue with EAGAIN: the client waits."""
    from virby.cli import client

    path = str(short_tmp / "control.sock")
    server, queued = fill_accept_queue(path)
    pid, go_write = answer_when_told(server)
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:  # the queue empties: the daemon took what was waiting
            for s in queued:
                server.accept()[0].close()
                s.close()
            os.write(go_write, b"x")

    monkeypatch.setattr(client, "sleep", pause)
    try:
        with server:
            assert ask(path, "status", timeout=10)["status"] == {"state": "busy"}
    finally:
        os.waitpid(pid, 0)
    assert pauses == [client.FIRST_RETRY, client.FIRST_RETRY * 2]


@pytest.mark.linux
def test_a_queue_full_until_the_timeout_is_one_line(short_tmp, monkeypatch) -> None:
    from virby.cli import client

    path = str(short_tmp / "control.sock")
    server, queued = fill_accept_queue(path)
    now = [100.0]
    monkeypatch.setattr(client, "monotonic", lambda: now[0])
    monkeypatch.setattr(client, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    with server, pytest.raises(VirbyError) as caught:
        ask(path, "status", timeout=2)
    for s in queued:
        s.close()
    assert str(caught.value) == (
        f"the daemon at {path} is too busy to take a connection within 2s: try again, or "
        "read its log"
    )
    assert now[0] == 102.0


def test_a_refused_connect_is_tried_again_briefly_then_is_a_daemon_down(
    short_tmp, monkeypatch
) -> None:
    """macOS refuses a connect to a full queue; a dead daemon's socket refuses too."""
    from virby.cli import client

    path = str(short_tmp / "control.sock")
    now = [100.0]
    monkeypatch.setattr(client, "monotonic", lambda: now[0])
    monkeypatch.setattr(client, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)  # bound, never listening: what a dead daemon leaves
        with pytest.raises(DaemonDown, match="stale control socket"):
            ask(path, "status", timeout=5)
    assert now[0] == 100.0 + client.REFUSED_GRACE


def test_a_socket_that_stops_refusing_is_answered(short_tmp, monkeypatch) -> None:
    from virby.cli import client

    path = str(short_tmp / "control.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    pauses: list[float] = []
    pid, go_write = answer_when_told(server)

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        server.listen(1)  # the queue has room again
        os.write(go_write, b"x")

    monkeypatch.setattr(client, "sleep", pause)
    try:
        with server:
            assert ask(path, "status", timeout=10)["status"] == {"state": "busy"}
    finally:
        os.waitpid(pid, 0)
    assert pauses == [client.FIRST_RETRY]


# -- the commands


def test_start_and_stop_say_what_happened(short_tmp, monkeypatch) -> None:
    config = fromMapping({"working-directory": str(short_tmp)})
    replies = {
        "start": {"ok": True, "booted": True, "vm_ip": "192.168.64.7", "vm_port": 22,
                  "boot_seconds": 8.44},
        "stop": {"ok": True, "stopped": True, "closed_connections": 2},
    }  # fmt: skip
    monkeypatch.setattr("virby.cli.startstop.ask", lambda path, command, **kw: replies[command])
    out = io.StringIO()
    assert runStart(config, out) == 0 and runStop(config, True, out) == 0
    assert out.getvalue() == (
        "VM running at 192.168.64.7:22: booted in 8.4s\nVM stopped; closed 2 connections\n"
    )
    replies["start"] = {"ok": True, "booted": False, "vm_ip": "192.168.64.7", "vm_port": 22}
    replies["stop"] = {"ok": True, "stopped": False, "closed_connections": 0}
    out = io.StringIO()
    runStart(config, out)
    runStop(config, False, out)
    assert out.getvalue() == "VM already running at 192.168.64.7:22\nVM was not running\n"


class Booting:
    """
    A daemon whose boot passes through C{phases}, one per status asked, and whose start
    replies once they are all shown: its start calls the command back while it waits, as
    the real wait does between two looks at the reply's socket.
    """

    def __init__(self, phases: list[dict[str, Any] | Exception]) -> None:
        self.phases = phases
        self.asked: list[str] = []

    def ask(self, path: str, command: str, *, timeout: float, **kw: Any) -> dict[str, Any]:
        self.asked.append(command)
        if command == "start":
            while self.phases:
                kw["whileWaiting"]()
            return {"ok": True, "booted": True, "vm_ip": "192.168.64.7", "vm_port": 22,
                    "boot_seconds": 12.5}  # fmt: skip
        phase = self.phases.pop(0)
        if isinstance(phase, Exception):
            raise phase
        return {"ok": True, "status": phase}


def booting(phase: str, waitingFor: str, last: str, elapsed: float) -> dict[str, Any]:
    return {"state": "booting", "boot_phase": phase, "boot_waiting_for": waitingFor,
            "boot_last_step": last, "boot_elapsed": elapsed, "start_timeout": 180}  # fmt: skip


def test_start_prints_each_phase_of_the_boot_once_as_it_passes(short_tmp, monkeypatch) -> None:
    lease = booting("lease", "waiting for the guest's DHCP lease", "vfkit started (pid 7)", 0.5)
    daemon = Booting(
        [
            booting("preparing", "checking for a VM left behind", "booting the VM", 0.1),
            lease,
            {**lease, "boot_elapsed": 1.5},  # the same phase, later: not printed again
            VirbyError("the daemon did not answer"),  # lost narration, not a failed start
            {"state": "stopping"},
            booting("sshd", "waiting for the guest's sshd to answer", "the guest leased "
                    "192.168.64.7", 9.0),
        ]
    )  # fmt: skip
    monkeypatch.setattr("virby.cli.startstop.ask", daemon.ask)
    monkeypatch.setattr("virby.cli.startstop.PROGRESS_POLL", 0.001)
    out = io.StringIO()
    assert runStart(fromMapping({"working-directory": str(short_tmp)}), out) == 0
    assert out.getvalue() == (
        "Boot: checking for a VM left behind, 0s of 3m 00s (last: booting the VM)\n"
        "Boot: waiting for the guest's DHCP lease, 0s of 3m 00s (last: vfkit started (pid 7))\n"
        "Boot: waiting for the guest's sshd to answer, 9s of 3m 00s "
        "(last: the guest leased 192.168.64.7)\n"
        "VM running at 192.168.64.7:22: booted in 12.5s\n"
    )
    assert daemon.asked[0] == "start" and daemon.asked.count("start") == 1


def test_a_start_that_fails_while_its_boot_is_narrated_fails_with_its_line(
    short_tmp, monkeypatch
) -> None:
    def ask(path: str, command: str, **kw: Any) -> dict[str, Any]:
        if command == "status":
            return {"ok": True, "status": booting("lease", "waiting", "vfkit started", 1)}
        kw["whileWaiting"]()  # the boot is narrated while the start waits
        raise Refused("the VM did not boot: no DHCP lease")

    monkeypatch.setattr("virby.cli.startstop.ask", ask)
    monkeypatch.setattr("virby.cli.startstop.PROGRESS_POLL", 0.001)
    out = io.StringIO()
    with pytest.raises(Refused, match="no DHCP lease"):
        runStart(fromMapping({"working-directory": str(short_tmp)}), out)
    assert out.getvalue() == "Boot: waiting, 1s of 3m 00s (last: vfkit started)\n"


def refused(port: int) -> None:
    """The builder's port with nothing listening: no launchd job holds it."""
    raise ConnectionRefusedError(111, "Connection refused")


def test_start_when_nothing_listens_to_start_the_daemon_is_one_line_and_3(short_tmp) -> None:
    config = fromMapping({"working-directory": str(short_tmp), "port": 4000})
    out = io.StringIO()
    slept: list[float] = []
    assert runStart(config, out, knock=refused, sleep=slept.append) == EXIT_DOWN
    assert out.getvalue() == (
        f"Virby: the daemon is not running (no control socket at {short_tmp}/control.sock), "
        "and nothing listens on 127.0.0.1:4000 to start it: load its launchd job: "
        f"sudo launchctl bootstrap system {LAUNCHD_PLIST} (or darwin-rebuild switch)\n"
    )
    assert slept == [], "nothing to wait for"


def test_start_when_the_connection_that_starts_the_daemon_fails_is_one_line_and_3(
    short_tmp,
) -> None:
    def unreachable(port: int) -> None:
        raise TimeoutError("timed out")

    config = fromMapping({"working-directory": str(short_tmp)})
    out = io.StringIO()
    assert runStart(config, out, knock=unreachable, sleep=lambda s: None) == EXIT_DOWN
    assert out.getvalue().endswith(
        ", and the connection to 127.0.0.1:31222 that starts it failed (timed out): "
        "run `sudo virby doctor`\n"
    )
    assert out.getvalue().count("\n") == 1


class Launchd:
    """
    The Mac of an on-demand daemon that is not started: the builder's port is held, and the
    daemon answers on its control socket a few tries after the first connection.
    """

    def __init__(self, answersAfter: int | None, reply: dict[str, Any] | None = None) -> None:
        self.answersAfter = answersAfter
        self.reply = reply or {"ok": True, "booted": True, "vm_ip": "192.168.64.7",
                               "vm_port": 22, "boot_seconds": 8.44}  # fmt: skip
        self.knocks: list[int] = []
        self.asked: list[tuple[str, float]] = []
        self.now = 1000.0

    def knock(self, port: int) -> None:
        self.knocks.append(port)

    def ask(self, path: str, command: str, *, timeout: float, **kw: Any) -> dict[str, Any]:
        self.asked.append((command, self.now))
        tries = len(self.asked) - 1  # the first ask comes before any connection
        if not self.knocks or self.answersAfter is None or tries < self.answersAfter:
            raise DaemonDown(f"the daemon is not running (no control socket at {path})")
        return self.reply

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert 0 < seconds <= WAKE_POLL
        self.now += seconds

    def start(self, config, out) -> int:
        return runStart(config, out, knock=self.knock, clock=self.clock, sleep=self.sleep)


def test_start_has_launchd_start_an_on_demand_daemon_then_boots(short_tmp, monkeypatch) -> None:
    mac = Launchd(answersAfter=5)
    monkeypatch.setattr("virby.cli.startstop.ask", mac.ask)
    config = fromMapping({"working-directory": str(short_tmp), "on-demand": True})
    out = io.StringIO()
    assert mac.start(config, out) == 0
    assert out.getvalue() == "VM running at 192.168.64.7:22: booted in 8.4s\n"
    assert mac.knocks == [31222], "one connection, to the port launchd holds"
    assert [command for command, _ in mac.asked] == ["start"] * 6
    assert mac.now == pytest.approx(1000 + 4 * WAKE_POLL), "tried again at once, then polled"


def test_start_knocks_where_the_daemon_really_accepts(short_tmp, monkeypatch) -> None:
    mac = Launchd(answersAfter=1)
    monkeypatch.setattr("virby.cli.startstop.ask", mac.ask)
    config = fromMapping({"working-directory": str(short_tmp), "port": 31222, "listen": "tcp:4000"})
    assert mac.start(config, io.StringIO()) == 0
    assert mac.knocks == [4000]


def test_start_waits_for_a_started_daemon_on_a_deadline(short_tmp, monkeypatch) -> None:
    mac = Launchd(answersAfter=None)
    monkeypatch.setattr("virby.cli.startstop.ask", mac.ask)
    config = fromMapping({"working-directory": str(short_tmp), "on-demand": True})
    out = io.StringIO()
    assert mac.start(config, out) == EXIT_DOWN
    assert mac.knocks == [31222], "one connection, not one per try"
    assert mac.now == pytest.approx(1000 + WAKE_TIMEOUT)
    assert mac.asked[-1][1] == pytest.approx(1000 + WAKE_TIMEOUT), "a last try at the deadline"
    assert out.getvalue() == (
        f"Virby: the daemon did not answer on {short_tmp}/control.sock within 60s of the "
        "connection to 127.0.0.1:31222 that has launchd start it: read /var/log/virbyd.log, "
        "and run `sudo virby doctor`\n"
    )


def test_a_daemon_that_answers_is_never_knocked_on(short_tmp, monkeypatch) -> None:
    def fail(port: int) -> None:
        raise AssertionError("a connection to the builder's port")

    reply = {"ok": True, "booted": False, "vm_ip": "192.168.64.7", "vm_port": 22}
    monkeypatch.setattr("virby.cli.startstop.ask", lambda path, command, **kw: reply)
    config = fromMapping({"working-directory": str(short_tmp), "on-demand": True})
    assert runStart(config, io.StringIO(), knock=fail) == 0


def test_a_refusal_once_started_is_the_daemons_line(short_tmp, monkeypatch) -> None:
    mac = Launchd(answersAfter=2)

    def ask(path: str, command: str, **kw: Any) -> dict[str, Any]:
        mac.ask(path, command, **kw)
        raise Refused("no image yet: run `sudo darwin-rebuild switch`")

    monkeypatch.setattr("virby.cli.startstop.ask", ask)
    config = fromMapping({"working-directory": str(short_tmp), "on-demand": True})
    with pytest.raises(Refused, match=r"^no image yet"):
        mac.start(config, io.StringIO())
    assert len(mac.asked) == 3, "no more tries once the daemon answered"


def test_knock_is_one_connection_closed_in_order(short_tmp) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        knock(port)
        server.settimeout(10)
        accepted, _ = server.accept()
        with accepted:
            accepted.settimeout(10)
            assert accepted.recv(1) == b"", "an orderly end, not a reset, and no bytes"
    with pytest.raises(ConnectionRefusedError):
        knock(port)


@pytest.mark.parametrize(
    ("onDemand", "why"),
    [
        (True, "the daemon is not started yet (on-demand)"),
        (False, "the daemon is not running (no control socket at {wd}/control.sock)"),
    ],
)
def test_stop_with_no_daemon_running_has_nothing_to_stop(short_tmp, onDemand, why) -> None:
    config = fromMapping({"working-directory": str(short_tmp), "on-demand": onDemand})
    out = io.StringIO()
    assert runStop(config, False, out) == 0
    assert out.getvalue() == f"Virby: nothing to stop: {why.format(wd=short_tmp)}\n"


@pytest.mark.parametrize("command", ["status", "start", "stop"])
def test_each_command_says_what_its_exit_statuses_mean(command, capsys) -> None:
    from virby import cli

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    epilog = capsys.readouterr().out.split("exit status:\n", 1)[1]
    codes = [line.split()[0] for line in epilog.splitlines() if not line.startswith("     ")]
    assert codes == (["0", "1", "2"] if command == "stop" else ["0", "1", "2", "3"])
    assert "3 (the daemon is not running)" in epilog or "3  the daemon is not running" in epilog


def test_start_waits_as_long_as_a_boot_may_take() -> None:
    assert startTimeout(fromMapping({"start-timeout": 100})) == 130
    assert startTimeout(fromMapping({"start-timeout": 100, "ephemeral": True})) == 230


def test_a_refused_stop_is_one_line_and_exit_1(short_tmp, capsys, monkeypatch) -> None:
    from virby import cli

    def refuse(path, command, **kw):
        raise Refused("1 connection is open (a build may be running): `virby stop --force`")

    monkeypatch.setattr("virby.cli.startstop.ask", refuse)
    assert cli.main(["stop", "--working-directory", str(short_tmp)]) == 1
    assert capsys.readouterr().err == (
        "virby stop: error: 1 connection is open (a build may be running): `virby stop --force`\n"
    )


def test_ask_calls_back_while_the_reply_has_not_come_on_one_thread(short_tmp) -> None:
    """The wait watches the reply's socket between two calls of C{whileWaiting}."""
    from virby.cli.client import ask as realAsk
    from virby.wire import encodeReply

    path = str(short_tmp / "control.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        calls: list[int] = []

        def answerOnTheThirdCall() -> None:
            calls.append(len(calls))
            if len(calls) == 3:
                connection, _ = server.accept()
                with connection:
                    connection.recv(4096)
                    connection.sendall(encodeReply({"ok": True, "booted": True}))

        reply = realAsk(path, "start", timeout=10, whileWaiting=answerOnTheThirdCall, every=0.001)
        assert reply["booted"] is True and len(calls) == 3
        with pytest.raises(VirbyError, match=r"did not answer on .* within 0s"):
            realAsk(path, "start", timeout=0.05, whileWaiting=lambda: None, every=0.001)


def test_the_macos_peer_credentials_call_is_looked_up_once(monkeypatch) -> None:
    """getpeereid(2) through ctypes: libc is opened at the first request, not at each."""

    from virby.daemon import control

    control._getpeereid.cache_clear()
    opened: list[object] = []

    class Libc:
        def __init__(self, name: object, use_errno: bool = False) -> None:
            opened.append(name)

        def getpeereid(self, fd: int, uid: ctypes._CArgObject, gid: ctypes._CArgObject) -> int:
            ctypes.cast(uid, ctypes.POINTER(ctypes.c_uint32)).contents.value = 501
            return 0

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ctypes, "CDLL", Libc)
    try:
        a, b = socket.socketpair(socket.AF_UNIX)
        with a, b:
            assert [socketPeerUid(a), socketPeerUid(a)] == [501, 501]
        assert len(opened) == 1
    finally:
        control._getpeereid.cache_clear()
