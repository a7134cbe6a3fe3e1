"""``virby``'s command line: each command's help, and its mistakes in one line."""

from __future__ import annotations

import json

import pytest

from virby import cli


def helpOf(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    return str(capsys.readouterr().out)


@pytest.mark.parametrize("command", list(cli.EXIT_STATUSES))
def test_each_commands_help_shows_its_own_options_then_the_config_then_exits(
    command, capsys
) -> None:
    text = helpOf(command, capsys)
    assert text.startswith(f"usage: virby {command}")
    own, rest = text.split("\noptions:\n", 1)[1].split(
        "\nconfig (each flag wins over its key in the file):\n", 1
    )
    assert "--cores" not in own and "--config" not in own
    assert "--config FILE         the JSON config file (default: /etc/virby/config.json" in rest
    assert "vCPUs of the VM (default: 8)" in rest
    assert "(default: /var/lib/virby)" in rest
    assert "--on-demand, --no-on-demand" in rest
    statuses = rest.split("\nexit status:\n", 1)[1]
    codes = [line.split()[0] for line in statuses.splitlines() if not line.startswith("     ")]
    assert codes[:3] == ["0", "1", "2"]
    assert ("3" in codes) == (command in ("status", "start"))


def test_the_commands_own_options_come_first(capsys) -> None:
    own = helpOf("stop", capsys).split("\nconfig (", 1)[0]
    assert "--force" in own


def test_json_after_a_bad_flag_is_still_one_document(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["status", "--json", "--bogus"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    line = "virby status: error: unrecognized arguments: --bogus (see `virby status --help`)"
    assert err == line + "\n"
    assert json.loads(out) == {"ok": False, "error": line, "state": "unknown", "reason": line}


def test_virbys_own_help_names_every_command_and_where_to_read_more(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in cli.EXIT_STATUSES:
        assert f"    {command} " in text or f"    {command}\n" in text, command
    assert "/etc/virby/config.json" in text and "exit statuses" in text
