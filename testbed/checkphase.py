"""
The package's check phase, played as strictly as a Mac's Nix build runs it.

C{nix/package.nix} runs C{tests/unit} as its check phase, so one failing unit test fails the
user's C{darwin-rebuild switch}.  On the Mac that check runs in Nix's darwin sandbox, which
takes away much of what this Linux machine gives a test:

 - only the package's fileset (C{nix/package.nix}), no C{nix/}, C{docs/} or C{flake.nix};
 - a build user (C{_nixbld1}), not root, with no supplementary groups;
 - a host where Virby was installed before, so a C{_virby} user exists;
 - a long C{TMPDIR} (C{/private/tmp/nix-build-virby-0.1.0.drv-0/build});
 - no C{/proc};
 - a Python without Linux's own parts: no C{os.splice}, no C{select.epoll}, no abstract unix
   socket names, and no unix socket path of 104 bytes or more
   (C{tests/macos_sandbox/sitecustomize.py} takes those away in every Python process).

This plays all of it at once: it copies the fileset, installs the wheel as nixpkgs does
(outside the source), and runs C{pytest tests/unit -m "not linux"} (the package deselects
the Linux-only tests on darwin) as an unprivileged user in a private mount namespace where
an empty tmpfs hides C{/proc}, and where C{/etc/passwd} and C{/etc/group} name a C{_virby}
user and the build user.  Nothing of the host is changed: the users exist only inside the
namespace, and the temporary tree is removed afterwards.

It needs root (a mount namespace, a build user to switch to); C{dev/test} runs it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The part of a Mac's build directory below the play's own root: as long as Nix's.
BUILD_DIR = "private/tmp/nix-build-virby-0.1.0.drv-0/build"
#: The Mac's first build user and its group (Nix's macOS installer: uid 351, gid 350).
BUILD_USER = ("_nixbld1", 351, "nixbld", 350)
#: The daemon's user and group as nix/module.nix makes them on the Mac.
DAEMON_USER = ("_virby", 348, "virby", 348)
#: Proves, inside the play and before the tests, that the play took away what it says.
PREFLIGHT = """
import os, pwd, select, socket
problems = []
if os.geteuid() == 0 or os.getegid() == 0 or os.getgroups():
    problems.append(f"runs as uid {os.geteuid()} gid {os.getegid()} groups {os.getgroups()}")
if os.path.exists("/proc/self"):
    problems.append("/proc is there")
try:
    pwd.getpwnam("_virby")
except KeyError:
    problems.append("no _virby user")
if hasattr(os, "splice") or hasattr(select, "epoll"):
    problems.append("os.splice or select.epoll is there")
for path in ("\\0virby-abstract", "/tmp/" + "x" * 99):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
        problems.append(f"a unix socket bound at {path!r}")
        if not path.startswith("\\0"):
            os.unlink(path)
    except OSError:
        pass
    finally:
        s.close()
if os.path.exists("flake.nix") or os.path.exists("nix") or os.path.exists("docs"):
    problems.append("the source holds more than the package's fileset")
if len(os.environ["TMPDIR"]) < len("/private/tmp/nix-build-virby-0.1.0.drv-0/build"):
    problems.append("TMPDIR is shorter than a Mac's")
if problems:
    raise SystemExit("check-phase: the play is kinder than a Mac: " + "; ".join(problems))
"""


def packageSource() -> list[str]:
    """The top-level paths that nix/package.nix gives its build, as its fileset names them."""
    text = (REPO / "nix" / "package.nix").read_text()
    found = re.search(r"fileset\.unions \[(.*?)\];", text, re.DOTALL)
    if found is None:
        raise SystemExit("check-phase: nix/package.nix has no lib.fileset.unions list")
    return re.findall(r"\.\./([\w.-]+)", found.group(1))


def copySource(into: Path) -> None:
    """Copy the package's fileset alone, as Nix unpacks its C{src}."""
    into.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in packageSource():
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, into / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, into / name)


def installWheel(into: Path, scratch: Path) -> None:
    """Build the wheel and install it outside the source, as buildPythonApplication does."""
    wheels = scratch / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", str(wheels), str(REPO)],
        check=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("virby-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--no-compile",
         "--disable-pip-version-check", "--target", str(into), str(wheel)],
        check=True,
    )  # fmt: skip
    shutil.rmtree(wheels)


def freeId(taken: set[int], wanted: int) -> int:
    """C{wanted}, or the next number above it that nobody holds."""
    while wanted in taken:
        wanted += 1
    return wanted


def userDatabase(root: Path) -> tuple[int, int]:
    """
    Write the namespace's C{passwd} and C{group}: the host's, and a C{_virby} user and the
    build user when the host has none.  Returns the build user's uid and gid.
    """
    passwd = Path("/etc/passwd").read_text().splitlines()
    group = Path("/etc/group").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd if line.count(":") >= 6}
    groups = {line.split(":")[0]: line.split(":") for line in group if line.count(":") >= 3}
    uids = {int(fields[2]) for fields in users.values()}
    gids = {int(fields[2]) for fields in groups.values()}
    ids: dict[str, tuple[int, int]] = {}
    for user, uid, groupName, gid in (DAEMON_USER, BUILD_USER):
        if groupName in groups:
            gid = int(groups[groupName][2])
        else:
            gid = freeId(gids, gid)
            gids.add(gid)
            group.append(f"{groupName}:x:{gid}:{user}")
        if user in users:
            uid, gid = int(users[user][2]), int(users[user][3])
        else:
            uid = freeId(uids, uid)
            uids.add(uid)
            passwd.append(f"{user}:x:{uid}:{gid}:{user}:/var/empty:/usr/bin/false")
        ids[user] = (uid, gid)
    (root / "passwd").write_text("\n".join(passwd) + "\n")
    (root / "group").write_text("\n".join(group) + "\n")
    return ids[BUILD_USER[0]]


def script(root: Path, uid: int, gid: int, pytestArgs: list[str]) -> str:
    """
    The shell that runs inside the mount namespace: as root it mounts what the play
    needs, then becomes the build user with nothing of root's left.
    """
    prefix = os.path.realpath(sys.base_prefix)
    executable = os.path.relpath(os.path.realpath(sys._base_executable), prefix)  # type: ignore[attr-defined]
    python = root / "python"
    deps = root / "deps"
    source = root / "source"
    tmpdir = root / BUILD_DIR
    environment = {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/homeless-shelter",
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmpdir),
        # Where a prefix's own libpython lives, should the interpreter link one.
        "LD_LIBRARY_PATH": str(python / "lib"),
        "PYTHONPATH": os.pathsep.join(
            [str(source / "tests" / "macos_sandbox"), str(root / "site"), str(deps)]
        ),
        "PYTHONDONTWRITEBYTECODE": "1",
        "VIRBY_TEST_MACOS_SANDBOX": "1",
    }
    q = shlex.quote
    pythonPath = q(str(python / executable))
    # Prove the play first, then run the tests ($0 names the shell, "$@" is pytest's line).
    inner = f'{pythonPath} -c {q(PREFLIGHT)} && exec {pythonPath} "$@"'
    command = [
        "set -eu",
        # The interpreter and the test dependencies, at paths the build user can reach.
        f"mount --bind {q(prefix)} {q(str(python))}",
        f"mount -o remount,bind,ro {q(str(python))}",
        f"mount --bind {q(sysconfig.get_paths()['purelib'])} {q(str(deps))}",
        f"mount -o remount,bind,ro {q(str(deps))}",
        f"mount --bind {q(str(root / 'passwd'))} /etc/passwd",
        f"mount --bind {q(str(root / 'group'))} /etc/group",
        # Last, since mount itself reads /proc.
        "mount -t tmpfs -o size=16k,mode=555 none /proc",
        f"cd {q(str(source))}",
        f"exec setpriv --reuid={uid} --regid={gid} --clear-groups --no-new-privs \\",
        "  env -i " + " ".join(q(f"{k}={v}") for k, v in environment.items()) + " \\",
        f"  /bin/sh -c {q(inner)} \\",
        "  check-phase -m pytest -q -p no:cacheprovider -m 'not linux' tests/unit "
        + " ".join(q(a) for a in pytestArgs),
    ]
    return "\n".join(command) + "\n"


def play(pytestArgs: list[str], keep: bool) -> int:
    if os.geteuid() != 0:
        print(
            "check-phase: playing a Mac's build needs root (a build user to become, a mount "
            "namespace to hide /proc in): run dev/test as root",
            file=sys.stderr,
        )
        return 1
    root = Path(tempfile.mkdtemp(prefix="virby-check-phase.", dir="/tmp"))
    try:
        root.chmod(0o755)
        for name in ("python", "deps", "site"):
            (root / name).mkdir()
        copySource(root / "source")
        installWheel(root / "site", root)
        uid, gid = userDatabase(root)
        tmpdir = root / BUILD_DIR
        tmpdir.mkdir(parents=True)
        # The build user owns its build directory and the unpacked source, as in Nix.
        for path in [tmpdir, *(root / "source").rglob("*"), root / "source"]:
            os.lchown(path, uid, gid)
        print(f"check-phase: tests/unit as uid {uid}, no /proc, in {root}", file=sys.stderr)
        unshare = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c"]
        return subprocess.run([*unshare, script(root, uid, gid, pytestArgs)]).returncode
    finally:
        if keep:
            print(f"check-phase: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dev/check-phase",
        description="Run the package's check phase as strictly as a Mac's Nix build does; "
        "other arguments go to pytest.",
    )
    parser.add_argument("--keep", action="store_true", help="keep the played build tree")
    options, pytestArgs = parser.parse_known_args(argv)
    return play(pytestArgs, options.keep)


if __name__ == "__main__":
    raise SystemExit(main())
