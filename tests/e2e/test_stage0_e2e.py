"""
Stage 0 with the real C{nix-store} of Debian's C{nix-bin}: the image's derivation names a
system this machine cannot build, and C{virby prepare --stage0-runner ...} starts a stand-in
for nixpkgs' linux-builder, lets Nix build the image through it over C{ssh-ng}, then stops
it and removes C{<wd>/stage0}.

The stand-in's runner is a derivation whose C{bin/run-stage0-vm} starts an sshd, as the
emulator starts its guest's (C{virby/emulator/guest.py}), that lets in the key prepare puts
in C{$KEYS/builder_ed25519.pub}, as nixpkgs' VM does.  Its sessions run this machine's Nix
on a store of their own (a guest that shared the host's store would wait on the host's lock
of the very output it is asked to build), which claims the image's system.  The ssh alias in
the machines line is resolved by the test's ssh config (C{NIX_SSHOPTS}), as on a Mac by the
module's C{Host} block.
"""

from __future__ import annotations

import base64
import getpass
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.nixenv import nix_environment
from testbed.processes import free_port
from tests.programs import VIRBY
from virby import keys

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("nix-store") is None, reason="nix-bin is not installed"),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"), reason="needs OpenSSH's sshd"),
]

IMAGE = """
{ system, nonce, fail }:
derivation {
  name = "virby-vm-image";
  inherit system nonce;
  builder = "/bin/sh";
  args = [ "-c" (if fail == "1" then "echo the disk build broke >&2; exit 1" else
    "echo building the image remotely >&2; /bin/mkdir $out; echo image > $out/nixos.img") ];
}
"""

#: The runner: C{bin/run-stage0-vm} writes its sshd's config in the directory it is started
#: in and runs sshd in the foreground; or, with C{answer = "0"}, never answers.
RUNNER = """
{ system, port, hostKey, remoteConf, pidFile, answer }:
derivation {
  name = "nixos-vm";
  inherit system;
  builder = "/bin/sh";
  script = ''
    #!/bin/sh
    echo $$ > ${pidFile}
    ${if answer == "0" then "exec /bin/sleep 600" else ""}
    cat > sshd_config <<EOF
    ListenAddress 127.0.0.1:${port}
    HostKey ${hostKey}
    AuthorizedKeysFile $KEYS/builder_ed25519.pub
    PidFile none
    UsePAM no
    StrictModes no
    PermitRootLogin prohibit-password
    SetEnv NIX_CONF_DIR=${remoteConf}
    EOF
    exec /usr/sbin/sshd -D -e -f "$PWD/sshd_config"
  '';
  args = [ "-c" ''
    /bin/mkdir -p $out/bin
    echo "$script" > $out/bin/run-stage0-vm
    /bin/chmod +x $out/bin/run-stage0-vm
  '' ];
}
"""


class Stage0Bed:
    """The test's Nix, the stand-in's store and configuration, and prepare with stage 0."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, **nix_environment(root)}
        self.system = self._eval("builtins.currentSystem")
        self.other = "aarch64-linux" if self.system != "aarch64-linux" else "x86_64-linux"
        self.port = free_port()
        self.pidFile = root / "runner.pid"
        # The stand-in's host key, and the base64 of its public line, as a machines line has it.
        pair = keys.generate("root@stage0")
        self.hostKey = root / "ssh_host_ed25519_key"
        self.hostKey.write_bytes(pair.private)
        self.hostKey.chmod(0o600)
        self.hostKeyBase64 = base64.b64encode((pair.public + "\n").encode()).decode()
        # The stand-in's Nix: a store of its own (built in under Nix's sandbox, the only way
        # Nix builds in a store not at its own path), claiming the image's system.
        self.remoteConf = root / "remote-conf"
        self.remoteConf.mkdir()
        (self.remoteConf / "nix.conf").write_text(
            f"store = {root / 'remote-store'}\nbuild-users-group =\nsubstituters =\n"
            f"sandbox = true\nsandbox-paths = /bin /lib /lib64 /usr\n"
            f"extra-platforms = {self.other}\n"
        )
        # What the module's Host block does on a Mac.
        sshConfig = root / "ssh_config"
        sshConfig.write_text(
            f"Host virby-stage0\n  HostName 127.0.0.1\n  Port {self.port}\n"
            "  HostKeyAlias virby-stage0\n  BatchMode yes\n"
        )
        self.env["NIX_SSHOPTS"] = f"-F {sshConfig}"
        (root / "image.nix").write_text(IMAGE)
        (root / "runner.nix").write_text(RUNNER)

    def _eval(self, expression: str) -> str:
        shown = self.run("nix-instantiate", "--eval", "--expr", expression)
        return shown.stdout.strip().strip('"')

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(command), capture_output=True, text=True, timeout=300, env=self.env
        )

    def instantiate(self, name: str, **args: str) -> str:
        argv = [a for key, value in args.items() for a in ("--argstr", key, value)]
        made = self.run("nix-instantiate", str(self.root / name), *argv)
        assert made.returncode == 0, made.stderr
        return made.stdout.strip()

    def image(self, fail: bool = False) -> tuple[str, str]:
        drv = self.instantiate(
            "image.nix", system=self.other, nonce=os.urandom(8).hex(), fail="1" if fail else "0"
        )
        output = self.run("nix-store", "--query", "--outputs", drv).stdout.strip()
        return drv, f"{output}/nixos.img"

    def runner(self, answer: bool = True) -> str:
        return self.instantiate(
            "runner.nix", system=self.system, port=str(self.port), hostKey=str(self.hostKey),
            remoteConf=str(self.remoteConf), pidFile=str(self.pidFile),
            answer="1" if answer else "0",
        )  # fmt: skip

    def prepare(self, wd: Path, drv: str, image: str, runner: str, wait: str = "60"):
        return subprocess.run(
            [*VIRBY, "prepare", "--working-directory", str(wd), "--image", image,
             "--disk-size", "1GiB", "--image-derivation", drv,
             "--stage0-runner", runner, "--stage0-system", self.other,
             "--stage0-host-key", self.hostKeyBase64, "--stage0-port", str(self.port),
             "--stage0-user", getpass.getuser(), "--stage0-wait", wait],
            capture_output=True, text=True, timeout=600, env=self.env,
        )  # fmt: skip

    def runnerGone(self) -> bool:
        pid = int(self.pidFile.read_text())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie of an exited child cannot be here: prepare waited for it and is gone.
        return False


@pytest.fixture
def bed(tmp_path: Path) -> Stage0Bed:
    return Stage0Bed(tmp_path)


def test_stage0_is_started_used_stopped_and_removed(bed: Stage0Bed, tmp_path: Path) -> None:
    drv, image = bed.image()
    wd = tmp_path / "wd"
    done = bed.prepare(wd, drv, image, bed.runner())
    assert done.returncode == 0, done.stderr
    assert "no VM image yet" not in done.stderr, done.stderr
    steps = [line for line in done.stderr.splitlines() if "virby prepare: stage 0:" in line]
    assert steps == [
        f"virby prepare: stage 0: no Linux builder for {bed.other}: starting nixpkgs' "
        "linux-builder as a temporary builder",
        f"virby prepare: stage 0: waiting up to 60 s for its SSH on port {bed.port}",
        "virby prepare: stage 0: answering; building the image through it",
        "virby prepare: stage 0: stopped and removed",
    ], done.stderr
    assert "building the image remotely" in done.stderr, "Nix's progress reached the terminal"
    # Built on the stand-in, copied back, rooted, and made into the VM's disks.
    assert os.readlink(wd / "image") == os.path.dirname(image)
    assert Path(image).read_text() == "image\n"
    assert (wd / "base.img").exists() and not (wd / "image-failure").exists()
    built = list((tmp_path / "remote-store" / "nix" / "store").glob("*-virby-vm-image"))
    assert built, "the image was built in the stand-in's store, not here"
    assert not (wd / "stage0").exists()
    assert bed.runnerGone()


def test_stage0_that_never_answers_ends_in_the_paragraph(bed: Stage0Bed, tmp_path: Path) -> None:
    drv, image = bed.image()
    wd = tmp_path / "wd"
    done = bed.prepare(wd, drv, image, bed.runner(answer=False), wait="3")
    assert done.returncode == 0, done.stderr
    cause = (
        f"no Linux builder for {bed.other}, and the temporary builder did not answer on "
        f"port {bed.port} within 3 s"
    )
    assert f"virby prepare: no VM image yet: {cause}. The switch is complete" in done.stderr
    assert (wd / "image-failure").read_text() == f"{cause}\n"
    assert not (wd / "stage0").exists() and not os.path.lexists(wd / "image")
    assert bed.runnerGone(), "the runner was stopped"


def test_stage0_whose_build_fails_ends_in_the_paragraph(bed: Stage0Bed, tmp_path: Path) -> None:
    drv, image = bed.image(fail=True)
    wd = tmp_path / "wd"
    done = bed.prepare(wd, drv, image, bed.runner())
    assert done.returncode == 0, done.stderr
    assert "the disk build broke" in done.stderr
    assert "virby prepare: no VM image yet: through the temporary builder: " in done.stderr
    assert "The switch is complete" in done.stderr
    cause = (wd / "image-failure").read_text()
    assert cause.startswith("through the temporary builder: ")
    assert not (wd / "stage0").exists()
    assert bed.runnerGone()
