"""
A switch that brings a new image, end to end: the real daemon under the tests' launchd
(L{testbed.supervisor}), the vfkit emulator and its real sshd guest, ssh through the
daemon's port, and C{virby prepare} asking the daemon to renew (docs/one-switch.md, "Moving
to the new image without cutting a build"; docs/lifecycle.md, "Moving to what is
installed").

What must hold: a session open before the switch is not cut, a session made after it gets
in with the new keys on disk while the old VM still serves, the daemon exits 0 once no
connection is open and launchd starts it again, and the next boot is the new image with the
new host key alone pinned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed.builder import Builder
from testbed.processes import ProcessUnderTest
from testbed.supervisor import Exit, Supervisor
from virby import keys, layout
from virby.cli.client import ask
from virby.cli.renew import RENEW_TIMEOUT
from virby.installed import packageDirectory

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not shutil.which("ssh-keyscan"), reason="needs OpenSSH's ssh-keyscan"),
]


#: The second image's first bytes (the first is all zeros): the emulator boots any file, so
#: what tells the two apart is what prepare copied to base.img.
SECOND = b"second image\n"
MIB = 1024 * 1024

#: A session that lasts until the test says so: it reads one line, then ends with a status of
#: its own, which the test expects back unchanged.
HELD = "echo held; read line; echo got $line; exit 7"


def writeImage(path: Path, marker: bytes) -> None:
    with open(path, "wb") as f:
        f.write(marker)
        f.truncate(64 * MIB)


def switchImage(builder: Builder, image: Path) -> str:
    """
    What a switch to a new image does: the config names the new image, then the activation
    runs C{virby prepare}, which ends by asking the daemon to renew.  Its report.
    """
    builder.settings["image"] = str(image)
    builder.config.write_text(json.dumps(builder.settings))
    report = builder.prepare()
    builder.writeSshConfig()
    return report


def guestHostKey(builder: Builder) -> str:
    """The host key the guest serving the daemon's port shows, asked through the port."""
    result = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(builder.port), "127.0.0.1"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if "ssh-ed25519" in line]
    assert lines, f"no host key through the daemon's port: {result.stderr}"
    return keys.barePublic(lines[0])


def hostPublic(builder: Builder) -> str:
    return keys.barePublic((builder.wd / layout.HOST_PUBLIC_KEY).read_text())


def pinned(builder: Builder) -> list[str]:
    """The host keys C{ssh_known_hosts} pins, one per line."""
    lines = (builder.wd / layout.KNOWN_HOSTS).read_text().splitlines()
    return [keys.barePublic(line) for line in lines if line.strip()]


def holdSession(builder: Builder) -> ProcessUnderTest:
    """An ssh session through the daemon that lasts until L{endSession}."""
    session = ProcessUnderTest(
        ["ssh", "-F", str(builder.ssh_config), "virby-vm", HELD], stdin=subprocess.PIPE
    )
    session.wait_for_line(r"held", timeout=90)
    return session


def endSession(session: ProcessUnderTest) -> int:
    stdin = session.process.stdin
    assert stdin is not None
    stdin.write(b"done\n")
    stdin.close()
    return session.wait_exit(60)


def bootCount(supervisor: Supervisor) -> int:
    return supervisor.text().count("booting the VM")


def renew(builder: Builder) -> dict[str, Any]:
    """Ask the daemon to renew, as prepare's last step does; its reply."""
    path = str(builder.wd / layout.CONTROL_SOCKET)
    return ask(path, "renew", package=packageDirectory(), timeout=RENEW_TIMEOUT)


def switchConfig(builder: Builder) -> dict[str, Any]:
    """
    A switch that brings only a new config: the file changes, and the daemon is asked, with
    a connection open; its reply.
    """
    builder.settings["ttl"] = builder.settings["ttl"] + 1
    builder.config.write_text(json.dumps(builder.settings))
    reply = renew(builder)
    assert reply["renewing"] is True and reply["open_connections"] >= 1, reply
    return reply


@pytest.mark.parametrize("onDemand", [False, True], ids=["always-on", "on-demand"])
def test_a_new_config_cuts_no_session_and_the_daemon_is_started_on_it(
    make_builder, onDemand: bool
) -> None:
    """
    The renewal alone, with the keys unchanged: what a switch that brings only a new config
    does.  The same order as a new image: a session held across it, another made during it,
    the exit once both ended, and the next daemon serving.
    """
    builder = make_builder(**{"on-demand": onDemand})
    supervisor = builder.supervised()
    first = holdSession(builder)
    try:
        (daemon,) = supervisor.starts()
        (oldVM,) = builder.emulators()
        reply = switchConfig(builder)
        assert reply["changed"] == ["config"], reply
        assert reply["now"] is False and reply["open_connections"] == 1, reply
        assert builder.status()["renewing"] is True

        result = builder.ssh("echo", "second")
        assert result.stdout == "second\n", result.stderr + supervisor.text()
        assert builder.emulators() == [oldVM] and supervisor.exits() == []

        assert endSession(first) == 7, first.text()
        assert first.text().splitlines()[-1] == "got done", first.text()
    finally:
        first.kill_all()

    assert supervisor.waitExits(1, timeout=90) == [Exit(daemon.pid, 0)], supervisor.text()
    assert oldVM not in builder.emulators(), "the VM is stopped before the exit"
    supervisor.process.wait_for_line(r"retiring: the daemon stops")
    if not onDemand:
        supervisor.waitStarts(2, timeout=60)
    result = builder.ssh("echo", "third")
    assert result.stdout == "third\n", result.stderr + supervisor.text()
    (_, renewed) = supervisor.starts()
    assert renewed.pid != daemon.pid and bootCount(supervisor) == 2, supervisor.text()
    assert builder.status()["renewing"] is False
    assert renew(builder)["renewing"] is False, "the new daemon runs what is installed"
    assert supervisor.stop() == 0
    assert builder.emulators() == [] and builder.guests() == []


@pytest.mark.parametrize("onDemand", [False, True], ids=["always-on", "on-demand"])
def test_a_new_image_cuts_no_session_and_the_next_daemon_boots_it(
    make_builder, onDemand: bool
) -> None:
    builder = make_builder(**{"on-demand": onDemand})
    oldKey = hostPublic(builder)
    supervisor = builder.supervised()
    first = holdSession(builder)
    try:
        (daemon,) = supervisor.starts()
        (oldVM,) = builder.emulators()
        assert guestHostKey(builder) == oldKey

        # (b) The switch: a second image, new keys on disk, and the daemon asked to renew.
        second = builder.root / "nixos-2.img"
        writeImage(second, SECOND)
        report = switchImage(builder, second)
        newKey = hostPublic(builder)
        assert newKey != oldKey, "prepare made no new host key for the new image"
        assert "moves to its" in report and "open connection" in report, report

        # (c) While the first session runs, a new one gets in with the keys now on disk,
        # served by the VM that runs: its host key is still pinned.
        assert pinned(builder) == [newKey, oldKey], "the new host key first, then the old"
        assert (builder.wd / layout.PREVIOUS_CLIENT_KEY).exists(), "the previous client key is gone"
        result = builder.ssh("echo", "second")
        assert result.returncode == 0 and result.stdout == "second\n", (
            result.stderr + supervisor.text()
        )
        assert guestHostKey(builder) == oldKey, "the old VM serves until it is idle"
        assert builder.emulators() == [oldVM] and supervisor.exits() == []

        # (d) The first session ends as it would have without the switch.
        assert endSession(first) == 7, first.text()
        assert first.text().splitlines()[-1] == "got done", first.text()
    finally:
        first.kill_all()

    # (e) No connection is open: the daemon stops its VM and exits 0; launchd starts it
    # again (always-on at once, on demand at the next connection).
    assert supervisor.waitExits(1, timeout=90) == [Exit(daemon.pid, 0)], supervisor.text()
    assert oldVM not in builder.emulators(), "the old VM is stopped before the exit"
    if not onDemand:
        supervisor.waitStarts(2, timeout=60)

    # (f) The next session boots the new image, shows the new host key, and from that boot
    # on only the new key is pinned.
    result = builder.ssh("echo", "third")
    assert result.returncode == 0 and result.stdout == "third\n", result.stderr + supervisor.text()
    (_, renewed) = supervisor.starts()
    assert renewed.pid != daemon.pid and bootCount(supervisor) == 2, supervisor.text()
    assert guestHostKey(builder) == newKey
    assert pinned(builder) == [newKey], "the previous host key is still pinned"
    assert not (builder.wd / layout.PREVIOUS_CLIENT_KEY).exists(), "the previous client key is kept"
    assert (builder.wd / layout.IMAGE_RECORD).read_text().strip() == str(second)
    with open(builder.wd / layout.BASE_IMAGE, "rb") as f:
        assert f.read(len(SECOND)) == SECOND, "base.img is not the second image"
    assert len(builder.emulators()) == 1 and oldVM not in builder.emulators()

    assert supervisor.stop() == 0
    assert builder.emulators() == [] and builder.guests() == []


def nixSystem(builder: Builder) -> str:
    return subprocess.run(
        ["nix-instantiate", "--eval", "--expr", "builtins.currentSystem", "--json"],
        capture_output=True, text=True, check=True, timeout=60, env=builder.env,
    ).stdout.strip().strip('"')  # fmt: skip


def switchToSecondImage(builder: Builder) -> None:
    second = builder.root / "nixos-2.img"
    writeImage(second, SECOND)
    report = switchImage(builder, second)
    assert "moves to its" in report and "open connection" in report, report


@pytest.mark.skipif(not shutil.which("nix-build"), reason="nix-build is not installed (nix-bin)")
@pytest.mark.parametrize(
    "switch",
    [switchConfig, switchToSecondImage],
    ids=["config", "image"],
)
def test_a_remote_nix_build_running_across_the_switch_completes(
    make_builder, switch: Callable[[Builder], object]
) -> None:
    builder = make_builder(**{"on-demand": False})
    supervisor = builder.supervised()
    (daemon,) = supervisor.waitStarts(1)
    go = builder.root / "go"
    # A name of its own each run: the guest's store outlives the test, and a path it holds
    # already would be copied back without a build.
    name = f"virby-across-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    expression = builder.root / "across.nix"
    expression.write_text(
        f'derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";'
        f' args = [ "-c" "echo build started; while [ ! -e {go} ]; do /bin/sleep 0.1; done;'
        ' echo built across the switch > $out" ]; }'
    )
    clientStore = builder.root / "client-store"
    build = ProcessUnderTest(
        ["nix-build", str(expression), "--no-out-link", "--store", str(clientStore),
         "--max-jobs", "0", "--builders", f"ssh-ng://virby-vm {nixSystem(builder)}",
         "--option", "substituters", "", "--option", "builders-use-substitutes", "false"],
        env={**builder.env, "NIX_SSHOPTS": f"-F {builder.ssh_config}"},
    )  # fmt: skip
    try:
        build.wait_for_line(r"build started", timeout=300)
        (oldVM,) = builder.emulators()
        switch(builder)
        assert supervisor.exits() == [], "the daemon left while the build ran"
        go.touch()
        assert build.wait_exit(300) == 0, build.text() + supervisor.text()
    finally:
        build.kill_all()
    out = re.findall(rf"^(/nix/store/\S+-{name})$", build.text(), re.MULTILINE)
    assert out, build.text()
    copied = clientStore / out[-1].lstrip("/")
    assert copied.read_text() == "built across the switch\n"
    assert bootCount(supervisor) == 1, "the build ran on the VM it started on"

    # Its connections closed, the daemon moves: exits 0 and is started on the new image.
    assert supervisor.waitExits(1, timeout=90) == [Exit(daemon.pid, 0)], supervisor.text()
    assert oldVM not in builder.emulators()
    supervisor.waitStarts(2, timeout=60)
    result = builder.ssh("echo", "after")
    assert result.stdout == "after\n", result.stderr + supervisor.text()
    assert guestHostKey(builder) == hostPublic(builder)
    assert supervisor.stop() == 0
