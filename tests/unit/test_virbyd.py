"""``virbyd`` hands its arguments to twistd exactly as ``twistd --nodaemon --pidfile= virby``."""

from __future__ import annotations

import sys

import twisted.scripts.twistd

from virby.virbyd import main, twistd_arguments


def test_the_twistd_command_line() -> None:
    assert twistd_arguments(["--config", "/nix/store/x-virby.json", "--debug"]) == [
        "--nodaemon", "--pidfile=", "virby", "--config", "/nix/store/x-virby.json", "--debug",
    ]  # fmt: skip


def test_main_runs_twistd_in_this_python(monkeypatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(twisted.scripts.twistd, "run", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["virbyd"])
    main(["--config", "/etc/virby.json"])
    assert seen == [["virbyd", "--nodaemon", "--pidfile=", "virby", "--config", "/etc/virby.json"]]
