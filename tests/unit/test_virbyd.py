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


def test_a_bad_flag_or_a_missing_value_is_one_line_in_every_command_line(tmp_path) -> None:
    """twistd would print its 31 lines of usage first; argparse its usage."""
    for program, argv, flag in [
        ("virbyd", VIRBYD, "--bogus"),
        ("twistd virby", [*TWISTD, *twistdArguments([])], "--bogus"),
        ("virby status", [*VIRBY, "status"], "--bogus"),
        ("virbyd", VIRBYD, "--cores"),
        ("twistd virby", [*TWISTD, *twistdArguments([])], "--cores"),
        ("virby prepare", [*VIRBY, "prepare"], "--cores"),
    ]:
        result = run([*argv, flag], tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"{program}: error: ") and flag in line
        assert line.endswith(f"(see `{program} --help`)"), line


def test_the_daemons_help_and_version_speak_as_virby(tmp_path) -> None:
    from virby import __version__

    for program, argv in [("virbyd", VIRBYD), ("twistd virby", [*TWISTD, *twistdArguments([])])]:
        helped = run([*argv, "--help"], tmp_path)
        assert helped.returncode == 0
        assert helped.stdout.startswith(f"usage: {program} [--config FILE] [--KEY VALUE ...]\n")
        assert "twistd [options]" not in helped.stdout
        assert "--cores N             vCPUs of the VM (default: 8)" in helped.stdout
        assert "\nexit status:\n  0  " in helped.stdout
        version = run([*argv, "--version"], tmp_path)
        assert version.returncode == 0
        assert version.stdout.startswith(f"{program} (Virby) {__version__}, on Twisted ")


def test_the_daemon_logs_a_port_its_listen_string_overrides() -> None:
    """Logged, not printed: twistd opens the log after the service is made, and keeps it."""
    from twisted.logger import capturedLogs

    from virby.daemon.tap import Options, loadConfig

    options = Options()
    options.parseOptions(["--listen", "tcp:4000:interface=127.0.0.1", "--port", "5000"])
    with capturedLogs() as events:
        config = loadConfig(options)
    assert config.builderPort == 4000
    (event,) = [e for e in events if e.get("warning")]
    assert event["log_level"].name == "warn"
    assert event["warning"].startswith("port 5000 is ignored: listen 'tcp:4000:")
