"""
services.virby inside a real nix-darwin system, for each nix-darwin branch the fixtures name
(see L{tests.darwin_harness}): nix-darwin's own modules and option types, nixpkgs' real lib,
Determinate's real module; only the package set is a stand-in (there is no full nixpkgs here).

Every case is evaluated in one C{nix-instantiate} per branch; the tests then read what
nix-darwin made of it: the system's derivation, the launchd plist and C{/etc/nix/machines} as
nix-darwin renders them, the ssh configuration, the activation script.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import resource
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest
from twisted.internet.selectreactor import SelectReactor

from tests.darwin_harness import HARNESS, ROOT, Pair, arguments, determinate, evaluate
from virby.cli import INSTALLED_CONFIG
from virby.cli.client import DAEMON_LOG
from virby.config import fromMapping
from virby.daemon.capacity import SELECT_CEILING, adjustDescriptorLimit
from virby.layout import CLIENT_KEY, SHARED_CLIENT_KEY
from virby.sshconfig import sshConfigBlock

ENABLED = {"enable": True}

CASES: dict[str, dict] = {
    "default": {"virby": ENABLED},
    "on-demand": {"virby": {**ENABLED, "onDemand": {"enable": True, "ttl": 30}}},
    "rosetta": {"virby": {**ENABLED, "rosetta": True}},
    "memory-6GiB": {"virby": {**ENABLED, "memory": "6GiB"}},
    "memory-8GiB": {"virby": {**ENABLED, "memory": 8192}},
    "extra-config": {"virby": {**ENABLED, "extraConfig": {"boot": {"kernelParams": ["quiet"]}}}},
    "shared-directories": {"virby": {**ENABLED, "sharedDirectories": {"src": "/Users/alice/src"}}},
    "debug": {"virby": {**ENABLED, "debug": True}},
    "allow-user-ssh": {"virby": {**ENABLED, "allowUserSsh": True}},
    "ephemeral": {"virby": {**ENABLED, "ephemeral": True}},
    "linux-builder": {"virby": ENABLED, "config": {"nix": {"linux-builder": {"enable": True}}}},
    "nix-disabled-without-determinate": {"virby": ENABLED, "config": {"nix": {"enable": False}}},
    "disabled": {"virby": {}},
    "nested": {"virby": {**ENABLED, "nestedVirtualization": True}},
    "no-stage0": {"virby": {**ENABLED, "stage0": False}},
    "port": {"virby": {**ENABLED, "port": 31223}},
    # The default package at another version: another store path, as an upgrade makes.
    "other-package": {"virby": ENABLED, "packageVersion": "0.1.0-other"},
    # Refused with an assertion:
    "x86_64-darwin": {"virby": ENABLED, "system": "x86_64-darwin"},
    "rosetta-on-x86_64-darwin": {"virby": {**ENABLED, "rosetta": True}, "system": "x86_64-darwin"},
    "determinate-asked-without-module": {
        "virby": {**ENABLED, "supportDeterminateNix": True},
        "config": {"nix": {"enable": False}},
    },
}
DETERMINATE_CASES: dict[str, dict] = {
    "determinate": {"virby": ENABLED, "determinate": True},
    "determinate-on-demand": {
        "virby": {**ENABLED, "onDemand": {"enable": True}},
        "determinate": True,
    },
    "determinate-nested": {
        "virby": {**ENABLED, "nestedVirtualization": True},
        "determinate": True,
    },
}
REFUSED = {"x86_64-darwin", "rosetta-on-x86_64-darwin", "determinate-asked-without-module"}
ALL = {**CASES, **DETERMINATE_CASES}
BUILDS = sorted(name for name in ALL if name not in REFUSED)
RUNS_VIRBY = sorted(name for name in BUILDS if name != "disabled")

pytestmark = [
    pytest.mark.repository,
    pytest.mark.skipif(
        shutil.which("nix-instantiate") is None, reason="nix-instantiate is not installed (nix-bin)"
    ),
]


@pytest.fixture(scope="module")
def results(pair: Pair) -> dict:
    cases = dict(CASES)
    if determinate() is not None:
        cases.update(DETERMINATE_CASES)
    return evaluate(pair, cases)


def result(results: dict, case: str) -> dict:
    if case not in results:
        pytest.skip("VIRBY_DETERMINATE is not set: it names Determinate's repository")
    return results[case]


def virby(case: str) -> dict:
    return ALL[case].get("virby", {})


@pytest.mark.parametrize("case", BUILDS)
def test_the_system_instantiates(results: dict, case: str) -> None:
    got = result(results, case)
    assert got["assertions"] == []
    assert got["drvPath"].startswith("/nix/store/") and got["drvPath"].endswith(".drv")


INTEL = (
    "services.virby supports only aarch64-darwin hosts (Apple silicon); this one is x86_64-darwin."
)


@pytest.mark.parametrize("case", ["x86_64-darwin", "rosetta-on-x86_64-darwin"])
def test_an_intel_mac_is_refused_with_one_line(results: dict, case: str) -> None:
    """nixpkgs 26.11 dropped x86_64-darwin, and Virby with it; Rosetta adds nothing to say."""
    assert result(results, case)["assertions"] == [INTEL]


def test_nix_darwin_stops_the_switch_of_an_intel_mac_with_that_line(pair: Pair) -> None:
    """Through nix-darwin's own check of the assertions, as darwin-rebuild meets it."""
    command = [
        "nix-instantiate", "--eval", "--readonly-mode", str(HARNESS),
        "-A", "systems.intel.config.system.build.toplevel.drvPath",
        *arguments(pair, {"intel": CASES["x86_64-darwin"]}),
    ]  # fmt: skip
    ran = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ran.returncode != 0
    lines = [line.strip() for line in ran.stderr.splitlines()]
    assert "Failed assertions:" in lines, ran.stderr
    listed = lines[lines.index("Failed assertions:") + 1 :]
    assert [line for line in listed if line.startswith("- ")] == [f"- {INTEL}"], ran.stderr


def test_the_flake_has_no_x86_64_darwin_output(pair: Pair) -> None:
    """
    Every per-system output of the flake evaluates, as `nix flake check` does, on a nixpkgs
    that throws at any x86_64-darwin package, as nixpkgs 26.11 does.
    """
    outputs = evaluate(pair, {}, attribute="flakeOutputs")
    systems = ["aarch64-darwin", "aarch64-linux", "x86_64-linux"]
    assert outputs["systems"] == dict.fromkeys(
        ["checks", "devShells", "formatter", "packages"], systems
    )
    assert sorted(outputs["packages"]) == sorted(outputs["checks"]) == systems
    assert set(outputs["packages"]["aarch64-darwin"]) == {"default"}
    assert set(outputs["packages"]["aarch64-linux"]) == {"default", "vm-image"}


def test_asking_for_determinate_without_its_module_is_refused(results: dict) -> None:
    (message,) = result(results, "determinate-asked-without-module")["assertions"]
    assert "determinate.darwinModules.default" in message
    assert "nothing would register the builder" in message


def plist(results: dict, case: str) -> dict:
    text = result(results, case)["plist"]
    assert text is not None, "no org.nixos.virbyd.plist in /Library/LaunchDaemons"
    return plistlib.loads(text.encode())


#: The daemon's program and config as launchd runs them: links in /etc, the same for every
#: package, config and image, so that a new one leaves the plist as it was.
PROGRAM = "/etc/virby/virbyd"
COMMAND = re.compile(r"/bin/wait4path /nix/store && exec (\S+) --config (\S+)")


@pytest.mark.parametrize("case", RUNS_VIRBY)
def test_the_launchd_plist_as_nix_darwin_renders_it(results: dict, case: str) -> None:
    job = plist(results, case)
    got = result(results, case)
    on_demand = virby(case).get("onDemand", {}).get("enable", False)
    shell, dash_c, command = job["ProgramArguments"]
    assert (shell, dash_c) == ("/bin/sh", "-c")
    # At boot launchd may start the job before the Nix store volume is mounted.
    match = COMMAND.fullmatch(command)
    assert match, command
    assert match.groups() == (PROGRAM, INSTALLED_CONFIG)
    # No store path at all: not the package's, not the config's, not the image's.
    assert "/nix/store/" not in got["plist"].replace("/bin/wait4path /nix/store &", "")
    assert got["package"] not in got["plist"] and got["configLink"] not in got["plist"]
    assert job["Label"] == "org.nixos.virbyd"
    assert job["UserName"] == "_virby" and job["GroupName"] == "virby"
    assert job["KeepAlive"] is job["RunAtLoad"] is not on_demand
    port = str(virby(case).get("port", 31222))
    assert job["Sockets"] == {
        "Listener": {"SockFamily": "IPv4", "SockNodeName": "127.0.0.1", "SockServiceName": port}
    }
    assert job["WorkingDirectory"] == "/var/lib/virby"
    assert job["StandardOutPath"] == job["StandardErrorPath"] == "/var/log/virbyd.log"


def test_the_descriptor_limit_is_what_the_module_says_the_daemon_makes_of_it(
    results: dict,
) -> None:
    """
    launchd hands the daemon NumberOfFiles; under macOS's default reactor, select(2), the
    daemon holds it at 1024 and serves what capacity.py computes, which the module's comment
    states.
    """
    job = plist(results, "default")
    soft = job["SoftResourceLimits"]["NumberOfFiles"]
    limit = adjustDescriptorLimit(
        SelectReactor.__new__(SelectReactor),
        getrlimit=lambda which: (soft, resource.RLIM_INFINITY),
        setrlimit=lambda which, limits: None,
    )
    assert soft > 256, "above launchd's default"
    assert limit.soft == SELECT_CEILING
    module = (ROOT / "nix" / "module.nix").read_text()
    comment = module[: module.index("SoftResourceLimits.NumberOfFiles")].rsplit("\n\n", 1)[-1]
    stated = re.search(r"holds its soft limit at\s+#?\s*(\d+)", comment)
    serves = re.search(r"serves up to (\d+) connections", comment)
    assert stated and int(stated.group(1)) == limit.soft
    assert serves and int(serves.group(1)) == limit.connections
    # The hard limit stays launchd's (unlimited): lowering it would gain nothing.
    assert "HardResourceLimits" not in job


def test_the_enable_option_says_builders_use_substitutes_is_for_every_builder(
    results: dict,
) -> None:
    text = " ".join(result(results, "default")["enableDescription"].split())
    assert "`builders-use-substitutes`" in text
    assert "every remote builder of this Mac" in text


def test_the_flake_formats_with_nixfmt_not_its_deprecated_alias(pair: Pair) -> None:
    formatters = evaluate(pair, {}, attribute="formatters")
    assert set(formatters.values()) == {"nixfmt"}


@pytest.mark.parametrize("case", ["default", "other-package"])
def test_the_daemon_program_is_one_the_package_installs(results: dict, case: str) -> None:
    """
    /etc/virby/virbyd is a link to the package's virbyd, and nixpkgs' buildPythonApplication
    installs exactly the [project.scripts] entries.
    """
    got = result(results, case)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    program = Path(got["programLink"])
    assert program.parent == Path(got["package"]) / "bin"
    assert program.name in scripts, (
        f"launchd would run {program.name}, but the package installs only {sorted(scripts)}"
    )
    match = COMMAND.fullmatch(plist(results, case)["ProgramArguments"][2])
    assert match and Path(match.group(1)).name == program.name


def test_a_new_package_is_a_new_link_and_the_same_plist(results: dict) -> None:
    default, other = result(results, "default"), result(results, "other-package")
    assert other["package"] != default["package"], "the case must make another package"
    assert other["programLink"] != default["programLink"]
    assert other["plist"] == default["plist"]


#: Cases that differ from "default" in the image, the daemon's config or the package, and
#: not in what the plist itself says (its port, whether it is on demand).
SAME_PLIST = ["memory-8GiB", "extra-config", "rosetta", "shared-directories", "debug",
              "allow-user-ssh", "ephemeral", "nested", "no-stage0", "linux-builder",
              "other-package", "determinate", "determinate-nested"]  # fmt: skip


@pytest.mark.parametrize("case", SAME_PLIST)
def test_the_plist_is_the_same_whatever_the_image_config_or_package(
    results: dict, case: str
) -> None:
    """
    nix-darwin's launchd step reloads a job (and so stops its daemon, cutting its builds)
    exactly when its plist's bytes change; a new image reaches the daemon when it renews.
    """
    default, got = result(results, "default"), result(results, case)
    assert got["plist"] == default["plist"]
    assert got["drvPath"] != default["drvPath"], "another system"


@pytest.mark.parametrize("case", ["on-demand", "port", "determinate-on-demand"])
def test_the_plists_own_settings_change_it(results: dict, case: str) -> None:
    assert result(results, case)["plist"] != result(results, "default")["plist"]


@pytest.mark.parametrize("case", BUILDS)
def test_the_activation_restarts_no_daemon_itself(results: dict, case: str) -> None:
    """
    prepare asks the daemon to renew; a kickstart would cut the builds it serves.  (nix-darwin's
    own nix-daemon step kickstarts the nix-daemon, which is not Virby's.)
    """
    activate = result(results, case)["activate"]
    assert "launchctl load -w" in activate, "the script is nix-darwin's whole activation"
    kickstarts = [line for line in activate.splitlines() if "kickstart" in line]
    assert [line for line in kickstarts if "virby" in line] == []
    assert "virby_before" not in activate


def machine_lines(results: dict, case: str) -> dict[str, list[str]]:
    text = result(results, case)["machines"]
    assert text is not None, "no /etc/nix/machines"
    return {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}


@pytest.mark.parametrize(
    ("case", "systems"),
    [("default", "aarch64-linux"), ("rosetta", "aarch64-linux,x86_64-linux"),
     ("determinate", "aarch64-linux"), ("linux-builder", "aarch64-linux")],
)  # fmt: skip
def test_the_builder_in_etc_nix_machines(results: dict, case: str, systems: str) -> None:
    lines = machine_lines(results, case)
    fields = lines["ssh-ng://virby-vm"]
    assert fields[1:5] == [systems, "-", "8", "1"]
    # No nesting, no /dev/kvm in the VM: kvm and nixos-test builds must go elsewhere.
    assert fields[5].split(",") == ["benchmark", "big-parallel"]
    if case == "linux-builder":
        assert "ssh-ng://builder@linux-builder" in lines, "nix.linux-builder's machine is kept"


@pytest.mark.parametrize("case", ["nested", "determinate-nested"])
def test_kvm_is_advertised_only_with_nested_virtualization(results: dict, case: str) -> None:
    """The VM has /dev/kvm only when vfkit runs it with --nested."""
    if case not in results:
        pytest.skip("Determinate's module is not there (VIRBY_DETERMINATE)")
    fields = machine_lines(results, case)["ssh-ng://virby-vm"]
    assert fields[5].split(",") == ["benchmark", "big-parallel", "kvm", "nixos-test"]
    assert result(results, case)["settings"]["nested-virtualization"] is True


@pytest.mark.parametrize("case", ["default", "linux-builder"])
def test_builders_use_substitutes(results: dict, case: str) -> None:
    got = result(results, case)
    assert got["nixSettings"] == {"builders-use-substitutes": True}
    assert got["distributedBuilds"] is True


def test_determinate_gets_the_builder_and_says_nothing(results: dict) -> None:
    got = result(results, "determinate")
    # Determinate's module warns when it has build machines but distributedBuilds is off.
    assert got["warnings"] == []
    assert got["nixSettings"] is None, "Determinate's module turns nix.enable off"
    assert "builders-use-substitutes = true" in got["determinateConf"].splitlines()


def test_nix_disabled_without_determinate_warns(results: dict) -> None:
    got = result(results, "nix-disabled-without-determinate")
    assert got["machines"] is None
    (warning,) = got["warnings"]
    assert "nix.enable is off" in warning and "determinate.darwinModules.default" in warning
    assert "Nix will not use it" in warning


@pytest.mark.parametrize("case", ["default", "allow-user-ssh"])
def test_the_ssh_config_as_installed_in_etc(results: dict, case: str) -> None:
    got = result(results, case)
    config = fromMapping(got["settings"])
    key = SHARED_CLIENT_KEY if case == "allow-user-ssh" else CLIENT_KEY
    expected = sshConfigBlock(config, identityFile=config.path(key))
    assert got["sshConfig"] == expected


@pytest.mark.parametrize("case", RUNS_VIRBY)
def test_the_daemon_config_loads_in_the_python_loader(results: dict, case: str) -> None:
    got = result(results, case)
    config = fromMapping(got["settings"])
    assert config.memory == (8192 if case == "memory-8GiB" else 6144)
    assert config.image == got["image"]["path"] + "/nixos.img"
    assert config.on_demand is virby(case).get("onDemand", {}).get("enable", False)
    assert config.allow_user_ssh is virby(case).get("allowUserSsh", False)
    assert config.ephemeral is virby(case).get("ephemeral", False)


def test_ephemeral_reaches_the_daemon_and_leaves_the_image_alone(results: dict) -> None:
    default, ephemeral = result(results, "default"), result(results, "ephemeral")
    assert ephemeral["settings"]["ephemeral"] is True
    assert default["settings"]["ephemeral"] is False
    # The daemon makes the fresh disk from the same image: only its config changes.
    assert ephemeral["image"]["path"] == default["image"]["path"]
    assert ephemeral["configLink"] != default["configLink"], "a new config reaches the daemon"


@pytest.mark.parametrize("case", ["default", "debug", "rosetta", "shared-directories"])
def test_the_image_gets_what_the_module_asks(results: dict, case: str) -> None:
    image = result(results, case)["image"]
    assert image["imageModuleIncluded"]
    assert image["settings"] == {
        "rosetta": virby(case).get("rosetta", False),
        "sharedDirectories": virby(case).get("sharedDirectories", {}),
    }


def test_debug_leaves_the_image_alone(results: dict) -> None:
    """
    The serial console is vfkit's logFilePath console, output only: a login on it could not
    be used, so debug gives the VM none and the image stays the same.
    """
    assert result(results, "debug")["image"]["path"] == result(results, "default")["image"]["path"]
    assert result(results, "debug")["settings"]["debug"] is True
    assert "autologin" not in (ROOT / "nix" / "image.nix").read_text()


def test_extra_config_makes_a_new_image(results: dict) -> None:
    default = result(results, "default")
    extra = result(results, "extra-config")
    assert "quiet" in extra["image"]["rest"]
    assert extra["image"]["path"] != default["image"]["path"]
    assert extra["settings"]["image"] != default["settings"]["image"], (
        "a new image must reach the daemon's config"
    )
    assert extra["configLink"] != default["configLink"]


@pytest.mark.parametrize("case", ["default", "ephemeral"])
def test_the_config_is_where_virby_looks_without_config(results: dict, case: str) -> None:
    got = result(results, case)
    match = COMMAND.fullmatch(plist(results, case)["ProgramArguments"][2])
    assert match and match.group(2) == INSTALLED_CONFIG == "/etc/virby/config.json"
    assert got["configLink"].endswith("-virby.json"), "/etc/virby/config.json is the daemon's"


def test_newsyslog_rotates_the_daemons_log_without_a_signal(results: dict) -> None:
    """
    newsyslog.conf(5): logfile owner:group mode count size when flags pid_file.  The file is
    launchd's StandardOutPath, the new file is _virby's, and no process is signalled (the
    daemon notices the rotation itself: virby/daemon/logfile.py), so no pid file is named.
    """
    got = result(results, "default")
    (line,) = [ln for ln in got["newsyslog"].splitlines() if ln and not ln.startswith("#")]
    path, owner, mode, count, size, when, flags = line.split()
    assert path == plist(results, "default")["StandardOutPath"] == DAEMON_LOG
    assert (owner, mode, when) == ("_virby:virby", "644", "*")
    assert set(flags) == {"B", "N"}, "no turnover line, no signal, no compression"
    assert int(count) >= 1 and int(size) > 0


#: nixpkgs' published host key of the linux-builder, base64 (docs/one-switch.md).
LINUX_BUILDER_HOST_KEY = (
    "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUpCV2N4Yi9CbGFxdDFhdU90RStGOFFVV3JVb3Rp"
    "QzVxQkorVXVFV2RWQ2Igcm9vdEBuaXhvcwo="
)


def test_stage0_hands_prepare_the_linux_builders_runner_after_activation(results: dict) -> None:
    got = result(results, "default")
    runner = got["stage0Runner"]
    assert runner.startswith("/nix/store/") and runner.endswith("-nixos-vm-1.0.drv")
    flags = (
        f"--stage0-runner {runner} --stage0-system aarch64-linux "
        f"--stage0-host-key '{LINUX_BUILDER_HOST_KEY}' --stage0-port 31022"
    )
    # Only the run that realises the image gets them, once.
    assert got["activate"].count(flags) == 1
    before, _, after = got["activate"].partition(flags)
    assert "--no-realise" in before and "--no-realise" not in after
    assert got["stage0SshConfig"] == (
        "Host virby-stage0\n  HostName 127.0.0.1\n  Port 31022\n  HostKeyAlias virby-stage0\n"
    )


def test_stage0_off_leaves_prepare_and_ssh_without_it(results: dict) -> None:
    got = result(results, "no-stage0")
    assert got["stage0Runner"] is None and got["stage0SshConfig"] is None
    assert "--stage0" not in got["activate"]
    assert "--image-derivation" in got["activate"]


def test_disabled_leaves_no_daemon_and_no_builder(results: dict) -> None:
    got = result(results, "disabled")
    assert got["newsyslog"] is None
    assert got["plist"] is None and got["machines"] is None and got["sshConfig"] is None
    assert got["stage0SshConfig"] is None and got["stage0Runner"] is None
    assert got["configLink"] is None and got["programLink"] is None
    assert got["settings"] is None


def test_the_activation_scripts_pass_shellcheck(results: dict, tmp_path: Path) -> None:
    """nix-darwin's system build runs shellcheck on `activate`: a finding fails the switch."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian's shellcheck; dev/setup installs it)")
    scripts: dict[str, str] = {}
    for case in BUILDS:
        if case in results:
            # Cases whose scripts differ only in store paths are checked once.
            text = re.sub(r"/nix/store/[a-z0-9]{32}-", "/nix/store/h-", results[case]["activate"])
            scripts.setdefault(text.replace("@out@", "/nix/store/h-system"), case)
    for text, case in scripts.items():
        (tmp_path / case).write_text(text)
    found = subprocess.run(
        ["shellcheck", "--exclude=SC2016,SC1112", *sorted(scripts.values())],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert found.returncode == 0, found.stdout


def test_the_flake_check_can_pass(pair: Pair) -> None:
    """
    Run the flake's `pure` check as its builder would: the command it runs, with nothing but
    what the derivation names, as a user who cannot open the Nix store.
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the check as an unprivileged user")
    # Not read-only: the sources the check names are copied into the store, as Nix would.
    command = evaluate(pair, {}, attribute="pureCheck", readonly=False)["buildCommand"]
    host_nix = Path(shutil.which("nix-instantiate") or "").parent
    command = re.sub(r"/nix/store/[^/ ]+-nix-[^/ ]+/bin", str(host_nix), command)
    with tempfile.TemporaryDirectory() as build:
        # A build directory the unprivileged user can write, as the builder's is.
        Path(build).chmod(0o777)
        out = Path(build) / "out"
        ran = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "bash", "-e", "-c", command],
            env={"PATH": "/usr/bin:/bin", "HOME": "/homeless-shelter", "out": str(out)},
            capture_output=True, text=True, timeout=120, cwd=build,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert set(json.loads(out.read_text())) == {"default", "custom"}


def test_the_package_runs_the_unit_tests_in_the_darwin_sandbox(results: dict) -> None:
    check = result(results, "default")["packageCheck"]
    # pytestCheckHook takes test paths in enabledTestPaths; pytestFlagsArray is for flags.
    assert check["enabledTestPaths"] == ["tests/unit"] and check["pytestFlagsArray"] is None
    # A Mac has no splice(2), /proc or epoll: the tests of those branches are left out there.
    assert check["disabledTestMarks"] == ["linux"]
    # The unit tests listen on loopback, which Nix's darwin sandbox refuses without this.
    assert check["darwinAllowLocalNetworking"] is True
    # A plugin cache built at install time is ignored in the store (all mtimes equal).
    assert check["postInstall"] is None
    readme = " ".join((ROOT / "nix" / "README.md").read_text().split())
    assert "plugin cache built in" not in readme
    assert (
        "`package.nix`: the daemon and the `virby` command, from `pyproject.toml`, with no "
        "twistd plugin cache" in readme
    )


def test_the_package_leaves_out_the_linux_tests_on_darwin_only(pair: Pair) -> None:
    """The same expression, called for a Linux system, runs every unit test."""
    expression = (
        "{ nixpkgsLib, system }: let pkgs = import ./nix/tests/stub-pkgs.nix "
        "{ lib = import ./nix/tests/nixpkgs-lib.nix nixpkgsLib; inherit system; }; in "
        "(pkgs.callPackage ./nix/package.nix { }).stubArgs.disabledTestMarks"
    )
    marks = {}
    for system in ("aarch64-darwin", "aarch64-linux", "x86_64-linux"):
        found = subprocess.run(
            ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode", "--expr",
             expression, "--arg", "nixpkgsLib", str(pair.lib), "--argstr", "system", system],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert found.returncode == 0, found.stderr
        marks[system] = json.loads(found.stdout)
    assert marks == {"aarch64-darwin": ["linux"], "aarch64-linux": [], "x86_64-linux": []}


def test_the_shared_directories_option_says_what_the_daemons_user_can_reach(pair: Pair) -> None:
    """
    vfkit runs as _virby, which a home folder shuts out and macOS's privacy protection keeps
    from Desktop, Documents and Downloads: the option's example is a folder outside /Users,
    and its description says so and how to let _virby through.
    """
    expression = (
        "{ nixpkgsLib }: let lib = import ./nix/tests/nixpkgs-lib.nix nixpkgsLib; "
        "module = import ./nix/module.nix { nixpkgs = { }; } "
        "{ inherit lib; config = { }; pkgs = { }; options = { }; }; "
        "in { inherit (module.options.services.virby.sharedDirectories) example description; }"
    )
    found = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode", "--expr",
         expression, "--arg", "nixpkgsLib", str(pair.lib)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    option = json.loads(found.stdout)
    assert all(not path.startswith("/Users/") for path in option["example"].values())
    description = " ".join(option["description"].split())
    for words in ("vfkit runs as the daemon's user `_virby`", "Desktop, Documents, Downloads",
                  'sudo chmod +a "_virby allow search" /Users/<name>', "`virby prepare`",
                  "`sudo virby doctor`"):  # fmt: skip
        assert words in description
