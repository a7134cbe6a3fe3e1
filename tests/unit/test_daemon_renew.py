"""
The daemon's renewal: what is installed compared with what it started with, the refusal
of a daemon no supervisor restarts, and its retirement: accept nothing more, then exit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed

from tests.fakes import FakeHypervisor, FakeReactor, readyGuest
from tests.unit.test_lifecycle import FakeConnection
from virby.config import fromMapping
from virby.daemon.lifecycle import Lifecycle
from virby.daemon.service import DaemonCommands, DaemonService
from virby.errors import VirbyError
from virby.installed import Installed, describeChanges, packageDirectory, readInstalled
from virby.layout import HOST_PUBLIC_KEY, IMAGE_RECORD


class PausablePort:
    """A listening port as Twisted's TCP port is: it can stop and resume accepting."""

    numberAccepts = 100

    def __init__(self) -> None:
        self.reading = True
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 31222)

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def stopListening(self) -> None:
        self.listening = False


class Endpoint:
    def __init__(self) -> None:
        self.port = PausablePort()

    def listen(self, factory: object) -> Deferred[Any]:
        return succeed(self.port)


class Daemon:
    """A daemon on a fake reactor whose installed files the test changes."""

    def __init__(self, wd: Path, listen: str = "systemd:domain=INET:index=0") -> None:
        self.wd = wd
        self.configFile = wd / "config.json"
        self.configFile.write_text("{}")
        (wd / IMAGE_RECORD).write_text("/nix/store/aaa-image/nixos.img\n")
        (wd / HOST_PUBLIC_KEY).write_text("ssh-ed25519 AAAA old\n")
        self.reactor = FakeReactor()
        self.endpoint = Endpoint()
        config = fromMapping({"working-directory": str(wd), "listen": listen})
        hypervisor = FakeHypervisor(readyGuest, slowSpawn=True)
        self.lifecycle: Lifecycle[Any] = Lifecycle(self.reactor, hypervisor, onDemand=True, ttl=60)
        self.exits = 0
        self.service = DaemonService(
            self.reactor,
            config,
            self.endpoint,  # type: ignore[arg-type]
            hypervisor,
            self.lifecycle,
            installed=lambda: readInstalled(str(self.configFile), str(wd)),
            exit=self._exit,
            package="/nix/store/aaa-virby/lib/python3.12/site-packages/virby",
        )
        self.service.startService()

    def _exit(self) -> None:
        self.exits += 1

    def renew(self, package: str | None = None) -> list[Any]:
        got: list[Any] = []
        DaemonCommands(self.service).renew(package).addBoth(got.append)
        return got


@pytest.fixture
def daemon(short_tmp: Path) -> Daemon:
    return Daemon(short_tmp)


def test_nothing_installed_since_the_start_is_nothing_to_renew(daemon: Daemon) -> None:
    assert daemon.renew() == [{"renewing": False, "changed": []}]
    assert not daemon.lifecycle.snapshot().renewing
    assert daemon.exits == 0 and daemon.endpoint.port.reading


def test_a_new_image_and_keys_retire_an_idle_daemon_at_once(daemon: Daemon) -> None:
    (daemon.wd / IMAGE_RECORD).write_text("/nix/store/bbb-image/nixos.img\n")
    (daemon.wd / HOST_PUBLIC_KEY).write_text("ssh-ed25519 AAAA new\n")
    assert daemon.renew() == [
        {"renewing": True, "changed": ["image", "SSH keys"], "now": True, "open_connections": 0}
    ]
    assert daemon.exits == 1
    assert not daemon.endpoint.port.reading, "it accepts nothing more before it exits"


def test_a_daemon_with_a_build_running_retires_when_it_ends(daemon: Daemon) -> None:
    build = FakeConnection()
    daemon.lifecycle.connectionOpened(build)
    daemon.configFile.write_text('{"memory": 8192}')
    assert daemon.renew() == [
        {"renewing": True, "changed": ["config"], "now": False, "open_connections": 1}
    ]
    assert daemon.exits == 0 and daemon.endpoint.port.reading
    assert daemon.service.describe()["renewing"] is True
    assert daemon.service.describe()["renewing_for"] == ["config"]
    daemon.lifecycle.connectionClosed(build)
    assert daemon.exits == 1 and not daemon.endpoint.port.reading
    assert build.aborted is None


def test_a_daemon_that_listens_itself_refuses_with_the_fix(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp, listen="tcp:31222:interface=127.0.0.1")
    (daemon.wd / IMAGE_RECORD).write_text("/nix/store/bbb-image/nixos.img\n")
    got = daemon.renew()
    assert isinstance(got[0].value, VirbyError)
    message = str(got[0].value)
    assert "nothing would start it again" in message and "restart it by hand" in message
    assert "\n" not in message
    assert daemon.exits == 0 and not daemon.lifecycle.snapshot().renewing


def test_a_command_of_another_package_asking_is_a_new_package(daemon: Daemon) -> None:
    """The switch's prepare runs from the package it installed: the daemon's may be older."""
    same = "/nix/store/aaa-virby/lib/python3.12/site-packages/virby"
    assert daemon.renew(same) == [{"renewing": False, "changed": []}]
    other = "/nix/store/bbb-virby/lib/python3.12/site-packages/virby"
    assert daemon.renew(other) == [
        {"renewing": True, "changed": ["Virby package"], "now": True, "open_connections": 0}
    ]


def test_the_package_directory_is_where_this_code_is() -> None:
    import virby

    assert packageDirectory() == os.path.realpath(os.path.dirname(virby.__file__))


def test_a_part_that_cannot_be_read_is_unknown_and_compared_as_such(tmp_path: Path) -> None:
    reading = readInstalled(str(tmp_path / "missing.json"), str(tmp_path / "nowhere"))
    assert reading == Installed(config=None, image=None, keys=None)
    os.makedirs(tmp_path / "wd")
    (tmp_path / "wd" / IMAGE_RECORD).write_text("/nix/store/x/nixos.img\n")
    later = readInstalled(None, str(tmp_path / "wd"))
    assert later.changesSince(reading) == ["image"]


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ([], "nothing new"),
        (["image"], "new image"),
        (["image", "SSH keys"], "new image and SSH keys"),
        (["config", "image", "Virby package"], "new config, image and Virby package"),
    ],
)
def test_changes_read_as_a_phrase(changes: list[str], said: str) -> None:
    assert describeChanges(changes) == said
