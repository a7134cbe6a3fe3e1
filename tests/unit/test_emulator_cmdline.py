"""
The emulator refuses what vfkit v0.6.3 refuses, with vfkit's words, in vfkit's order, and
writes leases as bootpd does.  docs/vfkit.md has the table these tests follow.
"""

from __future__ import annotations

import os
import pty
import termios
from pathlib import Path

import pytest

from virby import layout
from virby.config import fromMapping
from virby.emulator import api, guest, lease
from virby.emulator.__main__ import USAGE, main, startUp
from virby.emulator.cmdline import EmulatorError, UsageError, parse
from virby.emulator.golang import parseMac, parseUint
from virby.emulator.vz import BLANK_STORE
from virby.leases import LeaseFile, parseLeases
from virby.vfkitflags import TIMESYNC_VSOCK_PORT, vfkitArguments


@pytest.fixture
def wd(short_tmp: Path) -> Path:
    (short_tmp / "keys").mkdir()
    with open(short_tmp / "diff.img", "wb") as f:
        f.truncate(4 * 1024 * 1024)
    return short_tmp


def design(wd: Path) -> list[str]:
    """The daemon's command line (docs/vfkit.md), with the emulator's lease file."""
    return [
        "--leases-file", str(wd / "leases"),
        "--cpus", "2", "--memory", "2048",
        "--bootloader", f"efi,variable-store={wd}/efistore.nvram,create",
        "--device", f"virtio-blk,path={wd}/diff.img",
        "--device", f"virtio-fs,sharedDir={wd}/keys,mountTag=sshd-keys",
        "--device", "virtio-net,nat,mac=52:54:00:12:03:0a",
        "--device", f"virtio-serial,logFilePath={wd}/serial.log",
        "--device", "virtio-rng", "--device", "virtio-balloon",
        "--timesync", "vsockPort=1234",
        "--restful-uri", f"unix://{wd}/vfkit.sock",
    ]  # fmt: skip


def replaced(argv: list[str], old: str, new: str) -> list[str]:
    assert old in argv
    return [new if a == old else a for a in argv]


def refusal(argv: list[str], stdin: int | None = None) -> str:
    with pytest.raises(UsageError) as caught:
        startUp(argv, stdin if stdin is not None else _pipe())
    return str(caught.value)


def _pipe() -> int:
    read, write = os.pipe()
    os.close(write)
    return read


# -- the design's command line


def test_the_design_command_line_starts_up(wd) -> None:
    settings, vm, _, endpoint = startUp(design(wd))
    assert settings.leases_file == str(wd / "leases") and settings.guest_port == 22
    assert (vm.cpus, vm.memory, vm.mac) == (2, 2048, "52:54:00:12:03:0a")
    assert vm.sharedDir("sshd-keys") == str(wd / "keys")
    assert vm.serial is not None and vm.serial["logFilePath"] == str(wd / "serial.log")
    assert (wd / "serial.log").exists() and (wd / "efistore.nvram").read_bytes() == BLANK_STORE
    assert endpoint == api.Endpoint("unix", "", str(wd / "vfkit.sock"))
    assert vm.timesync_port == 1234


def test_the_daemons_own_command_line_starts_up(wd) -> None:
    """What L{vfkitArguments} builds, time sync included, is what the emulator accepts."""
    config = fromMapping({"working-directory": str(wd), "leases-file": str(wd / "leases")})
    os.mkdir(wd / "vm_sshd_keys")
    argv = vfkitArguments(config, "vfkit", "02:94:00:00:00:01", createVariableStore=True)
    _, vm, _, endpoint = startUp(["--leases-file", str(wd / "leases"), *argv[1:]], _pipe())
    assert vm.timesync_port == TIMESYNC_VSOCK_PORT
    assert endpoint.path == str(wd / "vfkit.sock")


def test_environment_fallbacks(wd, monkeypatch) -> None:
    monkeypatch.setenv("VIRBY_EMULATOR_GUEST_PORT", "2222")
    monkeypatch.setenv("VIRBY_EMULATOR_FAULT", "crash-after=3")
    monkeypatch.setenv("VIRBY_EMULATOR_CPU", "Apple M1")
    monkeypatch.setenv("VIRBY_EMULATOR_GUEST_KEYS", "when-absent")
    settings, _ = parse(design(wd))
    assert settings.guest_port == 2222 and settings.crash_after == 3
    assert settings.played.cpu == "Apple M1" and settings.guest_keys == "when-absent"


# -- flags, as pflag parses them


@pytest.mark.parametrize(
    ("words", "cpus"),
    [(["--cpus=3"], 3), (["-c3"], 3), (["-c=3"], 3), (["-c", "3"], 3), (["--cpus", "0x10"], 16),
     (["--cpus", "010"], 8), (["--cpus", "1_000"], 1000)],
)  # fmt: skip
def test_numbers_and_shorthands(wd, words, cpus) -> None:
    _, flags = parse([*design(wd), *words])
    assert flags["cpus"] == cpus


@pytest.mark.parametrize(
    ("words", "text"),
    [
        (["--cpux", "2"], "unknown flag: --cpux"),
        (["-x"], "unknown shorthand flag: 'x' in -x"),
        (["--pidfile"], "flag needs an argument: --pidfile"),
        (["-c"], "flag needs an argument: 'c' in -c"),
        (["--memory", "lots"],
         'invalid argument "lots" for "-m, --memory" flag: strconv.ParseUint: parsing "lots": '
         "invalid syntax"),
        (["--cpus", "-1"],
         'invalid argument "-1" for "-c, --cpus" flag: strconv.ParseUint: parsing "-1": '
         "invalid syntax"),
        (["--nested=maybe"],
         'invalid argument "maybe" for "-n, --nested" flag: strconv.ParseBool: parsing "maybe": '
         "invalid syntax"),
        (["---x"], "bad flag syntax: ---x"),
    ],
)  # fmt: skip
def test_flag_refusals(wd, words, text) -> None:
    with pytest.raises(UsageError) as caught:
        parse([*design(wd), *words])
    assert str(caught.value) == text


# -- vfkit's configuration checks


@pytest.mark.parametrize(
    ("old", "new", "text"),
    [
        ("virtio-net,nat,mac=52:54:00:12:03:0a", "virtio-net,mac=52:54:00:12:03:0a",
         "one of 'nat' or 'fd' or 'unixSocketPath' must be set"),
        ("virtio-net,nat,mac=52:54:00:12:03:0a", "virtio-net,nat=on,mac=52:54:00:12:03:0a",
         "unexpected value for virtio-net 'nat' option: on"),
        ("virtio-net,nat,mac=52:54:00:12:03:0a", "virtio-net,nat,mac=52:54:00:12:03",
         "address 52:54:00:12:03: invalid MAC address"),
        ("virtio-net,nat,mac=52:54:00:12:03:0a", "virtio-net,nat,mac=52:54:00:12:03:0g",
         "address 52:54:00:12:03:0g: invalid MAC address"),
        ("virtio-net,nat,mac=52:54:00:12:03:0a", "virtio-net,nat,mac=52:54:00:12:03:0a,speed=1",
         "unknown option for virtio-net devices: speed"),
        ("virtio-rng", "virtio-sound", "unknown device type: virtio-sound"),
        ("virtio-rng", "virtio-rng,fast", "unknown options for virtio-rng devices: [{fast }]"),
        ("virtio-balloon", "virtio-balloon,size=1",
         "unknown options for virtio-balloon devices: [{size 1}]"),
        ("vsockPort=1234", "2", "unknown option for timesync parameter: 2"),
    ],
)  # fmt: skip
def test_configuration_refusals(wd, old, new, text) -> None:
    assert refusal(replaced(design(wd), old, new)) == text


def test_serial_refusals(wd) -> None:
    serial = f"virtio-serial,logFilePath={wd}/serial.log"
    cases = {
        "virtio-serial": "one of 'logFilePath', 'stdio' or 'pty' must be set",
        "virtio-serial,stdio=yes": "unexpected value for virtio-serial 'stdio' option: yes",
        f"{serial},stdio": "'logFilePath' and 'stdio' cannot be set at the same time",
        "virtio-serial,stdio,pty": "'stdio' and 'pty' cannot be set at the same time",
        "virtio-serial,tty": "unknown option for virtio-serial devices: tty",
    }
    for new, text in cases.items():
        assert refusal(replaced(design(wd), serial, new)) == text


def test_the_disk_must_open_and_not_be_qcow2(wd) -> None:
    disk = f"virtio-blk,path={wd}/diff.img"
    missing = wd / "missing.img"
    assert refusal(replaced(design(wd), disk, f"virtio-blk,path={missing}")) == (
        f"failed to open file {missing}: open {missing}: no such file or directory"
    )
    (wd / "empty.img").write_bytes(b"")
    assert refusal(replaced(design(wd), disk, f"virtio-blk,path={wd}/empty.img")) == (
        f"failed to read the header of file {wd}/empty.img: EOF"
    )
    assert refusal(replaced(design(wd), disk, f"virtio-blk,path={wd}/keys")) == (
        f"failed to read the header of file {wd}/keys: read {wd}/keys: is a directory"
    )
    (wd / "q.img").write_bytes(b"QFI\xfb" + bytes(100))
    assert refusal(replaced(design(wd), disk, f"virtio-blk,path={wd}/q.img")) == (
        "vfkit does not support qcow2 image format"
    )
    assert refusal(replaced(design(wd), disk, f"{disk},readonly=yes")) == (
        "unexpected value for virtio-blk 'readonly' option: yes"
    )


def test_the_bootloader(wd) -> None:
    store = f"efi,variable-store={wd}/efistore.nvram,create"
    assert refusal(replaced(design(wd), store, "bios")) == "unknown bootloader type: bios"
    assert refusal(replaced(design(wd), store, f"{store}=yes")) == (
        "unexpected value for EFI bootloader 'create' option: yes"
    )
    assert refusal(replaced(design(wd), store, f"{store},secure")) == (
        "unknown option for EFI bootloaders: secure"
    )
    without = [a for a in design(wd) if a not in ("--bootloader", store)]
    assert refusal(without) == "empty option list in --bootloader command line argument"
    with pytest.raises(EmulatorError):
        startUp(replaced(design(wd), store, "linux,kernel=/k"), _pipe())


def test_create_overwrites_an_existing_store_and_without_it_the_store_must_exist(wd) -> None:
    """vz's AllowOverwrite: `create` blanks the store at every start."""
    nvram = wd / "efistore.nvram"
    nvram.write_bytes(b"boot entries")
    startUp(design(wd), _pipe())
    assert nvram.read_bytes() == BLANK_STORE
    store = f"efi,variable-store={nvram},create"
    nvram.write_bytes(b"boot entries")
    startUp(replaced(design(wd), store, f"efi,variable-store={nvram}"), _pipe())
    assert nvram.read_bytes() == b"boot entries"
    nvram.unlink()
    assert refusal(replaced(design(wd), store, f"efi,variable-store={nvram}")) == (
        f"stat {nvram}: no such file or directory"
    )


def test_log_level(wd) -> None:
    assert refusal([*design(wd), "--log-level", "warn"]) == "unknown log level: warn"
    startUp([*design(wd), "--log-level", "debug"], _pipe())


# -- the console


def test_a_stdio_console_needs_a_terminal_on_stdin(wd) -> None:
    """vfkit's setRawMode calls tcgetattr on stdin: a pipe or /dev/null is refused."""
    serial = f"virtio-serial,logFilePath={wd}/serial.log"
    stdio = replaced(design(wd), serial, "virtio-serial,stdio")
    assert refusal(stdio, _pipe()) == "inappropriate ioctl for device"
    with open(os.devnull) as null:
        assert refusal(stdio, null.fileno()) == "inappropriate ioctl for device"
    closed = _pipe()
    os.close(closed)
    assert refusal(stdio, closed) == "bad file descriptor"


def test_a_stdio_console_on_a_terminal_puts_it_into_raw_mode(wd) -> None:
    master, terminal = pty.openpty()
    try:
        serial = f"virtio-serial,logFilePath={wd}/serial.log"
        startUp(replaced(design(wd), serial, "virtio-serial,stdio"), terminal)
        iflag, _, _, lflag, *_ = termios.tcgetattr(terminal)
        assert not iflag & termios.ICRNL and not lflag & (termios.ICANON | termios.ECHO)
    finally:
        os.close(master)
        os.close(terminal)


def test_the_console_file_is_truncated_at_start(wd) -> None:
    (wd / "serial.log").write_text("the last boot\n")
    _, _, console, _ = startUp(design(wd), _pipe())
    assert (wd / "serial.log").read_text() == ""
    console.line("EFI stub")
    assert (wd / "serial.log").read_text().endswith("] EFI stub\n")


# -- the Mac it plays: --nested and Rosetta


@pytest.mark.parametrize(
    ("mac", "accepted"),
    [(["--cpu", "Apple M4"], True), (["--cpu", "Apple M1"], False),
     (["--cpu", "Apple M3", "--macos", "14.6"], False), (["--cpu", "Intel(R) Core(TM) i7"], False)],
)  # fmt: skip
def test_nested_where_the_mac_cannot(wd, mac, accepted) -> None:
    argv = [*design(wd), "--nested", *mac]
    if accepted:
        assert startUp(argv, _pipe())[1].nested is True
    else:
        assert refusal(argv) == "nested virtualization is not supported"
        assert not (wd / "serial.log").exists(), "refused before any device was made"


@pytest.mark.parametrize(
    ("mac", "text"),
    [(["--rosetta", "missing"], "rosetta is not installed"),
     (["--cpu", "Intel(R) Core(TM) i7"], "rosetta is unsupported on non-arm64 platforms"),
     (["--macos", "12.7"], "rosetta is not supported")],
)  # fmt: skip
def test_rosetta_where_the_mac_cannot(wd, mac, text) -> None:
    (wd / "serial.log").write_text("old console\n")
    argv = [*design(wd), "--device", "rosetta,mountTag=rosetta", *mac]
    assert refusal(argv) == text
    assert (wd / "serial.log").read_text() == "", "the console came first: it was truncated"


def test_rosetta_options(wd) -> None:
    assert refusal([*design(wd), "--device", "rosetta"]) == (
        "missing mandatory 'mountTage' option for rosetta share"
    )
    assert refusal([*design(wd), "--device", "rosetta,mountTag=r,ignoreIfMissing"]) == (
        "unknown option for rosetta share: ignoreIfMissing"
    )
    startUp([*design(wd), "--device", "rosetta,mountTag=rosetta"], _pipe())


@pytest.mark.parametrize(
    ("options", "text"),
    [("", "rosetta is not installed"),
     (",ignore-if-missing", "rosetta is not installed"),
     (",install", "failed to install rosetta: virby emulator: cannot install Rosetta"),
     (",install,ignore-if-missing", "failed to create a new rosetta directory share: "
      'Error Domain=VZErrorDomain Code=10 Description="virby emulator: Rosetta is not '
      'installed, so there is no Rosetta share" UserInfo={}')],
)  # fmt: skip
def test_rosetta_missing_is_refused_whatever_the_options(wd, capsys, options, text) -> None:
    """
    vfkit's checkRosettaAvailability: ignore-if-missing matters only once an install was
    asked for and failed, and even then vfkit goes on to make the share, which the framework
    refuses without Rosetta: no combination boots a VM on a Mac without Rosetta.
    """
    argv = [*design(wd), "--device", f"rosetta,mountTag=rosetta{options}", "--rosetta", "missing"]
    assert refusal(argv) == text
    err = capsys.readouterr().err
    if options == ",install,ignore-if-missing":
        said = [line for line in err.splitlines() if "osetta" in line]
        assert said[0].endswith(
            'level=info msg="Rosetta installation failed. Continuing without Rosetta."'
        )
        assert said[1] == "virby emulator: cannot install Rosetta"
    else:
        assert "Continuing without Rosetta" not in err


@pytest.mark.parametrize(
    "options", ["", ",install", ",ignore-if-missing", ",install,ignore-if-missing"]
)
def test_rosetta_installed_is_shared_whatever_the_options(wd, options) -> None:
    startUp([*design(wd), "--device", f"rosetta,mountTag=rosetta{options}"], _pipe())


# -- tags (Virtualization.framework: non-empty, fewer than 36 bytes of UTF-8)


def test_tags_of_36_bytes_and_more_are_refused(wd) -> None:
    share = ["--device", f"virtio-fs,sharedDir={wd}"]
    startUp([*design(wd), *share[:-1], f"{share[-1]},mountTag={'t' * 35}"], _pipe())
    text = refusal([*design(wd), *share[:-1], f"{share[-1]},mountTag={'t' * 36}"])
    assert text.startswith("Error Domain=VZErrorDomain Code=2 Description=")
    assert "36 bytes" in text
    startUp([*design(wd), *share[:-1], f"{share[-1]},mountTag={'é' * 17}"], _pipe())
    assert "36 bytes" in refusal([*design(wd), *share[:-1], f"{share[-1]},mountTag={'é' * 18}"])
    long_rosetta = refusal([*design(wd), "--device", f"rosetta,mountTag={'r' * 40}"])
    assert long_rosetta.startswith(
        "failed to create a new virtio file system configuration for rosetta: Error Domain="
    )


def test_a_share_without_a_tag_takes_its_directory_name(wd) -> None:
    long = wd / ("d" * 40)
    long.mkdir()
    assert "40 bytes" in refusal([*design(wd), "--device", f"virtio-fs,sharedDir={long}"])
    _, vm, _, _ = startUp([*design(wd), "--device", f"virtio-fs,sharedDir={wd}/keys/"], _pipe())
    assert vm.sharedDir("keys") == f"{wd}/keys/"


def test_a_share_must_exist(wd) -> None:
    assert refusal([*design(wd), "--device", f"virtio-fs,sharedDir={wd}/gone,mountTag=g"]) == (
        f"stat {wd}/gone: no such file or directory"
    )
    assert refusal([*design(wd), "--device", "virtio-fs,mountTag=g"]) == (
        "missing mandatory 'sharedDir' option for virtio-fs device"
    )


# -- --timesync vsockPort=N


@pytest.mark.parametrize(
    ("value", "text"),
    [("vsockPort=0", "missing 'vsockPort' option for timesync parameter"),
     ("", None), ("vsockPort=1024", None), (",vsockPort=1024,", None),
     ("vsockPort=x", 'strconv.ParseUint: parsing "x": invalid syntax'),
     ("vsockPort=+5", 'strconv.ParseUint: parsing "+5": invalid syntax'),
     ("vsockPort=0x10", 'strconv.ParseUint: parsing "0x10": invalid syntax'),
     ("vsockPort=4294967296", 'strconv.ParseUint: parsing "4294967296": value out of range'),
     ("port=1024", "unknown option for timesync parameter: port")],
)  # fmt: skip
def test_timesync(wd, value, text) -> None:
    argv = [*design(wd), "--timesync", value]
    if text is None:
        _, vm, _, _ = startUp(argv, _pipe())
        assert vm.timesync_port == (1024 if value else None)
    else:
        assert refusal(argv) == text


# -- the REST socket


def test_the_rest_socket_path_fits_macos_sun_path(short_tmp) -> None:
    fits = "/" + "x" * 102
    assert api.parseRestfulUri(f"unix://{fits}").path == fits
    with pytest.raises(UsageError) as caught:
        api.parseRestfulUri(f"unix://{fits}x")
    assert str(caught.value) == "invalid unix uri: socket path length exceeds macOS limits"
    multibyte = "/" + "é" * 52  # 105 bytes in 53 characters
    with pytest.raises(UsageError, match="exceeds macOS limits"):
        api.parseRestfulUri(f"unix://{multibyte}")


@pytest.mark.parametrize(
    ("uri", "outcome"),
    [("none://", api.Endpoint("none", "", "")),
     ("unix:///run/v.sock", api.Endpoint("unix", "", "/run/v.sock")),
     ("unix:/run/v.sock", api.Endpoint("unix", "", "/run/v.sock")),
     ("tcp://localhost:8080", api.Endpoint("tcp", "localhost:8080", "")),
     ("http://:8080", api.Endpoint("tcp", ":8080", "")),
     ("unix://run/v.sock", "invalid unix uri: host is forbidden"),
     ("unix:", "invalid unix uri: missing path"),
     ("tcp://localhost", "invalid TCP uri: missing port"),
     ("tcp://localhost:80/api", "invalid TCP uri: path is forbidden"),
     ("tcp:///x", "invalid TCP uri: missing host"),
     ("ftp://h:1", "invalid scheme ftp"),
     ("vfkit.sock", 'parse "vfkit.sock": invalid URI for request'),
     ("tcp://h:x", 'parse "tcp://h:x": invalid port ":x" after host')],
)  # fmt: skip
def test_restful_uris(uri, outcome) -> None:
    if isinstance(outcome, api.Endpoint):
        assert api.parseRestfulUri(uri) == outcome
    else:
        with pytest.raises(UsageError) as caught:
            api.parseRestfulUri(uri)
        assert str(caught.value) == outcome


def test_the_rest_uri_is_checked_after_the_devices_are_made(wd) -> None:
    """vfkit checks the URI when it starts its server: the console and pidfile exist by then."""
    argv = replaced(design(wd), f"unix://{wd}/vfkit.sock", "unix:///" + "x" * 120)
    (wd / "serial.log").write_text("old\n")
    assert refusal([*argv, "--pidfile", str(wd / "vfkit.pid")]) == (
        "invalid unix uri: socket path length exceeds macOS limits"
    )
    assert (wd / "serial.log").read_text() == "" and (wd / "vfkit.pid").exists()


def test_the_pidfile_is_written_before_the_devices_are_checked(wd) -> None:
    argv = [*replaced(design(wd), "virtio-rng", "virtio-sound"), "--pidfile", str(wd / "p")]
    assert refusal(argv) == "unknown device type: virtio-sound"
    assert (wd / "p").read_text() == str(os.getpid())
    assert (wd / "p").stat().st_mode & 0o777 == 0o600


# -- how a refusal is reported


def test_a_refusal_is_reported_as_vfkit_reports_it(wd, capsys) -> None:
    argv = replaced(design(wd), "virtio-rng", "virtio-sound")
    assert main(argv, _pipe()) == 1
    err = capsys.readouterr().err
    assert err.endswith(
        f"Error: unknown device type: virtio-sound\n{USAGE}\nunknown device type: virtio-sound\n"
    )
    assert "Traceback" not in err


def test_the_emulators_own_limits_say_so(wd, capsys) -> None:
    assert main([*design(wd), "--gui"], _pipe()) == 1
    assert capsys.readouterr().err.endswith(
        "\nvirby emulator: --cloud-init, --ignition and --gui are not emulated\n"
    )


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == "vfkit version: v0.6.3\n"


# -- Go's parsers


def test_parse_mac_takes_what_go_takes() -> None:
    assert parseMac("52:54:00:AB:03:0a").hex() == "525400ab030a"
    assert parseMac("52-54-00-ab-03-0a") == parseMac("5254.00ab.030a")
    assert len(parseMac("02:00:5e:10:00:00:00:01")) == 8
    for bad in ("52:54:00:ab:03", "52:54-00:ab:03:0a", "52:54:00:ab:03:0a:", "5254.00ab.03a"):
        with pytest.raises(ValueError, match="invalid MAC address"):
            parseMac(bad)


def test_parse_uint() -> None:
    assert parseUint("4294967295", 10, 32) == 4294967295
    assert parseUint("0b101", 0, 64) == 5 and parseUint("0o17", 0, 64) == 15
    for bad in ("", "1 ", "_1", "1__0", "0x"):
        with pytest.raises(ValueError, match="invalid syntax"):
            parseUint(bad, 0, 64)


# -- the guest's disk and its key unit


def test_the_guest_keeps_its_state_in_its_disk(wd) -> None:
    disk = str(wd / "diff.img")
    assert guest.readState(disk) == guest.GuestState()
    guest.writeState(disk, guest.GuestState(host_key="H", authorized_keys="A", boots=1))
    assert guest.readState(disk) == guest.GuestState("H", "A", 1)
    with open(disk, "r+b") as f:
        f.truncate(64 * 1024 * 1024)  # `virby prepare` grows the disk: the state stays
    assert guest.readState(disk).host_key == "H"
    blank = wd / "base.img"
    blank.write_bytes(bytes(2 * 1024 * 1024))
    os.replace(blank, disk)  # a fresh copy of base.img: a first boot
    assert guest.readState(disk) == guest.GuestState()


def test_a_torn_record_is_a_first_boot(wd) -> None:
    disk = str(wd / "diff.img")
    guest.writeState(disk, guest.GuestState(host_key="H", authorized_keys="A", boots=1))
    with open(disk, "r+b") as f:
        f.seek(guest.RECORD_OFFSET + 30)
        f.write(b"\xff")
    assert guest.readState(disk) == guest.GuestState()


def test_a_disk_too_small_for_a_filesystem(wd) -> None:
    (wd / "tiny.img").write_bytes(b"x" * 4096)
    with pytest.raises(guest.DiskError, match="smaller than 1 MiB"):
        guest.writeState(str(wd / "tiny.img"), guest.GuestState(boots=1))


def test_the_key_unit_takes_the_shares_keys_at_every_boot(wd) -> None:
    keys = wd / "keys"
    (keys / layout.SHARE_HOST_KEY).write_text("new host key")
    (keys / layout.SHARE_AUTHORIZED_KEY).write_text("new client key")
    state = guest.GuestState(host_key="old host key", authorized_keys="old client key")
    assert guest.installKeys(str(keys), state, "every-boot") is True
    assert (state.host_key, state.authorized_keys) == ("new host key", "new client key")


def test_the_old_key_unit_kept_the_first_keys(wd) -> None:
    keys = wd / "keys"
    (keys / layout.SHARE_HOST_KEY).write_text("new host key")
    (keys / layout.SHARE_AUTHORIZED_KEY).write_text("new client key")
    state = guest.GuestState(host_key="old host key", authorized_keys="old client key")
    assert guest.installKeys(str(keys), state, "when-absent") is False
    assert state.host_key == "old host key"
    fresh = guest.GuestState()
    assert guest.installKeys(str(keys), fresh, "when-absent") is True


def test_the_key_unit_fails_without_its_share(wd) -> None:
    with pytest.raises(guest.KeyUnitFailed, match="no such virtiofs tag"):
        guest.installKeys(None, guest.GuestState(), "every-boot")
    with pytest.raises(guest.KeyUnitFailed, match="cannot read the sshd-keys share"):
        guest.installKeys(str(wd / "keys"), guest.GuestState(), "every-boot")


# -- bootpd's leases


def test_lease_is_written_newest_first_without_leading_zeros(tmp_path) -> None:
    path = str(tmp_path / "leases")
    lease.write(path, "127.0.9.9", "02:00:00:00:00:01", 0x100)
    lease.write(path, "127.0.5.5", "52:54:00:12:03:0a", 0x200)
    text = Path(path).read_text()
    assert text.index("127.0.5.5") < text.index("127.0.9.9")
    assert "hw_address=1,52:54:0:12:3:a\n" in text and "lease=0x200" in text
    assert LeaseFile(path).lookup("52:54:00:12:03:0a") == "127.0.5.5"
    lease.write(path, "127.0.5.6", "52:54:00:12:03:0a", 0x300)
    assert [entry.ip_address for entry in parseLeases(Path(path).read_text())] == [
        "127.0.5.6",
        "127.0.9.9",
    ]
    assert lease.previousAddress(path, "52:54:00:12:03:0a") == "127.0.5.6"


def test_duid_lease_hides_the_mac(tmp_path) -> None:
    path = str(tmp_path / "leases")
    lease.write(path, "127.0.5.5", "52:54:00:12:03:0a", 0x200, duid=True)
    assert "hw_address=ff," in Path(path).read_text()
    assert LeaseFile(path).lookup("52:54:00:12:03:0a") is None
