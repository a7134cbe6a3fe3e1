"""
The keys C{virby prepare} makes work with the real OpenSSH tools: ssh-keygen reads them, and
a real sshd given the host key and the authorized key lets the client in while ssh checks
the host key strictly against C{ssh_known_hosts}; after a new image, both a guest with the
old keys and one with the new keys let it in, until the previous keys are retired.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.processes import ProcessUnderTest, free_port
from virby import keys, layout
from virby.config import Config
from virby.rotation import retirePrevious
from virby.sshconfig import sshConfigBlock

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (shutil.which("ssh") and os.path.exists("/usr/sbin/sshd")), reason="needs OpenSSH"
    ),
]

MIB = 1024 * 1024


@pytest.fixture
def config(tmp_path: Path) -> Config:
    image = tmp_path / "nixos.img"
    config = Config(working_directory=str(tmp_path / "wd"), image=str(image), disk_size=8 * MIB)
    prepareImage(config, tmp_path, "nixos.img")
    return config


@contextlib.contextmanager
def realSshd(hostKey: Path, authorizedKeys: Path, configFile: Path) -> Iterator[int]:
    """A real sshd on a free loopback port with this host key and these authorized keys."""
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    port = free_port()
    configFile.write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {hostKey}\n"
        f"AuthorizedKeysFile {authorizedKeys}\n"
        "StrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    server = ProcessUnderTest(["/usr/sbin/sshd", "-D", "-e", "-f", str(configFile)])
    try:
        server.wait_for_line(r"Server listening on 127\.0\.0\.1 port", timeout=30)
        yield port
    finally:
        server.kill_all()


@pytest.fixture
def sshd(config: Config, tmp_path: Path) -> Iterator[int]:
    """A real sshd that holds the VM's host key and authorizes the client key, as the VM does."""
    with realSshd(
        Path(config.path(layout.HOST_KEY)),
        Path(config.path(layout.AUTHORIZED_KEY)),
        tmp_path / "sshdConfig",
    ) as port:
        yield port


def ssh(config: Config, port: int, *options: str) -> subprocess.CompletedProcess[str]:
    """Log in as the VM's users would be reached: strict host key check, only our key."""
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", config.path(layout.CLIENT_KEY),
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={config.path(layout.KNOWN_HOSTS)}",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", "HostKeyAlias=virby-vm-key",
         "-o", "IdentitiesOnly=yes", *options,
         "-p", str(port), f"{getpass.getuser()}@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_ssh_keygen_derives_the_public_keys_from_the_private_ones(config: Config) -> None:
    for private, public in (
        (layout.CLIENT_KEY, layout.AUTHORIZED_KEY),
        (layout.HOST_KEY, layout.HOST_PUBLIC_KEY),
    ):
        derived = subprocess.run(
            ["ssh-keygen", "-y", "-f", config.path(private)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert derived.strip() == keys.barePublic(Path(config.path(public)).read_text())


def test_sshd_accepts_the_client_with_the_host_key_pinned(config: Config, sshd: int) -> None:
    result = ssh(config, sshd)
    assert result.returncode == 0, result.stderr


def test_a_host_key_other_than_the_pinned_one_is_refused(config: Config, sshd: int) -> None:
    """The check above is real: pin some other key, and ssh must refuse the same server."""
    Path(config.path(layout.KNOWN_HOSTS)).write_text(
        keys.knownHostsLine(keys.generate("other").public)
    )
    result = ssh(config, sshd)
    assert result.returncode != 0
    assert "HOST IDENTIFICATION HAS CHANGED" in result.stderr or "verification failed" in (
        result.stderr
    )


def test_the_printed_ssh_config_block_reaches_the_server(
    config: Config, sshd: int, tmp_path: Path
) -> None:
    """What --print-ssh-config shows, used as ssh's only config, logs in (user aside)."""
    block = sshConfigBlock(Config(working_directory=config.working_directory, port=sshd))
    (tmp_path / "ssh_config").write_text(block)
    result = subprocess.run(
        ["ssh", "-F", str(tmp_path / "ssh_config"), "-o", "BatchMode=yes",
         "-o", "GlobalKnownHostsFile=/dev/null", "-l", getpass.getuser(), "virby-vm", "true"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_ssh_reads_the_block_as_intended(config: Config, tmp_path: Path) -> None:
    wd = tmp_path / "work dir"
    block = sshConfigBlock(Config(working_directory=str(wd), port=31222))
    (tmp_path / "ssh_config").write_text(block)
    effective = subprocess.run(
        ["ssh", "-G", "-F", str(tmp_path / "ssh_config"), "virby-vm"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()  # fmt: skip
    for line in (
        "hostname 127.0.0.1",
        "port 31222",
        "user builder",
        "hostkeyalias virby-vm-key",
        f"identityfile {wd}/ssh_user_ed25519_key",
        f"identityfile {wd}/ssh_user_ed25519_key.previous",
        f"userknownhostsfile {wd}/ssh_known_hosts",
        "stricthostkeychecking true",
        "identitiesonly yes",
    ):
        assert line in effective, line


# -- a new image while a VM of the old one runs (virby.rotation)


@contextlib.contextmanager
def guest(share: Path, tmp_path: Path, name: str) -> Iterator[int]:
    """
    A real sshd with the keys a guest copied from C{share} at its boot: its host key, and the
    one client key it authorizes.
    """
    booted = tmp_path / name
    shutil.copytree(share, booted)
    with realSshd(
        booted / layout.SHARE_HOST_KEY,
        booted / layout.SHARE_AUTHORIZED_KEY,
        tmp_path / f"{name}.sshd_config",
    ) as port:
        yield port


def prepareImage(config: Config, tmp_path: Path, name: str) -> None:
    """Run C{virby prepare} as a switch does, with a new image file of this name."""
    image = tmp_path / name
    image.write_bytes(name.encode() * 1000)
    result = subprocess.run(
        [sys.executable, "-m", "virby.cli", "prepare", "--image", str(image),
         "--working-directory", config.working_directory, "--disk-size", "1GiB"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def viaBlock(config: Config, port: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """ssh virby-vm with the block the module installs as its only config (user aside)."""
    block = sshConfigBlock(Config(working_directory=config.working_directory, port=port))
    (tmp_path / "ssh_config").write_text(block)
    return subprocess.run(
        ["ssh", "-F", str(tmp_path / "ssh_config"), "-o", "BatchMode=yes",
         "-o", "GlobalKnownHostsFile=/dev/null", "-l", getpass.getuser(), "virby-vm", "true"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_during_a_new_image_ssh_reaches_the_old_vm_and_the_new_one(
    config: Config, tmp_path: Path
) -> None:
    """
    known_hosts pins [new, old] and the block names [new, previous]: ssh's strict check and
    its identities get through to a guest with the old keys and to one with the new keys;
    once the boot retired the previous set, only the new one is reached.
    """
    share = Path(config.path(layout.SSHD_KEYS))
    shutil.copytree(share, tmp_path / "old-share")
    prepareImage(config, tmp_path, "new.img")
    assert len(Path(config.path(layout.KNOWN_HOSTS)).read_text().splitlines()) == 2
    with (
        guest(tmp_path / "old-share", tmp_path, "old") as old,
        guest(share, tmp_path, "new") as new,
    ):
        toOld, toNew = viaBlock(config, old, tmp_path), viaBlock(config, new, tmp_path)
        assert toOld.returncode == 0, toOld.stderr
        assert toNew.returncode == 0, toNew.stderr
        assert retirePrevious(config.working_directory)
        toOld, toNew = viaBlock(config, old, tmp_path), viaBlock(config, new, tmp_path)
        assert toNew.returncode == 0, toNew.stderr
        assert toOld.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in toOld.stderr


def test_a_missing_previous_key_costs_the_new_vm_nothing(config: Config, tmp_path: Path) -> None:
    """
    No previous set: ssh skips the missing identity without a word while the current key is
    accepted; from a user's own config it says so only when that key's turn comes.
    """
    assert not os.path.exists(config.path(layout.PREVIOUS_CLIENT_KEY))
    share = Path(config.path(layout.SSHD_KEYS))
    with guest(share, tmp_path, "current") as port:
        result = viaBlock(config, port, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "identity" not in result.stderr
        (tmp_path / "current" / layout.SHARE_AUTHORIZED_KEY).write_text(
            keys.generate("someone else").public + "\n"
        )
        refused = viaBlock(config, port, tmp_path)
    assert refused.returncode != 0
    assert f"no such identity: {config.path(layout.PREVIOUS_CLIENT_KEY)}" in refused.stderr
