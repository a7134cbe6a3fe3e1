"""``virbyd`` hands its arguments to twistd exactly as ``twistd --nodaemon --pidfile= virby``."""

from __future__ import annotations

import subprocess
import sys

import twisted.scripts.twistd

from tests.programs import TWISTD, VIRBY, VIRBYD
from virby.daemon.virbyd import twistdArguments
from virby.virbyd import main


def test_the_twistd_command_line() -> None:
    assert twistdArguments(["--config", "/nix/store/x-virby.json", "--debug"]) == [
        "--nodaemon", "--pidfile=", "virby", "--config", "/nix/store/x-virby.json", "--debug",
    ]  # fmt: skip


def test_main_runs_twistd_in_this_python(monkeypatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(twisted.scripts.twistd, "run", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["virbyd"])
    main(["--config", "/etc/virby.json"])
    assert seen == [["virbyd", "--nodaemon", "--pidfile=", "virby", "--config", "/etc/virby.json"]]


def run(argv: list[str], tmp_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_an_error_names_the_program_the_daemon_was_started_as(tmp_path) -> None:
    """launchd runs virbyd: its log must say virbyd, not twistd's plugin."""
    flags = ["--config", str(tmp_path / "missing.json")]
    for program, argv in [
        ("virbyd", [*VIRBYD, *flags]),
        ("twistd virby", [*TWISTD, *twistdArguments(flags)]),
    ]:
        result = run(argv, tmp_path)
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            f"{program}: error: config: cannot read {tmp_path / 'missing.json'}: "
            "No such file or directory\n"
        )


def test_both_ways_of_a_switch_at_once_are_one_error_in_both_command_lines(tmp_path) -> None:
    virby = run([*VIRBY, "status", "--debug", "--no-debug"], tmp_path)
    daemon = run([*VIRBYD, "--debug", "--no-debug"], tmp_path)
    why = "config key 'debug': --debug and --no-debug conflict\n"
    assert (virby.returncode, virby.stderr) == (1, f"virby status: error: {why}")
    assert (daemon.returncode, daemon.stderr) == (1, f"virbyd: error: {why}")
