"""
The virby admin command: prepare, status, start, stop and doctor the Linux builder VM.

``virby prepare`` runs from the activation script; ``virby status``, ``start``, ``stop`` and
``doctor`` are for people.

Every failure a user can meet ends in one line on stderr and exit status 1, never a traceback.
``status`` and ``start`` exit with 3 when the daemon is not running (L{EXIT_STATUSES} says, in
each command's C{--help}, what its statuses mean).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from virby import __version__
from virby.config import Config, load
from virby.errors import VirbyError
from virby.flags import addArguments, collected

#: What each command's exit statuses mean, shown under its C{--help}: 0 done, 1 failed, 3 the
#: daemon is not running (L{virby.cli.status.EXIT_DOWN}).
EXIT_STATUSES: dict[str, tuple[tuple[int, str], ...]] = {
    "status": (
        (0, "the daemon answered"),
        (1, "it cannot be asked (run it with sudo: the control socket is owner-only)"),
        (
            3,
            "the daemon is not running; an on-demand daemon rests so until its first "
            "connection (a build, `ssh virby-vm`, or `virby start`) starts it",
        ),
    ),
    "start": (
        (0, "the VM is ready"),
        (1, "the boot failed, or the daemon refused"),
        (
            3,
            "the daemon is not running and could not be started: nothing listens on the "
            "builder's port for launchd to start it, or the daemon did not answer in time",
        ),
    ),
    "stop": (
        (
            0,
            "the VM is stopped, or was not running; with no daemon running there is no VM to "
            "stop, so 3 (the daemon is not running) is never the answer here",
        ),
        (1, "refused (connections are open: --force closes them), or failed"),
    ),
}


def _exitHelp(command: str) -> str:
    """The epilog of C{command}'s C{--help}: one status a paragraph, wrapped under its text."""
    rows = (
        textwrap.fill(meaning, 78, initial_indent=f"  {code:<3}", subsequent_indent=" " * 5)
        for code, meaning in EXIT_STATUSES[command]
    )
    return "exit status:\n" + "\n".join(rows)


def _withExitHelp(commands: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose C{--help} ends with what its exit statuses mean."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        epilog=_exitHelp(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virby", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--version", action="version", version=f"virby {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare", help="make the working directory, disk and keys")
    addArguments(prepare)
    prepare.add_argument("--owner", metavar="USER[:GROUP]", help="hand the tree to this user")
    prepare.add_argument(
        "--print-ssh-config", action="store_true", help="print the ssh Host block and exit"
    )
    prepare.add_argument(
        "--image-derivation",
        metavar="DRV",
        help="the image's derivation: realise it when the image is missing (nix-store "
        "--realise, a GC root in the working directory) and remember it for a later run",
    )
    prepare.add_argument(
        "--no-realise",
        dest="realise",
        action="store_false",
        help="do not build a missing image now (the activation builds it in a later step)",
    )

    status = _withExitHelp(commands, "status", "tell what the daemon is doing")
    addArguments(status)
    status.add_argument("--json", action="store_true", help="print JSON for programs")

    start = _withExitHelp(
        commands, "start", "boot the VM now (starting an on-demand daemon) and wait until ready"
    )
    addArguments(start)

    stop = _withExitHelp(commands, "stop", "stop the VM now")
    addArguments(stop)
    stop.add_argument(
        "--force", action="store_true", help="stop even while connections are open (closes them)"
    )

    doctor = commands.add_parser("doctor", help="check everything a working builder needs")
    addArguments(doctor)
    doctor.add_argument("--json", action="store_true", help="print JSON for programs")
    doctor.add_argument(
        "--ssh", action="store_true", help="also run `ssh virby-vm true` (boots the VM)"
    )
    return parser


def _run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "prepare":
        from virby.cli import prepare

        return prepare.run(
            config,
            owner=args.owner,
            print_ssh_config=args.print_ssh_config,
            imageDerivation=args.image_derivation,
            realise=args.realise,
        )
    if args.command in ("start", "stop"):
        from virby.cli import startstop

        if args.command == "start":
            return startstop.runStart(config)
        return startstop.runStop(config, force=args.force)
    if args.command == "doctor":
        from virby.cli import doctor

        return doctor.run(config, asJson=args.json, ssh=args.ssh, configFile=args.config)
    from virby.cli import status

    return status.run(config, asJson=args.json)


#: The config the nix-darwin module installs, read when no C{--config} is given, so that
#: C{sudo virby doctor} (or status, start, stop) needs no store path typed out.
INSTALLED_CONFIG = "/etc/virby/config.json"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.config is None and os.path.isfile(INSTALLED_CONFIG):
        args.config = INSTALLED_CONFIG
    try:
        config = load(args.config, collected(args))
        return _run(args, config)
    except VirbyError as e:
        sys.stderr.write(f"virby {args.command}: error: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
