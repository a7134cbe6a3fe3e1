"""
Stand-ins for the macOS commands that nix-darwin's activation script calls, run inside the
fake root of L{tests.e2e.test_nix_activation}: C{python macos_standins.py NAME ARGS...}.

Each records its command line (one JSON line in C{/var/log/standins.jsonl}), so a test can
check what activation did and in which order, and behaves like the real command where the
script depends on it:

- C{dscl .} keeps the local directory (C{/var/db/standins/directory.json}) and writes
  C{/etc/passwd} and C{/etc/group} from it, so that C{id}, C{chown} and Python's C{pwd} see
  the same accounts.  C{-read} of a missing record prints C{DS Error: -14136
  (eDSRecordNotFound)} on stderr and exits 56; of a missing attribute, C{No such key} and
  exits 181.  C{-read} prints C{Key: value}; C{-list PATH KEY} prints name and value.
- C{sysadminctl -addUser} exits 0 even when it fails (nix-darwin checks with C{id}).
- C{launchctl} keeps the loaded jobs (C{/var/db/standins/launchd.json}).  C{load} reads the
  plist's C{Label}; for a job run as C{UserName} it records whether that user could open its
  C{StandardOutPath} and whether its C{WorkingDirectory} exists (launchd opens the log as the
  job's user), and whether the program nix-darwin's C{/bin/sh -c "... && exec PROGRAM ..."}
  names can be run, through whatever links lead to it.  C{print}, C{kickstart} and C{kill}
  of a job that is not loaded exit 113.
- C{sw_vers} says macOS 15.5.
- C{apfs.util -t} makes C{/run} from C{/etc/synthetic.conf}, as macOS does at boot.
- C{rsync} copies a tree (nix-darwin's applications step).
- C{virbyd}, the daemon, is there to be found (launchd's load starts nothing here).
- C{virby} runs the real C{virby} command (C{VIRBY_PYTHON}); the Nix programs the system's
  scripts call (C{nix-store}) succeed, and C{nix-store --realise} of Virby's image finds it
  only when it was built before the switch.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import stat
import sys
from pathlib import Path

STATE = Path("/var/db/standins")
LOG = Path("/var/log/standins.jsonl")
DIRECTORY = STATE / "directory.json"
LAUNCHD = STATE / "launchd.json"

NOT_FOUND = 56
NO_SUCH_KEY = 181
NO_SERVICE = 113


def record(entry: dict) -> None:
    with LOG.open("a") as log:
        log.write(json.dumps(entry) + "\n")


def load(path: Path, default: dict) -> dict:
    return json.loads(path.read_text()) if path.exists() else default


def save(path: Path, data: dict) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def first(record_: dict, key: str, default: str = "") -> str:
    return (record_.get(key) or [default])[0]


def write_accounts(directory: dict) -> None:
    """/etc/passwd and /etc/group as the directory says, for id, chown and pwd."""
    users = [
        ":".join([name, "*", first(r, "UniqueID"), first(r, "PrimaryGroupID"),
                  first(r, "RealName"), first(r, "NFSHomeDirectory", "/var/empty"),
                  first(r, "UserShell", "/usr/bin/false")])
        for name, r in sorted(directory["Users"].items())
    ]  # fmt: skip
    groups = [
        f"{name}:*:{first(r, 'PrimaryGroupID')}:{','.join(r.get('GroupMembership', []))}"
        for name, r in sorted(directory["Groups"].items())
    ]
    Path("/etc/passwd").write_text("\n".join(users) + "\n")
    Path("/etc/group").write_text("\n".join(groups) + "\n")


def split_record(path: str) -> tuple[str, str]:
    kind, _, name = path.strip("/").partition("/")
    return kind, name


def dscl(args: list[str]) -> int:
    if not args or args[0] != ".":
        print("dscl stand-in: only the local node (.) is known", file=sys.stderr)
        return 1
    directory = load(DIRECTORY, {"Users": {}, "Groups": {}})
    verb, rest = args[1], args[2:]
    if verb == "-list":
        kind, _ = split_record(rest[0])
        for name, r in sorted(directory[kind].items()):
            if len(rest) > 1:
                print(f"{name:<30} {' '.join(r.get(rest[1], []))}")
            else:
                print(name)
        return 0
    kind, name = split_record(rest[0])
    records = directory[kind]
    if verb == "-read":
        if name not in records:
            print("<dscl_cmd> DS Error: -14136 (eDSRecordNotFound)", file=sys.stderr)
            return NOT_FOUND
        keys = rest[1:] or sorted(records[name])
        for key in keys:
            if key not in records[name]:
                print(f"No such key: {key}", file=sys.stderr)
                return NO_SUCH_KEY
            print(f"{key}: {' '.join(records[name][key])}")
        return 0
    if verb == "-create":
        entry = records.setdefault(name, {})
        if len(rest) > 1:
            entry[rest[1]] = rest[2:]
    elif verb == "-change":
        if name not in records:
            return NOT_FOUND
    elif verb == "-delete":
        if name not in records:
            print("<dscl_cmd> DS Error: -14136 (eDSRecordNotFound)", file=sys.stderr)
            return NOT_FOUND
        del records[name]
    else:
        print(f"dscl stand-in: {verb} is not known", file=sys.stderr)
        return 1
    save(DIRECTORY, directory)
    write_accounts(directory)
    return 0


def sysadminctl(args: list[str]) -> int:
    if args[:1] != ["-addUser"]:
        print(f"sysadminctl stand-in: {args[:1]} is not known", file=sys.stderr)
        return 0
    name = args[1]
    options = dict(zip(args[2::2], args[3::2], strict=False))
    directory = load(DIRECTORY, {"Users": {}, "Groups": {}})
    taken = {first(r, "UniqueID") for r in directory["Users"].values()}
    if name in directory["Users"] or options.get("-UID") in taken:
        # The real command reports the failure and still exits 0.
        print(f"sysadminctl stand-in: cannot create {name}", file=sys.stderr)
        return 0
    directory["Users"][name] = {
        "UniqueID": [options["-UID"]],
        "PrimaryGroupID": [options.get("-GID", "20")],
        "RealName": [options.get("-fullName", name)],
        "NFSHomeDirectory": [options.get("-home", f"/Users/{name}")],
        "UserShell": [options.get("-shell", "/bin/zsh")],
    }
    save(DIRECTORY, directory)
    write_accounts(directory)
    return 0


def can_open_as(path: str, user: str) -> str | None:
    """Why launchd, running as C{user}, could not open C{path} to append, or None."""
    directory = load(DIRECTORY, {"Users": {}, "Groups": {}})
    if user not in directory["Users"]:
        return f"no user {user}"
    uid = int(first(directory["Users"][user], "UniqueID"))
    target = Path(path)
    if not target.exists():
        parent = target.parent.stat()
        if parent.st_uid == uid and parent.st_mode & stat.S_IWUSR:
            return None
        return f"{path} does not exist and {user} cannot create it in {target.parent}"
    info = target.stat()
    if info.st_uid == uid and info.st_mode & stat.S_IWUSR:
        return None
    if info.st_mode & stat.S_IWOTH:
        return None
    return f"{path} is not writable by {user}"


def programOf(arguments: list[str]) -> str | None:
    """The program a job runs: nix-darwin's C{/bin/sh -c "... && exec PROGRAM ARGS"}'s."""
    if arguments[:2] != ["/bin/sh", "-c"] or len(arguments) != 3:
        return arguments[0] if arguments else None
    words = arguments[2].split()
    return words[words.index("exec") + 1] if "exec" in words[:-1] else None


def launchctl(args: list[str]) -> int:
    state = load(LAUNCHD, {"jobs": {}})
    jobs = state["jobs"]
    verb, rest = args[0], args[1:]
    if verb == "managername":
        print("Aqua")
        return 0
    if verb in ("setenv", "asuser"):
        return 0
    if verb == "load":
        path = rest[-1]
        job = plistlib.loads(Path(path).read_bytes())
        label = job["Label"]
        if label in jobs:
            print(f"{path}: service already loaded", file=sys.stderr)
            return 0
        problems = []
        if "UserName" in job:
            for key in ("StandardOutPath", "StandardErrorPath"):
                if key in job:
                    why = can_open_as(job[key], job["UserName"])
                    if why:
                        problems.append(why)
        if "WorkingDirectory" in job and not Path(job["WorkingDirectory"]).is_dir():
            problems.append(f"no working directory {job['WorkingDirectory']}")
        program = programOf(job.get("ProgramArguments", []))
        if program is not None and not os.access(program, os.X_OK):
            problems.append(f"cannot run {program}")
        jobs[label] = {"plist": path}
        record({"launchd": "loaded", "label": label, "problems": problems})
    elif verb == "unload":
        path = rest[-1]
        label = next((name for name, job in jobs.items() if job["plist"] == path), None)
        if label is None:
            print("Unload failed: 5: Input/output error", file=sys.stderr)
            return 5
        del jobs[label]
    elif verb in ("print", "kickstart", "kill"):
        label = rest[-1].removeprefix("system/")
        if label not in jobs:
            print(f'Could not find service "{label}" in domain for system', file=sys.stderr)
            return NO_SERVICE
        if verb == "print":
            print(f"system/{label} = {{\n\tstate = running\n}}")
    else:
        print(f"launchctl stand-in: {verb} is not known", file=sys.stderr)
        return 1
    save(LAUNCHD, state)
    return 0


def apfs_util(args: list[str]) -> int:
    synthetic = Path("/etc/synthetic.conf")
    for line in synthetic.read_text().splitlines() if synthetic.exists() else []:
        name, _, target = line.partition("\t")
        if name == "run" and not Path("/run").is_symlink():
            Path("/run").symlink_to(target)
    return 0


def rsync(args: list[str]) -> int:
    """
    What nix-darwin's applications and fonts steps ask of rsync: copy a tree (its contents
    when the source ends in /), and with --delete-missing-args remove what a missing source
    would have been.
    """
    source, target = args[-2], args[-1]
    if not source.endswith("/"):
        target = os.path.join(target, os.path.basename(source))
    if not os.path.exists(source):
        if "--delete-missing-args" not in args:
            print(f"rsync: link_stat {source!r} failed: No such file or directory (2)",
                  file=sys.stderr)  # fmt: skip
            return 23
        shutil.rmtree(target, ignore_errors=True)
        return 0
    if "--delete" in args or "--delete-during" in args:
        shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    return 0


def nix_store(args: list[str]) -> int:
    """
    What the system's scripts ask of nix-store succeeds.  C{--realise DRV --add-root ROOT}
    (Virby's image) plays a Mac whose Nix has no builder for the image's system: the image
    is there when it was built before the switch (as on a machine that builds it elsewhere),
    and then the root is made, as Nix makes it; otherwise it fails with Nix's own words.
    """
    if args[:1] != ["--realise"] or "--add-root" not in args:
        return 0
    drv, root = args[1], args[args.index("--add-root") + 1]
    with open(drv) as f:
        output = f.read().split('[("out","', 1)[1].split('"', 1)[0]
    if not os.path.exists(output):
        print(f"error: a 'aarch64-linux' with features {{}} is required to build '{drv}', "
              "but I am a 'aarch64-darwin' with features {}", file=sys.stderr)  # fmt: skip
        return 1
    if os.path.lexists(root):
        os.unlink(root)
    os.symlink(output, root)
    print(root)
    return 0


def sw_vers(args: list[str]) -> int:
    versions = {"-productName": "macOS", "-productVersion": "15.5", "-buildVersion": "24F74"}
    if args:
        print(versions[args[0]])
    else:
        for flag, value in versions.items():
            print(f"{flag[1:].replace('product', 'Product').replace('build', 'Build')}: {value}")
    return 0


def virby(args: list[str]) -> int:
    python = os.environ.get("VIRBY_PYTHON") or Path("/var/db/standins/python").read_text()
    code = "import sys; from virby.cli import main; sys.exit(main())"
    os.execv(python, [python, "-c", code, *args])
    return 1


COMMANDS = {
    "dscl": dscl,
    "sysadminctl": sysadminctl,
    "launchctl": launchctl,
    "apfs.util": apfs_util,
    "virby": virby,
    "nix-store": nix_store,
    "sw_vers": sw_vers,
    "rsync": rsync,
}


def main() -> int:
    name, args = sys.argv[1], sys.argv[2:]
    record({"argv": [name, *args]})
    command = COMMANDS.get(name)
    if command is None:
        print(f"{name} stand-in: this command is not expected here", file=sys.stderr)
        return 127
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
