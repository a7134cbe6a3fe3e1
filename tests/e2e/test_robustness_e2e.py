"""
The daemon after crashes and against a hostile setup, end to end: real twistd, the vfkit
emulator (or stand-ins for a hung or foreign vfkit), sshd, ssh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.e2e.builder import Builder, tool

pytestmark = pytest.mark.e2e


@pytest.fixture
def make_builder(tmp_path):
    made: list[Builder] = []

    def make(**settings) -> Builder:
        root = tmp_path / f"builder{len(made)}"
        root.mkdir()
        builder = Builder(root, **settings)
        made.append(builder)
        return builder

    yield make
    for builder in made:
        builder.cleanup()


def status_of(builder: Builder, timeout: float = 30) -> dict:
    result = subprocess.run(
        [tool("virby"), "status", "--json", "--config", str(builder.config)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_fifo_as_lease_file_never_freezes_the_daemon(make_builder) -> None:
    builder = make_builder(**{"start-timeout": 20})
    fifo = builder.root / "fifo_leases"
    os.mkfifo(fifo)
    builder.config.write_text(json.dumps({**builder.settings, "leases-file": str(fifo)}))
    daemon = builder.start()
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed: cannot read the lease file .*a FIFO, not a regular file")
    assert status_of(builder)["state"] in ("stopping", "stopped")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert "Traceback" not in daemon.text()
    assert builder.emulators() == []


def test_a_duid_lease_is_named_in_the_error(make_builder) -> None:
    builder = make_builder(**{"start-timeout": 3})
    builder.env["VIRBY_EMULATOR_FAULT"] = "duid-lease"
    daemon = builder.start()
    assert builder.ssh("true", timeout=60).returncode != 0
    daemon.wait_for_line(r"boot failed: no DHCP lease for MAC .*DUID client id")
    last_error = status_of(builder)["last_error"]
    assert "DUID client id" in last_error and 'clientid ""' in last_error
