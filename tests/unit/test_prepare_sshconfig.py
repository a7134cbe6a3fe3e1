"""The Host virby-vm block that `virby ssh-config` shows and the module installs."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from virby import layout
from virby.config import Config
from virby.sshconfig import sshConfigBlock


def test_the_block_is_exactly_what_the_module_installs() -> None:
    config = Config(working_directory="/var/lib/virby", port=31222)
    assert sshConfigBlock(config) == (
        "Host virby-vm\n"
        "  HostName 127.0.0.1\n"
        "  Port 31222\n"
        "  User builder\n"
        "  HostKeyAlias virby-vm-key\n"
        "  IdentityFile /var/lib/virby/ssh_user_ed25519_key\n"
        "  IdentityFile /var/lib/virby/ssh_user_ed25519_key.previous\n"
        "  UserKnownHostsFile /var/lib/virby/ssh_known_hosts\n"
        "  StrictHostKeyChecking yes\n"
        "  IdentitiesOnly yes\n"
    )


def test_the_identity_file_can_be_chosen() -> None:
    config = Config(working_directory="/w")
    block = sshConfigBlock(config, identityFile="/w/ssh_user_ed25519_key.shared")
    assert "  IdentityFile /w/ssh_user_ed25519_key.shared\n" in block


def test_paths_with_spaces_are_quoted() -> None:
    block = sshConfigBlock(Config(working_directory="/Volumes/My Disk/virby"))
    assert '  IdentityFile "/Volumes/My Disk/virby/ssh_user_ed25519_key"\n' in block
    assert '  IdentityFile "/Volumes/My Disk/virby/ssh_user_ed25519_key.previous"\n' in block
    assert '  UserKnownHostsFile "/Volumes/My Disk/virby/ssh_known_hosts"\n' in block


def test_no_connect_timeout_cuts_a_cold_boot_short() -> None:
    assert "ConnectTimeout" not in sshConfigBlock(Config())


def test_the_port_is_the_one_the_daemon_listens_on() -> None:
    config = Config(port=31222, listen="tcp:40000:interface=127.0.0.1")
    assert "  Port 40000\n" in sshConfigBlock(config)
    assert "  Port 31222\n" in sshConfigBlock(Config(port=31222))


def test_print_ssh_config_follows_a_listen_flag(short_tmp) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "virby.cli", "prepare", "--print-ssh-config",
         "--working-directory", str(short_tmp), "--port", "31222",
         "--listen", "tcp:40000:interface=127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "  Port 40000\n" in result.stdout


def test_the_readable_key_is_named_when_users_may_ssh() -> None:
    config = Config(working_directory="/w", allow_user_ssh=True)
    assert "  IdentityFile /w/ssh_user_ed25519_key.shared\n" in sshConfigBlock(config)


@pytest.mark.parametrize("allow", [False, True])
def test_the_previous_key_prepare_keeps_is_named_after_the_current_one(allow: bool) -> None:
    """ssh offers them in order: a VM on the current keys never sees the previous one."""
    config = Config(working_directory="/w", allow_user_ssh=allow)
    current, previous = (
        (layout.SHARED_CLIENT_KEY, layout.PREVIOUS_SHARED_CLIENT_KEY)
        if allow
        else (layout.CLIENT_KEY, layout.PREVIOUS_CLIENT_KEY)
    )
    named = [
        line.split(None, 1)[1]
        for line in sshConfigBlock(config).splitlines()
        if line.startswith("  IdentityFile ")
    ]
    assert named == [config.path(current), config.path(previous)]


def virby_output(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "virby.cli", *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.repository
@pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="needs nix-instantiate")
@pytest.mark.parametrize("allow", [False, True])
def test_ssh_config_prints_what_the_module_installs(allow: bool) -> None:
    """Both spellings print, byte for byte, the block nix/lib/ssh-config.nix writes."""
    from tests.unit.test_nix import evaluate

    installed = evaluate(
        'import ./nix/lib/ssh-config.nix { port = 31333; workingDirectory = "/w/virby"; '
        f"allowUserSsh = {'true' if allow else 'false'}; }}"
    )
    flags = ["--port", "31333", "--working-directory", "/w/virby"]
    flags.append("--allow-user-ssh" if allow else "--no-allow-user-ssh")
    assert virby_output("ssh-config", *flags) == installed
    assert virby_output("prepare", "--print-ssh-config", *flags) == installed
