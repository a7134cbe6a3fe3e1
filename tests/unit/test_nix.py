"""
The Nix side: every file parses, and the pure parts (the daemon's config JSON, memory and
disk sizes, the ssh Host block) agree with the Python code, evaluated offline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virby.config import ConfigError, fromMapping, parseSize
from virby.layout import SHARED_CLIENT_KEY
from virby.sshconfig import sshConfigBlock
from virby.vfkitflags import TIMESYNC_VSOCK_PORT

ROOT = Path(__file__).resolve().parents[2]
NIX_FILES = sorted(p for p in ROOT.glob("**/*.nix") if ".venv" not in p.parts)

pytestmark = [
    pytest.mark.repository,
    pytest.mark.skipif(
        shutil.which("nix-instantiate") is None, reason="nix-instantiate is not installed (nix-bin)"
    ),
]


def evaluate(expression: str) -> Any:
    result = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expression],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout)


def test_there_are_nix_files() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in NIX_FILES}
    assert {"flake.nix", "nix/module.nix", "nix/image.nix", "nix/package.nix"} <= names


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_nix_file_parses(path: Path) -> None:
    result = subprocess.run(
        ["nix-instantiate", "--parse", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("value", "mib"), [('"6GiB"', 6144), ('"4096MiB"', 4096), ("6144", 6144),
                                            ('"1G"', 1024), ('"2048"', 2048)])  # fmt: skip
def test_memory_accepted(value: str, mib: int) -> None:
    assert evaluate(f"(import ./nix/lib/size.nix).memoryMiB {value}") == mib


@pytest.mark.parametrize(
    ("value", "words"),
    [('"512MiB"', "less than the 1024 MiB"), ('"6TB"', "not a size"), ('"x"', "not a size"),
     ("512", "less than"), ('"1536KiB"', "whole number of MiB")],
)  # fmt: skip
def test_memory_refused_with_a_message(value: str, words: str) -> None:
    with pytest.raises(RuntimeError) as caught:
        evaluate(f"(import ./nix/lib/size.nix).memoryMiB {value}")
    assert "services.virby.memory" in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize(
    "text", ["100GiB", "100G", "512MiB", "1TiB", "4096", " 2 GiB ", "6TB", "x", "10iB", "1.5G",
             "100GB", "0K", "100B", "0100GiB", "999999999999999999", "8388607T"],
)  # fmt: skip
def test_sizes_agree_with_python(text: str) -> None:
    try:
        expected: int | None = parseSize(text)
    except ValueError:
        expected = None
    assert evaluate(f"(import ./nix/lib/size.nix).bytes {json.dumps(text)}") == expected


OPTIONS = {
    "cores": 8,
    "memory": 6144,
    "diskSize": "100GiB",
    "port": 31222,
    "onDemand": {"enable": False, "ttl": 180},
    "rosetta": False,
    "nestedVirtualization": False,
    "sharedDirectories": {},
    "debug": False,
    "allowUserSsh": False,
    "ephemeral": False,
}


def daemon_config(**changes: object) -> dict:
    options = {**OPTIONS, **changes}
    return evaluate(
        "import ./nix/lib/config.nix { cfg = builtins.fromJSON ''"
        + json.dumps(options)
        + "''; image = \"/nix/store/0000-image/nixos.img\"; "
        'vfkit = "/nix/store/0000-vfkit/bin/vfkit"; }'
    )


def test_default_options_give_the_daemons_defaults() -> None:
    document = daemon_config()
    config = fromMapping(document)
    assert config.memory == 6144 and config.ttl == 10800 and config.port == 31222
    assert config.listen == "launchd:name=Listener" and not config.on_demand
    assert config.image == "/nix/store/0000-image/nixos.img"
    assert config.vfkit == "/nix/store/0000-vfkit/bin/vfkit"


@pytest.mark.parametrize(
    ("changes", "checks"),
    [
        ({"memory": "8GiB"}, {"memory": 8192}),
        ({"onDemand": {"enable": True, "ttl": 30}}, {"on_demand": True, "ttl": 1800}),
        ({"ephemeral": True}, {"ephemeral": True}),
        ({"sharedDirectories": {"src": "/Users/me/src"}},
         {"shared_dirs": {"src": "/Users/me/src"}}),
        ({"rosetta": True, "nestedVirtualization": True, "debug": True, "allowUserSsh": True,
          "cores": 4, "port": 40000, "diskSize": "200GiB"},
         {"rosetta": True, "nested_virtualization": True, "debug": True, "allow_user_ssh": True,
          "cores": 4, "port": 40000, "disk_size": 200 * 1024**3}),
    ],
)  # fmt: skip
def test_option_sets_load_in_the_python_loader(changes: dict, checks: dict) -> None:
    config = fromMapping(daemon_config(**changes))
    for name, value in checks.items():
        assert getattr(config, name) == value


def test_a_bad_shared_directory_is_refused_by_the_module_as_by_the_loader() -> None:
    with pytest.raises(
        RuntimeError, match=re.escape('services.virby.sharedDirectories: tag "src"')
    ):
        daemon_config(sharedDirectories={"src": "relative/path"})
    with pytest.raises(ConfigError, match="shared-dirs"):
        fromMapping({"shared-dirs": {"src": "relative/path"}})


@pytest.mark.parametrize("port", [31222, 40000])
def test_ssh_block_matches_virby_prepare(port: int) -> None:
    text = evaluate(f"import ./nix/lib/ssh-config.nix {{ port = {port}; }}")
    assert text == sshConfigBlock(fromMapping({"port": port}))


def test_ssh_block_names_the_readable_key_when_users_may_ssh() -> None:
    text = evaluate("import ./nix/lib/ssh-config.nix { port = 31222; allowUserSsh = true; }")
    config = fromMapping({"allow-user-ssh": True})
    assert text == sshConfigBlock(config, identityFile=config.path(SHARED_CLIENT_KEY))


# The image cannot be evaluated here (no NixOS modules), so what it must say is checked as
# text: each line below is a setting read against nixpkgs' modules.
def image() -> str:
    return (ROOT / "nix" / "image.nix").read_text()


def unit_script() -> str:
    text = image()
    start = text.index("systemd.services.virby-install-keys")
    return text[start : text.index("};\n\n", start)]


def test_the_key_unit_runs_at_every_boot() -> None:
    unit = unit_script()
    assert "Condition" not in unit, "a condition would skip new host keys and a half install"
    assert 'before = [ "sshd.service" ];' in unit and 'requiredBy = [ "sshd.service" ];' in unit


def test_the_key_unit_installs_each_key_atomically_from_a_locked_down_share() -> None:
    unit = unit_script()
    assert "mount -t virtiofs -o ro,nodev,noexec,nosuid sshd-keys" in unit
    for target in ("/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/authorized_keys.d/builder"):
        directory, name = target.rsplit("/", 1)
        temporary = f"{directory}/.{name}.tmp"
        assert "install -m 6" in unit and f" {temporary}\n" in unit
        assert f"mv -f {temporary} {target}" in unit
    assert "umount ${keysMount} || " in unit and "rmdir ${keysMount} || " in unit


@pytest.mark.parametrize(
    "setting",
    [
        '"discard"', '"noatime"', 'options = [ "umask=0077" ];', '"nodev"', '"nosuid"',
        "nix.channel.enable = false;", "copyChannel = false;", "users.mutableUsers = false;",
        "nixpkgs.flake.setFlakeRegistry = lib.mkDefault false;",
        "system.disableInstallerTools = true;",
        "builtins.readFile ../virby/guest-sshd.json",
        'authorizedKeysFiles = lib.mkForce [ "/etc/ssh/authorized_keys.d/%u" ];',
    ],
)  # fmt: skip
def test_the_image_says(setting: str) -> None:
    assert setting in image()


def agent_unit() -> str:
    text = image()
    start = text.index("systemd.services.qemu-guest-agent")
    return text[start : text.index("};\n\n", start)]


def test_the_guest_agent_listens_where_vfkits_timesync_connects() -> None:
    """
    vfkit sends guest-set-time to this port at every wake of the Mac (--timesync); nixpkgs'
    module would start the agent only for a virtio-serial port vfkit never makes.
    """
    text = image()
    port = re.search(r"timesyncVsockPort = (\d+);", text)
    assert port is not None and int(port.group(1)) == TIMESYNC_VSOCK_PORT
    assert re.search(r"vsockAnyCid = 4294967295;", text), "VMADDR_CID_ANY, (u32)-1"
    assert "services.qemuGuest.enable = true;" in text
    assert 'boot.kernelModules = [ "vmw_vsock_virtio_transport" ];' in text
    unit = agent_unit()
    assert 'wantedBy = [ "multi-user.target" ];' in unit
    assert "ExecStart = lib.mkForce" in unit
    assert '"--method=vsock-listen"' in unit
    assert '"--path=${toString vsockAnyCid}:${toString timesyncVsockPort}"' in unit
    allowed = re.search(r'"--allow-rpcs=([^"]+)"', unit)
    assert allowed is not None and "guest-set-time" in allowed.group(1).split(",")
    assert not {"guest-exec", "guest-file-open", "guest-set-user-password"} & set(
        allowed.group(1).split(",")
    )
