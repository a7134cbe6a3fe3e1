"""
What the wheel installs is what launchd runs.  nixpkgs wraps only the console scripts a
package declares, so the daemon's own program, ``virbyd``, must be one of them, and must run
the daemon from the package's own environment.  And the twistd plugin must ship as a drop-in:
an ``__init__.py`` under twisted/plugins/ hides Twisted's own plugins, and a package list
that forgets the directory ships a daemon twistd cannot find.

Everything here runs from a wheel installed into a fresh environment, with this source tree
nowhere on ``sys.path`` and no ``twistd`` on ``PATH``.

The package's check phase (the unit tests on the package's source alone, as a Mac's build
runs them) is played by ``dev/check-phase``, which ``dev/test`` runs first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from testbed.builder import Builder

REPO = Path(__file__).resolve().parents[2]
#: No venv, no twistd: what launchd's environment has.
BARE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        check=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("virby-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    """
    A new environment with the wheel installed.  Its dependencies come from this one's
    site-packages through a C{.pth} line: a directory added so is not a site directory, so
    the editable install's own C{.pth} (this source tree) is not read there.
    """
    root = tmp_path_factory.mktemp("installed") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         "--disable-pip-version-check", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    return root


def bare_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": BARE_PATH, **extra}


def test_the_wheel_ships_the_plugin_as_a_drop_in_and_declares_virbyd(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "twisted/plugins/virby_plugin.py" in names
    assert "twisted/plugins/virby_launchd.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "virby/emulator/__main__.py" in names
    # The VM's sshd settings, which the emulated guest reads at run time.
    assert "virby/guest-sshd.json" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = archive.read(entry_points).decode()
    assert "virbyd = virby.virbyd:main" in scripts
    assert "virby = virby.cli:main" in scripts


def test_the_installed_environment_does_not_see_this_tree(installed: Path) -> None:
    program = "import sys, virby; print(virby.__file__); print('\\n'.join(sys.path))"
    result = subprocess.run(
        [str(installed / "bin" / "python"), "-c", program],
        capture_output=True, text=True, check=True, cwd="/", env=bare_environment(),
    )  # fmt: skip
    first, *path = result.stdout.splitlines()
    assert first.startswith(str(installed)), first
    assert str(REPO) not in [os.path.realpath(p) for p in path if p]
    virbyd = installed / "bin" / "virbyd"
    assert virbyd.read_text().splitlines()[0] == f"#!{installed / 'bin' / 'python'}"


def test_twistd_lists_virby_from_an_installed_wheel(installed: Path, tmp_path: Path) -> None:
    program = (
        "import sys\nsys.argv = ['twistd', '--help']\nfrom twisted.scripts.twistd import run\nrun()"
    )
    result = subprocess.run(
        [str(installed / "bin" / "python"), "-c", program],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=bare_environment(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "virby" in result.stdout
    assert "On-demand Linux builder VM" in result.stdout


def etcLinks(root: Path, program: Path) -> Path:
    """
    C{program} behind links shaped as nix-darwin's C{/etc} entries are: C{etc/virby/virbyd}
    to C{etc/static/virby/virbyd}, C{etc/static} to the system's etc tree, whose
    C{virby/virbyd} is a link to the program (nix-darwin's modules/system/etc.nix).
    """
    tree = root / "system-etc"
    (tree / "virby").mkdir(parents=True)
    (tree / "virby" / "virbyd").symlink_to(program)
    (root / "etc" / "virby").mkdir(parents=True)
    (root / "etc" / "static").symlink_to(tree)
    link = root / "etc" / "virby" / "virbyd"
    link.symlink_to(root / "etc" / "static" / "virby" / "virbyd")
    return link


def test_virbyd_from_an_installed_wheel_runs_the_daemon(installed: Path, tmp_path: Path) -> None:
    """
    What the nix-darwin module runs: /etc/virby/virbyd --config FILE, where
    /etc/virby/virbyd leads to ${package}/bin/virbyd through links.
    """
    builder = Builder(tmp_path, vfkit=str(installed / "bin" / "vfkit-emulator"))
    try:
        builder.env = bare_environment(**{k: v for k, v in builder.env.items()
                                          if k.startswith(("VIRBY_", "NIX_"))})  # fmt: skip
        daemon = builder.start(program=str(etcLinks(tmp_path, installed / "bin" / "virbyd")))
        assert f"({installed / 'bin' / 'python'} " in daemon.text(), "twistd in its own Python"
        result = builder.ssh("echo", "through virbyd")
        assert result.returncode == 0, result.stderr + daemon.text()
        assert result.stdout == "through virbyd\n"
        assert f"starting {installed / 'bin' / 'vfkit-emulator'}" in daemon.text()
    finally:
        builder.cleanup()


def test_virbyd_refuses_what_twistd_virby_refuses(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(installed / "bin" / "virbyd"), "--config", str(tmp_path / "missing.json")],
        capture_output=True, text=True, timeout=120, env=bare_environment(),
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr
