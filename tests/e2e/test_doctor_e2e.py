"""
``virby doctor`` end to end: the real command against a real daemon, its emulated VM, real
``lsof`` and ``ssh``, on a played Mac (launchd running the daemon, the module's ssh config).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from testbed.builder import Builder, tool

pytestmark = pytest.mark.e2e


def doctor(builder: Builder, *flags: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [tool("virby"), "doctor", "--config", str(builder.config), *flags],
        capture_output=True, text=True, timeout=120, env={**builder.env, **(env or {})},
    )  # fmt: skip


#: The line nix-darwin writes into /etc/nix/machines for the default config.
MACHINE_LINE = "ssh-ng://virby-vm aarch64-linux - 8 1 benchmark,big-parallel - -\n"


def played_mac(builder: Builder, daemon_pid: int, machines: str = MACHINE_LINE) -> dict[str, str]:
    """
    launchd runs the daemon as its job; ssh reads the Host block the module installs; Nix
    (this system's, asked for real) has the module's settings and machines file.
    """
    played = builder.root / "etc-nix-machines"
    played.write_text(machines)
    return {
        "VIRBY_PLAYED_LAUNCHD": f"running:{daemon_pid}",
        "VIRBY_PLAYED_SSH_CONFIG": str(builder.ssh_config),
        "VIRBY_PLAYED_NIX_MACHINES": str(played),
        "NIX_CONFIG": "builders = @/etc/nix/machines\nbuilders-use-substitutes = true",
    }


def test_a_healthy_builder_passes_every_check_and_ssh_boots_it(make_builder) -> None:
    builder = make_builder()
    daemon = builder.start()
    result = doctor(builder, "--ssh", env=played_mac(builder, daemon.pid))
    assert result.returncode == 0, result.stdout + result.stderr + daemon.text()
    lines = result.stdout.splitlines()
    assert lines[-1] == "no check failed"
    statuses = {line.split()[1]: line.split()[0] for line in lines[:-1]}
    assert set(statuses.values()) == {"ok"}, result.stdout
    assert f"held by virbyd (pid {daemon.pid})" in result.stdout, "lsof saw the daemon"
    assert "ssh virby-vm nix-daemon --version answered" in result.stdout
    assert "(nix-daemon (Nix)" in result.stdout, "the guest ran the program ssh-ng runs"
    assert lines[0] == f"ok    config       read {builder.config}"
    assert "/etc/nix/machines lists ssh-ng://virby-vm" in statuses_line(lines, "machines")
    assert f"at 127.0.0.1:{builder.port} with the pinned key" in statuses_line(lines, "ssh-config")
    daemon.wait_for_line(r"VM ready at")
    # Now that the VM runs, its lease must be one written for this boot.
    again = doctor(builder, "--json", env=played_mac(builder, daemon.pid))
    document = json.loads(again.stdout)
    assert document["ok"] is True, again.stdout
    (lease,) = [c for c in document["checks"] if c["check"] == "dhcp-lease"]
    assert "for the running VM" in lease["detail"]


def test_a_broken_working_directory_fails_with_the_fix(make_builder) -> None:
    builder = make_builder()
    daemon = builder.start()
    (builder.wd / "ssh_user_ed25519_key").chmod(0o644)
    (builder.wd / "ssh_known_hosts").unlink()
    (builder.wd / "image-path").write_text("/nix/store/0000-old/nixos.img\n")
    result = doctor(builder, env=played_mac(builder, daemon.pid))
    assert result.returncode == 1, result.stdout
    failed = {
        line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("FAIL")
    }
    assert set(failed) == {"files", "keys", "image"}, result.stdout
    assert "ssh_user_ed25519_key is 0644, not 0600" in failed["files"]
    assert "ssh_known_hosts is missing" in failed["files"]
    assert "the disks were made from /nix/store/0000-old/nixos.img" in failed["image"]
    for line in failed.values():
        assert f"fix: sudo virby prepare --config {builder.config}" in line
    assert result.stdout.splitlines()[-1].startswith("3 of 16 checks failed")
    # The fix it names works.
    builder.prepare()
    assert doctor(builder, env=played_mac(builder, daemon.pid)).returncode == 0


def test_another_program_on_the_port_and_no_launchd_job(make_builder) -> None:
    import socket

    builder = make_builder()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", builder.port))
    squatter.listen(1)
    try:
        result = doctor(builder, env={"VIRBY_PLAYED_LAUNCHD": "missing"})
    finally:
        squatter.close()
    assert result.returncode == 1
    lines = {line.split()[1]: line for line in result.stdout.splitlines()[:-1]}
    assert lines["launchd"].startswith("FAIL") and "is not loaded" in lines["launchd"]
    assert lines["port"].startswith("FAIL")
    assert f"127.0.0.1:{builder.port} is held by " in lines["port"], result.stdout
    assert "not by the daemon" in lines["port"]


def statuses_line(lines: list[str], check: str) -> str:
    (line,) = [line for line in lines if line.split()[1:2] == [check]]
    return line


def test_nix_without_the_builder_and_an_ssh_without_the_block(make_builder) -> None:
    """What makes Nix skip the builder, found with the real nix and ssh of this system."""
    builder = make_builder()
    daemon = builder.start()
    env = played_mac(builder, daemon.pid, machines="ssh://elsewhere x86_64-linux\n")
    env["VIRBY_PLAYED_SSH_CONFIG"] = str(builder.root / "no-such-block")
    (builder.root / "no-such-block").write_text("Host elsewhere\n  Port 2\n")
    result = doctor(builder, "--ssh", env=env)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    failed = {line.split()[1] for line in lines[:-1] if line.startswith("FAIL")}
    assert failed == {"machines", "ssh-config", "ssh"}, result.stdout
    assert "lists no virby-vm (it lists ssh://elsewhere)" in statuses_line(lines, "machines")
    assert "has no Host virby-vm block" in statuses_line(lines, "ssh-config")
    assert "Could not resolve hostname virby-vm" in statuses_line(lines, "ssh")
    assert "fix: first the ssh-config check's problem" in statuses_line(lines, "ssh")


def test_no_config_and_none_installed(make_builder) -> None:
    builder = make_builder()
    result = subprocess.run(
        [tool("virby"), "doctor"], capture_output=True, text=True, timeout=60, env=builder.env
    )
    assert result.returncode == 1
    first, last = result.stdout.splitlines()
    assert first.startswith("FAIL  config       no --config given, and /etc/virby/config.json")
    assert last == "1 of 1 checks failed"
