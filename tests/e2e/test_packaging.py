"""
The twistd plugin ships in a plain (non-editable) install.  Drop-ins under twisted/plugins/
are a known packaging trap: an ``__init__.py`` there hides Twisted's own plugins, and a
package list that forgets the directory ships a daemon twistd cannot find.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("virby-*.whl")
    return built


def test_the_wheel_ships_the_plugin_as_a_drop_in(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/virby_plugin.py" in names
    assert "twisted/plugins/virby_launchd.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "virby/emulator/__main__.py" in names


def test_twistd_lists_virby_from_an_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    # Run twistd with the wheel's files first and this source tree nowhere on sys.path,
    # so only the installed copy of the plugin can be found.
    program = (
        "import sys\n"
        "import os\n"
        f"sys.path = [{str(target)!r}] + [p for p in sys.path "
        f"if p and os.path.realpath(p) != {str(REPO)!r}]\n"
        "import virby\n"
        f"assert virby.__file__.startswith({str(target)!r}), virby.__file__\n"
        "sys.argv = ['twistd', '--help']\n"
        "from twisted.scripts.twistd import run\n"
        "run()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "virby" in result.stdout
    assert "On-demand Linux builder VM" in result.stdout
