"""The host facts: four Macs played through the one runner, and what was asked of each."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from virby.hostfacts import (
    ARM64,
    CPU_BRAND,
    INSTALL_ROSETTA,
    MACOS_VERSION,
    ROSETTA_RUNTIME,
    HostCommandError,
    MacRunner,
    PlayedMac,
    configOfCommandLine,
    defaultRunner,
    gather,
    parseMachines,
    parseNixConfig,
    parseSshOptions,
)


class RecordedMac:
    """Answers as a Mac would, and remembers every question."""

    def __init__(self, answers: dict[tuple[str, ...], str], files: set[str]) -> None:
        self.answers = answers
        self.files = files
        self.asked: list[str] = []

    def run(self, argv: Sequence[str], timeout: float | None = None) -> str:
        self.asked.append(" ".join(argv))
        if tuple(argv) not in self.answers:
            raise HostCommandError(f"{argv[-1]}: unknown oid")
        return self.answers[tuple(argv)]

    def exists(self, path: str) -> bool:
        self.asked.append(f"exists {path}")
        return path in self.files

    def userId(self, name: str) -> int | None:
        self.asked.append(f"user {name}")
        return None

    def readText(self, path: str) -> str:
        self.asked.append(f"read {path}")
        raise FileNotFoundError(2, "No such file or directory", path)


def mac(cpu: str, version: str, rosetta: bool, arm: bool = True) -> RecordedMac:
    answers = {CPU_BRAND: cpu + "\n", MACOS_VERSION: version + "\n"}
    if arm:
        answers[ARM64] = "1\n"
    return RecordedMac(answers, {ROSETTA_RUNTIME} if rosetta else set())


M1_WITHOUT_ROSETTA = mac("Apple M1", "15.1", rosetta=False)
M3_ON_14 = mac("Apple M3 Pro", "14.6.1", rosetta=True)
M4_ON_15 = mac("Apple M4 Max", "15.0", rosetta=True)
INTEL = mac("Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", "15.2", rosetta=False, arm=False)


def test_an_m1_without_rosetta() -> None:
    facts = gather(M1_WITHOUT_ROSETTA)
    assert (facts.cpu, facts.appleSilicon, facts.macos) == ("Apple M1", True, (15, 1))
    assert facts.rosetta_installed is False and facts.chipGeneration == 1
    nested = facts.nestedVirtualization()
    assert nested.ok is False and "needs Apple M3 or later, and this Mac has Apple M1" in nested.why
    rosetta = facts.rosetta()
    assert rosetta.ok is False and rosetta.fix == f"run `{INSTALL_ROSETTA}`"


def test_an_m3_on_macos_14_cannot_nest_yet() -> None:
    nested = gather(M3_ON_14).nestedVirtualization()
    assert nested.ok is False
    assert nested.why == "it needs macOS 15 or later, and this Mac runs macOS 14.6.1"
    assert gather(M3_ON_14).rosetta().ok is True


def test_an_m4_on_macos_15_does_everything() -> None:
    facts = gather(M4_ON_15)
    assert facts.nestedVirtualization().ok is True and facts.rosetta().ok is True


def test_an_intel_mac() -> None:
    facts = gather(INTEL)
    assert facts.appleSilicon is False and facts.rosetta_installed is None
    assert facts.nestedVirtualization().ok is False
    rosetta = facts.rosetta()
    assert rosetta.ok is False and "needs Apple silicon" in rosetta.why
    assert rosetta.fix == "turn rosetta off"


def test_what_was_asked_is_recorded_in_order() -> None:
    recorded = mac("Apple M2", "13.5", rosetta=True)
    facts = gather(recorded)
    assert recorded.asked == [
        "/usr/sbin/sysctl -n machdep.cpu.brand_string",
        "/usr/sbin/sysctl -n hw.optional.arm64",
        "/usr/bin/sw_vers -productVersion",
        f"exists {ROSETTA_RUNTIME}",
    ]
    assert [(p.asked, p.answer) for p in facts.probes] == [
        ("/usr/sbin/sysctl -n machdep.cpu.brand_string", "Apple M2"),
        ("/usr/sbin/sysctl -n hw.optional.arm64", "1"),
        ("/usr/bin/sw_vers -productVersion", "13.5"),
        (f"test -e {ROSETTA_RUNTIME}", "yes"),
    ]
    intel = gather(INTEL)
    assert ("/usr/sbin/sysctl -n hw.optional.arm64", "failed: hw.optional.arm64: unknown oid") in [
        (p.asked, p.answer) for p in intel.probes
    ]


def test_rosetta_for_linux_needs_macos_13() -> None:
    rosetta = gather(mac("Apple M1", "12.7", rosetta=True)).rosetta()
    assert rosetta.ok is False and "needs macOS 13 or later" in rosetta.why


def test_a_mac_that_cannot_be_read_is_not_guessed() -> None:
    facts = gather(RecordedMac({}, set()))
    assert facts.cpu is None and facts.appleSilicon is None and facts.macos is None
    assert facts.nestedVirtualization().ok is None
    assert facts.rosetta().ok is None and not facts.rosetta().refused


def test_unknown_chip_names_are_not_guessed() -> None:
    facts = gather(mac("Apple Silicon (Virtual)", "15.0", rosetta=True))
    assert facts.nestedVirtualization().ok is None


@pytest.mark.parametrize(
    ("environment", "nested", "rosetta"),
    [
        ({}, True, True),
        ({"VIRBY_EMULATOR_CPU": "Apple M1", "VIRBY_EMULATOR_ROSETTA": "missing"}, False, False),
        ({"VIRBY_EMULATOR_CPU": "Apple M3", "VIRBY_EMULATOR_MACOS": "14.2"}, False, True),
        ({"VIRBY_EMULATOR_CPU": "Intel(R) Xeon(R)"}, False, False),
    ],
)
def test_the_played_mac_is_set_by_the_emulators_variables(environment, nested, rosetta) -> None:
    facts = gather(PlayedMac.fromEnvironment(environment))
    assert facts.nestedVirtualization().ok is nested
    assert facts.rosetta().ok is rosetta


def test_off_a_mac_the_runner_plays_one(monkeypatch) -> None:
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("VIRBY_EMULATOR_CPU", "Apple M1")
    runner = defaultRunner()
    assert isinstance(runner, PlayedMac) and runner.cpu == "Apple M1"
    monkeypatch.setattr("sys.platform", "darwin")
    assert isinstance(defaultRunner(), MacRunner)


def test_the_mac_runner_runs_commands_and_reports_failures() -> None:
    runner = MacRunner()
    assert runner.run(["/bin/sh", "-c", "echo 15.1"]) == "15.1\n"
    with pytest.raises(HostCommandError, match="no such oid"):
        runner.run(["/bin/sh", "-c", "echo 'sysctl: no such oid' >&2; exit 1"])
    with pytest.raises(HostCommandError):
        runner.run(["/nonexistent/sw_vers"])
    assert runner.exists("/") and not runner.exists("/nonexistent")


# -- what doctor reads of the Nix side


def test_nix_config_show_is_read_name_by_name() -> None:
    text = (
        "allow-dirty = true\nbuilders = @/etc/nix/machines\nbuilders-use-substitutes = false\n"
        "extra-platforms = \ntrusted-users = root @admin\nwarning: something\n"
    )
    settings = parseNixConfig(text)
    assert settings["builders"] == "@/etc/nix/machines"
    assert settings["trusted-users"] == "root @admin"
    assert settings["extra-platforms"] == ""
    assert "warning: something" not in settings


def test_machines_files_as_nix_darwin_and_determinate_write_them() -> None:
    # nix-darwin's line (seven fields and the host key on Nix 2.4 and later), Determinate's
    # (the same eight), and a hand-written one with fewer fields and a comment.
    text = (
        "ssh-ng://virby-vm aarch64-linux,x86_64-linux - 8 1 benchmark,big-parallel,kvm kvm -\n"
        "# a comment\n\n"
        "ssh://builder@mini x86_64-linux  # trailing comment\n"
    )
    virby, mini = parseMachines(text)
    assert virby.host == "virby-vm" and virby.uri == "ssh-ng://virby-vm"
    assert virby.systems == {"aarch64-linux", "x86_64-linux"}
    assert virby.supportedFeatures == {"benchmark", "big-parallel", "kvm"}
    assert virby.mandatoryFeatures == {"kvm"}
    assert mini.host == "mini" and mini.supportedFeatures == frozenset()


def test_ssh_dash_g_keeps_repeated_keywords() -> None:
    options = parseSshOptions(
        "hostname 127.0.0.1\nport 31222\nidentityfile /a\nidentityfile /b\n"
        "userknownhostsfile /x /y\n"
    )
    assert options["hostname"] == ["127.0.0.1"] and options["identityfile"] == ["/a", "/b"]
    assert options["userknownhostsfile"] == ["/x /y"]


@pytest.mark.parametrize(
    ("line", "config"),
    [
        ("/nix/store/p/bin/python3 /nix/store/v/bin/virbyd --config /etc/v.json", "/etc/v.json"),
        ("twistd --nodaemon --pidfile= virby --config=/a.json", "/a.json"),
        ("/usr/sbin/sshd -D", None),
        ("virbyd --config", None),
    ],
)
def test_the_config_of_a_command_line(line: str, config: str | None) -> None:
    assert configOfCommandLine(line) == config
