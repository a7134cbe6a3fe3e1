"""The test mode that plays Nix's macOS build sandbox does what it says (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SANDBOX_TMPDIR, SHIM, sandboxed

PROGRAM = """
import os, select, socket, sys
for path in sys.argv[1:]:
    path = "\\0" + path[1:] if path.startswith("@") else path  # Linux's abstract names
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
        print("bound", len(path.encode()))
    except OSError as e:
        print("refused", len(path.encode()), e)
    finally:
        s.close()
print("splice" in dir(os), "epoll" in dir(select))
"""


def test_python_children_lack_what_a_macs_python_lacks(short_tmp: Path) -> None:
    prefix = f"{short_tmp}/"
    fits = prefix + "x" * (103 - len(prefix))
    env = {**os.environ, "PYTHONPATH": str(SHIM)}
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, fits, fits + "y", "@virby", "@" + "a" * 103],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.stdout.splitlines() == [
        "bound 103",
        "refused 104 AF_UNIX path too long",
        "refused 6 [Errno 2] No such file or directory",
        "refused 104 AF_UNIX path too long",
        "False False",
    ]


def test_connect_ex_reports_an_abstract_name_as_not_found() -> None:
    env = {**os.environ, "PYTHONPATH": str(SHIM)}
    program = "import socket; print(socket.socket(socket.AF_UNIX).connect_ex('\\0virby'))"
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, env=env
    )  # fmt: skip
    assert result.stdout == "2\n"


def test_the_limit_in_this_process_when_the_mode_is_on(short_tmp: Path) -> None:
    """Without the mode, Linux takes 107 bytes: only the mode makes 104 fail here."""
    import socket

    path = f"{short_tmp}/" + "x" * (104 - len(str(short_tmp)) - 1)
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.bind(path)
            refused = False
        except OSError as e:
            refused = str(e) == "AF_UNIX path too long"
    assert refused is sandboxed()


def test_the_temporary_directory_is_as_long_as_a_nix_build_on_a_mac(tmp_path: Path) -> None:
    import tempfile

    if not sandboxed():
        assert not str(tmp_path).startswith(SANDBOX_TMPDIR)
        return
    tmpdir = os.environ["TMPDIR"]
    assert len(tmpdir) >= len(SANDBOX_TMPDIR), "and so for every process started"
    assert tmpdir.endswith("/private/tmp/nix-build-virby-0.1.0.drv-0/build")
    assert tempfile.gettempdir() == tmpdir and str(tmp_path).startswith(tmpdir + "/")
    assert len(f"{tmp_path}/vfkit.sock".encode()) > 103
