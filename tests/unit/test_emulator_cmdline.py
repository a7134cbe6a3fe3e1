"""The emulator refuses what vfkit refuses, and writes leases as bootpd does."""

from __future__ import annotations

from pathlib import Path

import pytest

from virby.emulator import lease
from virby.emulator.__main__ import main
from virby.emulator.cmdline import UsageError, parse
from virby.leases import LeaseFile, parse_leases


@pytest.fixture
def base(tmp_path) -> list[str]:
    disk = tmp_path / "diff.img"
    disk.write_bytes(b"")
    return [
        "--leases-file", str(tmp_path / "leases"),
        "--cpus", "2", "--memory", "2048",
        "--bootloader", f"efi,variable-store={tmp_path}/nvram,create",
        "--device", f"virtio-blk,path={disk}",
        "--device", f"virtio-fs,sharedDir={tmp_path},mountTag=sshd-keys",
        "--device", "virtio-net,nat,mac=52:54:00:12:03:0a",
        "--device", "virtio-serial,stdio",
        "--device", "virtio-rng", "--device", "virtio-balloon",
        "--restful-uri", f"unix://{tmp_path}/vfkit.sock",
    ]  # fmt: skip


def test_the_design_command_line_parses(base, tmp_path) -> None:
    settings, vm = parse(base)
    assert settings.leases_file == str(tmp_path / "leases") and settings.guest_port == 22
    assert (vm.cpus, vm.memory, vm.mac) == (2, 2048, "52:54:00:12:03:0a")
    assert vm.shared_dir("sshd-keys") == str(tmp_path)
    assert vm.serial.options == {"stdio": True}


def test_environment_fallbacks(base, monkeypatch) -> None:
    monkeypatch.setenv("VIRBY_EMULATOR_GUEST_PORT", "2222")
    monkeypatch.setenv("VIRBY_EMULATOR_FAULT", "crash-after=3")
    settings, _ = parse(base)
    assert settings.guest_port == 2222 and settings.crash_after == 3


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("virtio-net,nat,mac=52:54:00:12:03:0a", "virtio-net,mac=52:54:00:12:03:0a"),
         "one of 'nat' or 'fd' or 'unixSocketPath' must be set"),
        (("virtio-rng", "virtio-sound"), "unknown device type: virtio-sound"),
        (("virtio-rng", "virtio-rng,fast"), "unknown option for virtio-rng devices: fast"),
        (("virtio-serial,stdio", "virtio-serial"), "exactly one"),
        (("--cpus", "--cpux"), "unknown flag: --cpux"),
        (("2048", "lots"), 'invalid argument "lots"'),
    ],
)  # fmt: skip
def test_refusals(base, change, words) -> None:
    old, new = change
    argv = [new if a == old else a for a in base]
    with pytest.raises(UsageError, match=words):
        parse(argv)


def test_long_unix_socket_is_refused(base) -> None:
    argv = [*base[:-1], "unix:///" + "x" * 120]
    with pytest.raises(UsageError, match="too long"):
        parse(argv)


def test_missing_variable_store_without_create(base, tmp_path) -> None:
    argv = [a.replace(",create", "") for a in base]
    with pytest.raises(UsageError, match="does not exist"):
        parse(argv)


def test_refusal_exits_1_with_one_line(base, capsys) -> None:
    argv = [a if a != "virtio-rng" else "virtio-sound" for a in base]
    assert main(argv) == 1
    assert capsys.readouterr().err == "Error: unknown device type: virtio-sound\n"


def test_lease_is_written_newest_first_without_leading_zeros(tmp_path) -> None:
    path = str(tmp_path / "leases")
    lease.write(path, "127.0.9.9", "02:00:00:00:00:01", 0x100)
    lease.write(path, "127.0.5.5", "52:54:00:12:03:0a", 0x200)
    text = Path(path).read_text()
    assert text.index("127.0.5.5") < text.index("127.0.9.9")
    assert "hw_address=1,52:54:0:12:3:a\n" in text and "lease=0x200" in text
    assert LeaseFile(path).lookup("52:54:00:12:03:0a") == "127.0.5.5"
    lease.write(path, "127.0.5.6", "52:54:00:12:03:0a", 0x300)
    assert [entry.ip_address for entry in parse_leases(Path(path).read_text())] == [
        "127.0.5.6",
        "127.0.9.9",
    ]
    assert lease.previous_address(path, "52:54:00:12:03:0a") == "127.0.5.6"


def test_duid_lease_hides_the_mac(tmp_path) -> None:
    path = str(tmp_path / "leases")
    lease.write(path, "127.0.5.5", "52:54:00:12:03:0a", 0x200, duid=True)
    assert "hw_address=ff," in Path(path).read_text()
    assert LeaseFile(path).lookup("52:54:00:12:03:0a") is None
