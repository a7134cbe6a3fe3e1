"""
Stage 0: when Nix has no builder for the image's system, C{virby prepare} starts nixpkgs'
linux-builder as a temporary builder, has Nix realise the image through it once, then stops
it and removes C{<wd>/stage0} whatever happened.  Nix, the runner and the port are played
here; tests/e2e/test_stage0_e2e.py runs the real nix-store with an sshd for the VM.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pytest

from virby import cli
from virby.cli import prepare, realise
from virby.config import MIB, Config

DRV = "/nix/store/xyz-virby-vm-image.drv"
RUNNER = "/nix/store/abc-nixos-vm.drv"
OLD_NIX = (
    "a 'aarch64-linux' with features {kvm} is required to build '/nix/store/x.drv', but I "
    "am a 'aarch64-darwin' with features {benchmark, big-parallel, nixos-test}"
)
NEW_NIX = [
    "error: Cannot build '/nix/store/x.drv'.",
    "       Reason: required system or feature not available",
    "       Required system: 'aarch64-linux' with features {kvm}",
    "       Current system: 'aarch64-darwin' with features {benchmark, big-parallel}",
]
SPEC = realise.Stage0(runner=RUNNER, system="aarch64-linux", hostKey="SOSTKEY", within=3)


class Nix:
    """
    nix-store, played: the image's realisation fails for want of a builder unless
    C{--builders} is given (then it builds, or fails with C{buildError}); the runner's
    realisation gives an output with C{bin/run-nixos-vm} (or fails with C{runnerError}).
    """

    def __init__(
        self,
        store: Path,
        buildError: str | None = None,
        runnerError: str | None = None,
        noBuilder: Sequence[str] = (f"error: {OLD_NIX}",),
    ) -> None:
        self.store = store
        self.buildError = buildError
        self.runnerError = runnerError
        self.noBuilder = list(noBuilder)
        self.calls: list[list[str]] = []

    def __call__(self, command: Sequence[str], progress: IO[str]) -> tuple[int, list[str]]:
        self.calls.append(list(command))
        root = command[command.index("--add-root") + 1]
        if command[2] == RUNNER:
            if self.runnerError is not None:
                return 1, [f"error: {self.runnerError}"]
            runner = self.store / "abc-nixos-vm"
            (runner / "bin").mkdir(parents=True, exist_ok=True)
            (runner / "bin" / "run-nixos-vm").write_text("#!/bin/sh\n")
            os.symlink(runner, root)
            return 0, []
        if "--builders" not in command:
            progress.write("\n".join(self.noBuilder) + "\n")
            return 1, self.noBuilder
        progress.write("building '/nix/store/xyz-virby-vm-image.drv' on ssh-ng://...\n")
        if self.buildError is not None:
            return 100, [f"error: {self.buildError}"]
        output = self.store / "xyz-virby-vm-image"
        output.mkdir(parents=True, exist_ok=True)
        (output / "nixos.img").write_bytes(b"an image" + bytes(4096))
        os.symlink(output, root)
        return 0, []


class Runner:
    """The started VM, played: it answers after C{answersAfter} probes, or exits."""

    def __init__(self, answersAfter: int | None = 1, exitsWith: int | None = None) -> None:
        self.answersAfter = answersAfter
        self.exitsWith = exitsWith
        self.started: list[tuple[list[str], str, dict[str, str], str]] = []
        self.stopped: list[float] = []
        self.probes = 0
        self.keys: dict[str, str] = {}

    def launch(
        self, command: Sequence[str], cwd: str, env: dict[str, str], log: str
    ) -> realise.Child:
        self.started.append((list(command), cwd, dict(env), log))
        self.keys = {
            name: (Path(env["KEYS"]) / name).read_text() for name in os.listdir(env["KEYS"])
        }
        return self

    def probe(self, port: int) -> bool:
        if not self.started:
            return False  # nothing on the port before the VM is started
        self.probes += 1
        return self.answersAfter is not None and self.probes > self.answersAfter

    def poll(self) -> int | None:
        return self.exitsWith

    def stop(self, grace: float) -> None:
        self.stopped.append(grace)


@pytest.fixture
def wanted(tmp_path: Path) -> realise.Wanted:
    (tmp_path / "wd").mkdir()
    return realise.Wanted(DRV, str(tmp_path / "store" / "xyz-virby-vm-image" / "nixos.img"))


def realiseWith(
    tmp_path: Path, wanted: realise.Wanted, nix: Nix, runner: Runner, spec=SPEC
) -> tuple[str | None, str, list[float]]:
    progress = io.StringIO()
    slept: list[float] = []
    cause = realise.realise(
        str(tmp_path / "wd"), wanted, nixStore="/bin/nix-store", run=nix, progress=progress,
        stage0=spec, launch=runner.launch, probe=runner.probe, sleep=slept.append,
    )  # fmt: skip
    return cause, progress.getvalue(), slept


@pytest.mark.parametrize("tail", [[f"error: {OLD_NIX}"], NEW_NIX])
def test_both_wordings_of_no_builder_are_known(tail: list[str]) -> None:
    assert realise.noBuilder(["building...", *tail])


@pytest.mark.parametrize(
    "line",
    ["error: builder for '/nix/store/x.drv' failed with exit code 1",
     "error: unable to start any build; either increase '--max-jobs' or enable remote builds",
     "error: path '/nix/store/x.drv' is not valid"],
)  # fmt: skip
def test_other_failures_are_not_taken_for_no_builder(line: str) -> None:
    assert not realise.noBuilder([line])


@pytest.mark.parametrize("noBuilder", [[f"error: {OLD_NIX}"], NEW_NIX])
def test_stage0_is_started_used_once_stopped_and_removed(tmp_path, wanted, noBuilder) -> None:
    nix = Nix(tmp_path / "store", noBuilder=noBuilder)
    runner = Runner(answersAfter=2)
    cause, said, slept = realiseWith(tmp_path, wanted, nix, runner)
    assert cause is None
    wd = tmp_path / "wd"
    stage0 = wd / "stage0"
    assert os.readlink(wd / "image") == wanted.output
    # The runner realised with a root of stage 0's own, then started in stage 0's directory.
    assert nix.calls[1] == ["/bin/nix-store", "--realise", RUNNER, "--add-root",
                            str(stage0 / "runner"), "--indirect"]  # fmt: skip
    [(command, cwd, env, log)] = runner.started
    assert command == [str(tmp_path / "store" / "abc-nixos-vm" / "bin" / "run-nixos-vm")]
    assert cwd == str(stage0) and log == str(stage0 / "console.log")
    assert env["KEYS"] == str(stage0 / "keys") and env["TMPDIR"] == str(stage0 / "tmp")
    # The guest reads only the public half, under the name nixpkgs' VM looks for.
    assert list(runner.keys) == ["builder_ed25519.pub"]
    assert runner.keys["builder_ed25519.pub"].startswith("ssh-ed25519 ")
    # The one realisation again, through stage 0 alone.
    retry = nix.calls[2]
    assert retry[:6] == nix.calls[0] == ["/bin/nix-store", "--realise", DRV, "--add-root",
                                         str(wd / "image"), "--indirect"]  # fmt: skip
    builders = retry[retry.index("--builders") + 1]
    assert builders == (
        f"ssh-ng://builder@virby-stage0 aarch64-linux {stage0 / 'builder_ed25519'} 1 1 "
        "kvm,big-parallel,benchmark - SOSTKEY"
    )
    assert retry[-3:] == ["--option", "builders-use-substitutes", "true"]
    assert len(nix.calls) == 3
    # Bounded wait, one pause per refused probe; then stopped and removed.
    assert slept == [1.0, 1.0]
    assert runner.stopped == [10.0]
    assert not stage0.exists()
    lines = [line for line in said.splitlines() if line.startswith("virby prepare: stage 0:")]
    assert lines == [
        "virby prepare: stage 0: no Linux builder for aarch64-linux: starting nixpkgs' "
        "linux-builder as a temporary builder",
        "virby prepare: stage 0: waiting up to 3 s for its SSH on port 31022",
        "virby prepare: stage 0: answering; building the image through it",
        "virby prepare: stage 0: stopped and removed",
    ]


def test_the_private_key_is_the_callers_alone(tmp_path, wanted) -> None:
    seen: list[int] = []

    class Looking(Runner):
        def launch(self, command, cwd, env, log):
            seen.append(stat.S_IMODE(os.stat(Path(cwd) / "builder_ed25519").st_mode))
            seen.append(stat.S_IMODE(os.stat(cwd).st_mode))
            return super().launch(command, cwd, env, log)

    cause, _, _ = realiseWith(tmp_path, wanted, Nix(tmp_path / "store"), Looking())
    assert cause is None
    assert seen == [0o600, 0o700]


def test_stage0_that_never_answers_is_given_up_within_the_bound(tmp_path, wanted) -> None:
    nix = Nix(tmp_path / "store")
    runner = Runner(answersAfter=None)
    cause, said, slept = realiseWith(tmp_path, wanted, nix, runner)
    assert cause == (
        "no Linux builder for aarch64-linux, and the temporary builder did not answer on "
        "port 31022 within 3 s"
    )
    assert slept == [1.0, 1.0, 1.0]
    assert len(nix.calls) == 2, "the image is not tried again without a builder"
    assert runner.stopped == [10.0]
    assert not (tmp_path / "wd" / "stage0").exists()
    assert said.endswith("virby prepare: stage 0: stopped and removed\n")


def test_stage0_that_exits_before_answering(tmp_path, wanted) -> None:
    runner = Runner(answersAfter=None, exitsWith=1)
    cause, _, slept = realiseWith(tmp_path, wanted, Nix(tmp_path / "store"), runner)
    assert (
        cause
        == "no Linux builder for aarch64-linux, and the temporary builder exited with status 1"
    )
    assert slept == [] and runner.stopped == [10.0]
    assert not (tmp_path / "wd" / "stage0").exists()


def test_a_build_that_fails_through_stage0_gives_nix_cause(tmp_path, wanted) -> None:
    nix = Nix(tmp_path / "store", buildError="builder for '/nix/store/xyz.drv' failed")
    runner = Runner()
    cause, _, _ = realiseWith(tmp_path, wanted, nix, runner)
    assert cause == "through the temporary builder: builder for '/nix/store/xyz.drv' failed"
    assert runner.stopped == [10.0]
    assert not (tmp_path / "wd" / "stage0").exists()


def test_a_runner_that_cannot_be_realised_starts_nothing(tmp_path, wanted) -> None:
    nix = Nix(tmp_path / "store", runnerError="cannot substitute /nix/store/abc-nixos-vm")
    runner = Runner()
    cause, said, _ = realiseWith(tmp_path, wanted, nix, runner)
    assert cause == (
        "no Linux builder for aarch64-linux, and the temporary builder's runner: cannot "
        "substitute /nix/store/abc-nixos-vm"
    )
    assert runner.started == [] and runner.stopped == []
    assert not (tmp_path / "wd" / "stage0").exists()
    assert said.endswith("virby prepare: stage 0: removed\n")


def test_an_ssh_server_already_on_the_port_starts_nothing(tmp_path, wanted) -> None:
    nix = Nix(tmp_path / "store")
    runner = Runner()
    progress = io.StringIO()
    cause = realise.realise(
        str(tmp_path / "wd"), wanted, nixStore="/bin/nix-store", run=nix, progress=progress,
        stage0=SPEC, launch=runner.launch, probe=lambda port: True, sleep=lambda s: None,
    )  # fmt: skip
    assert cause is not None and "an SSH server answers on port 31022" in cause
    assert runner.started == [] and len(nix.calls) == 1
    assert not (tmp_path / "wd" / "stage0").exists()


def test_other_failures_and_no_stage0_leave_stage0_alone(tmp_path, wanted) -> None:
    other = Nix(tmp_path / "store", noBuilder=["error: builder for '/nix/store/x.drv' failed"])
    runner = Runner()
    cause, said, _ = realiseWith(tmp_path, wanted, other, runner)
    assert cause == "builder for '/nix/store/x.drv' failed"
    assert runner.started == [] and len(other.calls) == 1 and "stage 0" not in said
    plain = Nix(tmp_path / "store")
    assert realise.realise(
        str(tmp_path / "wd"), wanted, nixStore="/bin/nix-store", run=plain,
        progress=io.StringIO(), launch=runner.launch, probe=runner.probe,
    ) == OLD_NIX  # fmt: skip
    assert len(plain.calls) == 1 and runner.started == []


def test_prepare_passes_the_stage0_flags_on(tmp_path, short_tmp, monkeypatch) -> None:
    given: list[realise.Stage0 | None] = []

    def fake(workingDirectory, wanted, *, run, stage0):
        given.append(stage0)
        return "played"

    monkeypatch.setattr(realise, "realise", fake)
    config = tmp_path / "config.json"
    config.write_text(
        '{"working-directory": "%s", "image": "/nix/store/none/nixos.img", "disk-size": "1GiB"}'
        % (short_tmp / "wd")
    )
    status = cli.main(
        ["prepare", "--config", str(config), "--image-derivation", DRV,
         "--stage0-runner", RUNNER, "--stage0-system", "aarch64-linux",
         "--stage0-host-key", "SOSTKEY", "--stage0-port", "2222", "--stage0-user", "me",
         "--stage0-wait", "9"]
    )  # fmt: skip
    assert status == 0
    assert given == [
        realise.Stage0(runner=RUNNER, system="aarch64-linux", hostKey="SOSTKEY", port=2222,
                       user="me", within=9.0)
    ]  # fmt: skip


def test_stage0_runner_without_its_system_and_key_is_a_usage_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--stage0-runner", RUNNER])
    err = capsys.readouterr().err
    assert "--stage0-runner needs --stage0-system and --stage0-host-key" in err
    assert err.count("\n") == 1


def test_prepare_without_stage0_flags_passes_none(tmp_path, monkeypatch) -> None:
    given: list[realise.Stage0 | None] = []
    monkeypatch.setattr(
        realise, "realise", lambda wd, wanted, *, run, stage0: given.append(stage0) or "played"
    )
    config = Config(
        working_directory=str(tmp_path / "wd"), image="/nix/store/none/nixos.img",
        disk_size=8 * MIB,
    )  # fmt: skip
    prepare.prepare(config, derivation=DRV, explain=lambda line: None)
    assert given == [None]
