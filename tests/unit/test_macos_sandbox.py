"""The test mode that plays Nix's macOS build sandbox does what it says (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SHIM

PROGRAM = """
import socket, sys
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
"""


def test_python_children_get_macos_unix_socket_limit(short_tmp: Path) -> None:
    prefix = f"{short_tmp}/"
    fits = prefix + "x" * (103 - len(prefix))
    env = {**os.environ, "PYTHONPATH": str(SHIM)}
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, fits, fits + "y", "@" + "a" * 103],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.stdout.splitlines() == [
        "bound 103",
        "refused 104 AF_UNIX path too long",
        "bound 104",
    ]


def test_the_limit_in_this_process_when_the_mode_is_on(short_tmp: Path) -> None:
    """Without the mode, Linux takes 107 bytes: only the mode makes 104 fail here."""
    import socket

    from tests.conftest import sandboxed

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

    from tests.conftest import SANDBOX_TMPDIR, sandboxed

    inside = str(tmp_path).startswith(SANDBOX_TMPDIR + "/")
    assert inside is sandboxed() and (tempfile.gettempdir() == SANDBOX_TMPDIR) is sandboxed()
    if sandboxed():
        assert os.environ["TMPDIR"] == SANDBOX_TMPDIR, "and so for every process started"
        assert len(f"{tmp_path}/vfkit.sock".encode()) > 103
