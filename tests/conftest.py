"""
Test-wide settings, and the test mode that plays Nix's macOS build sandbox.

The package's check phase runs C{pytest tests/unit} on the user's Mac inside Nix's build
sandbox, where C{TMPDIR} is long (C{/private/tmp/nix-build-virby-0.1.0.drv-0/...}), a unix
socket path holds at most 103 bytes, and APFS clones files.  With
C{VIRBY_TEST_MACOS_SANDBOX=1}, this machine plays it:

 - C{TMPDIR} is at least as long as the Mac's, for this process and every process it starts
   (a long one already given is kept);
 - in this process and in every Python process it starts (C{tests/macos_sandbox}), Python
   lacks what a Mac's lacks: a unix socket path of more than 103 bytes fails, an abstract
   name is a path that is not found, and C{os.splice} and C{select.epoll} are gone;
 - copying a disk clones it, as APFS's C{clonefile} does, so no test may assume a sparse
   copy unless it asks for one.

C{dev/check-phase} (L{testbed.checkphase}) runs the mode as strictly as the Mac's build: the
package's fileset alone, an unprivileged build user, a C{_virby} user on the host, no
C{/proc}, and the tests marked C{linux} deselected, as the package deselects them on darwin.

Tests that need a unix socket or a working directory take L{short_tmp}: a directory under
C{/tmp}, short on both systems, since a working directory must leave room for its sockets.

The check phase runs on the package's source (C{nix/package.nix}), which carries the Python
tree and not C{nix/} or C{docs/}.  A test that reads those is marked C{repository}: it is
skipped there, and nowhere else, so a file missing from a checkout still fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import util
from pathlib import Path

import pytest

from tests.darwin_harness import PAIRS, Pair

MODE = "VIRBY_TEST_MACOS_SANDBOX"
#: Longer than Nix gives a build on macOS, so that whatever passes here passes there.
SANDBOX_TMPDIR = "/tmp/virby-macos-sandbox/private/tmp/nix-build-virby-0.1.0.drv-0/build"
SHIM = Path(__file__).parent / "macos_sandbox"
#: Only the repository has it; the package's source (nix/package.nix's fileset) does not.
REPOSITORY_MARK = Path(__file__).resolve().parents[1] / "flake.nix"


def sandboxed() -> bool:
    return os.environ.get(MODE, "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    if not sandboxed():
        return
    if len(os.environ.get("TMPDIR", "")) < len(SANDBOX_TMPDIR):
        os.makedirs(SANDBOX_TMPDIR, exist_ok=True)
        os.environ["TMPDIR"] = SANDBOX_TMPDIR
    tempfile.tempdir = None
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(SHIM), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    spec = util.spec_from_file_location("_virby_macos_sandbox", SHIM / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("repository") is not None and not REPOSITORY_MARK.is_file():
        pytest.skip("needs the repository's nix/ or docs/: the package's source has neither")


def pytest_report_header(config: pytest.Config) -> str | None:
    if sandboxed():
        return (
            f"macOS sandbox mode: TMPDIR={os.environ['TMPDIR']}, unix socket paths <= 103 bytes, "
            "no abstract socket names, no os.splice or select.epoll"
        )
    return None


@pytest.fixture(autouse=True)
def _apfs_clones(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the sandbox mode, every disk copy is a clone, as on APFS."""
    if not sandboxed():
        return
    from virby import disk

    copy_keeping_holes = disk._sparseCopy  # an APFS clone keeps the source's holes too

    def clonefile(source: str, destination: str) -> bool:
        sourceFd = os.open(source, os.O_RDONLY)
        try:
            fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                copy_keeping_holes(sourceFd, fd, os.fstat(sourceFd).st_size)
            finally:
                os.close(fd)
        finally:
            os.close(sourceFd)
        return True

    monkeypatch.setattr(disk, "platformClone", lambda: ("clonefile", clonefile))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory with a short path (under /tmp), removed afterwards."""
    root = "/tmp" if os.access("/tmp", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="virby-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=PAIRS, ids=lambda pair: pair.name)
def pair(request: pytest.FixtureRequest) -> Pair:
    """Each nix-darwin branch with its nixpkgs lib (L{tests.darwin_harness}), or a skip."""
    why = request.param.missing()
    if why is not None:
        pytest.skip(why)
    return request.param
