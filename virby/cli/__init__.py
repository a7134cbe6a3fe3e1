"""
The virby admin command: prepare, ask, start, stop, check and reset the Linux builder VM.

``virby prepare`` runs from the activation script; ``virby status``, ``start``, ``stop`` and
``doctor`` are for people.

Every failure a user can meet ends in one line on stderr and exit status 1, never a traceback;
a command line that cannot be read is one line too, and status 2.  ``status`` and ``start``
exit with 3 when the daemon is not running (L{EXIT_STATUSES} says, in each command's
C{--help}, what its statuses mean).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from virby import __version__
from virby.config import Config, load
from virby.errors import VirbyError
from virby.flags import addArguments, collected

if TYPE_CHECKING:
    from virby.cli.realise import Stage0

#: The config the nix-darwin module installs, read when no C{--config} is given, so that
#: C{sudo virby doctor} (or status, start, stop) needs no store path typed out.
INSTALLED_CONFIG = "/etc/virby/config.json"

#: What each command's exit statuses mean, shown under its C{--help}: 0 done, 1 failed, 2 a
#: command line it cannot read, 3 the daemon is not running (L{virby.cli.status.EXIT_DOWN}).
EXIT_STATUSES: dict[str, tuple[tuple[int, str], ...]] = {
    "prepare": (
        (0, "the working directory is ready (or, with --print-ssh-config, the block is printed)"),
        (1, "it could not be made: the line says why and what fixes it"),
    ),
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
    "reset": (
        (0, "diff.img is new (the VM, if it ran, is stopped)"),
        (
            1,
            "refused (connections are open: --force closes them; a VM still holds the disk) "
            "or failed; the disk is left as it was",
        ),
    ),
    "ssh-config": (
        (0, "the block is printed"),
        (1, "the config cannot be read"),
    ),
    "doctor": (
        (0, "every check passed (checks that need root are only skipped without it)"),
        (1, "a check failed: its line says what fixes it"),
    ),
}
#: The status every command gives for a command line it cannot read, as argparse does.
EXIT_USAGE = 2
USAGE_MEANING = "the command line is wrong (an unknown flag, a missing value)"


def _exitHelp(command: str) -> str:
    """The epilog of C{command}'s C{--help}: one status a paragraph, wrapped under its text."""
    statuses = sorted((*EXIT_STATUSES[command], (EXIT_USAGE, USAGE_MEANING)))
    rows = (
        textwrap.fill(meaning, 78, initial_indent=f"  {code:<3}", subsequent_indent=" " * 5)
        for code, meaning in statuses
    )
    return "exit status:\n" + "\n".join(rows)


class _Parser(argparse.ArgumentParser):
    """
    argparse, with a mistake on the command line said in one line on stderr (argparse prints
    its whole usage first), and, after C{--json}, as one JSON document on stdout as well.
    """

    def error(self, message: str) -> NoReturn:
        line = f"{self.prog}: error: {message} (see `{self.prog} --help`)"
        sys.stderr.write(line + "\n")
        if _JSON_FLAG in _ARGV:
            document = failureDocument(self.prog.rpartition(" ")[2], line)
            sys.stdout.write(json.dumps(document) + "\n")
        raise SystemExit(EXIT_USAGE)


_JSON_FLAG = "--json"
#: The arguments being parsed (when L{main} is given them, not C{sys.argv}).
_ARGV: list[str] = []


def _command(commands: Any, name: str, help: str, usage: str = "") -> argparse.ArgumentParser:
    """
    A subcommand whose C{--help} shows its own options first, then the config flags apart
    (L{addArguments}), and ends with what its exit statuses mean.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        usage=f"virby {name}{usage} [--config FILE] [--KEY VALUE ...]",
        description=help[0].upper() + help[1:] + ".",
        epilog=_exitHelp(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="virby",
        description=__doc__.strip().splitlines()[0],
        epilog=(
            "Each command's --help lists its own options, then the config flags with their "
            f"defaults (the config file is {INSTALLED_CONFIG} unless --config names another), "
            "then what its exit statuses mean."
        ),
    )
    parser.add_argument("--version", action="version", version=f"virby {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = _command(
        commands,
        "prepare",
        "make the working directory, disk and keys (as root)",
        " [--owner USER[:GROUP]] [--print-ssh-config]",
    )
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
    prepare.add_argument(
        "--stage0-runner",
        metavar="DRV",
        help="when Nix has no builder for the image's system, start this VM runner "
        "(nixpkgs' darwin.linux-builder's system.build.vm) as a temporary builder",
    )
    prepare.add_argument(
        "--stage0-system", metavar="SYSTEM", help="the system the temporary builder builds for"
    )
    prepare.add_argument(
        "--stage0-host-key", metavar="BASE64", help="the temporary builder's public host key"
    )
    prepare.add_argument(
        "--stage0-port", metavar="PORT", type=int, default=31022,
        help="the loopback port its SSH answers on (default: 31022)",
    )  # fmt: skip
    prepare.add_argument(
        "--stage0-user", metavar="USER", default="builder",
        help="the user Nix logs in as (default: builder)",
    )  # fmt: skip
    prepare.add_argument(
        "--stage0-wait", metavar="SECONDS", type=float, default=300.0,
        help="how long to wait for its SSH (default: 300)",
    )  # fmt: skip

    status = _command(commands, "status", "tell what the daemon is doing", " [--json]")
    status.add_argument("--json", action="store_true", help="print JSON for programs")

    _command(
        commands, "start", "boot the VM now (starting an on-demand daemon) and wait until ready"
    )

    stop = _command(commands, "stop", "stop the VM now", " [--force]")
    stop.add_argument(
        "--force", action="store_true", help="stop even while connections are open (closes them)"
    )

    doctor = _command(
        commands, "doctor", "check everything a working builder needs", " [--json] [--ssh]"
    )
    doctor.add_argument("--json", action="store_true", help="print JSON for programs")
    doctor.add_argument(
        "--ssh",
        action="store_true",
        help="also log in as Nix does: ssh virby-vm nix-daemon --version (boots the VM)",
    )
    reset = _command(
        commands,
        "reset",
        "stop the VM and make its disk (diff.img) anew from base.img (as root)",
        " [--force]",
    )
    reset.add_argument(
        "--force", action="store_true", help="stop even while connections are open (closes them)"
    )
    _command(
        commands,
        "ssh-config",
        "print the ssh Host block the nix-darwin module installs for virby-vm",
    )
    for name in EXIT_STATUSES:
        addArguments(commands.choices[name], INSTALLED_CONFIG)
    parser.set_defaults(commands=commands.choices)
    return parser


def _stage0(args: argparse.Namespace) -> Stage0 | None:
    """The temporary builder C{--stage0-*} describe, or C{None} without C{--stage0-runner}."""
    if args.stage0_runner is None:
        return None
    from virby.cli.realise import Stage0

    if not args.stage0_system or not args.stage0_host_key:
        args.commands["prepare"].error(
            "--stage0-runner needs --stage0-system and --stage0-host-key; pass all three"
        )
    return Stage0(
        runner=args.stage0_runner,
        system=args.stage0_system,
        hostKey=args.stage0_host_key,
        port=args.stage0_port,
        user=args.stage0_user,
        within=args.stage0_wait,
    )


def _run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "ssh-config":
        from virby.sshconfig import sshConfigBlock

        sys.stdout.write(sshConfigBlock(config))
        return 0
    if args.command == "prepare":
        from virby.cli import prepare

        return prepare.run(
            config,
            owner=args.owner,
            print_ssh_config=args.print_ssh_config,
            imageDerivation=args.image_derivation,
            realise=args.realise,
            stage0=_stage0(args),
        )
    if args.command in ("start", "stop"):
        from virby.cli import startstop

        if args.command == "start":
            return startstop.runStart(config)
        return startstop.runStop(config, force=args.force)
    if args.command == "reset":
        from virby.cli import reset

        return reset.runReset(config, force=args.force)
    if args.command == "doctor":
        from virby.cli import doctor

        return doctor.run(config, asJson=args.json, ssh=args.ssh, configFile=args.config)
    from virby.cli import status

    return status.run(config, asJson=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    _ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    args, unknown = _parser().parse_known_args(argv)
    if unknown:  # said by the subcommand that was given them, not by `virby`
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.config is None and os.path.isfile(INSTALLED_CONFIG):
        args.config = INSTALLED_CONFIG
    try:
        config = load(args.config, collected(args), warn=lambda line: _warn(args, line))
        return _run(args, config)
    except VirbyError as e:
        sys.stderr.write(f"virby {args.command}: error: {e}\n")
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps(failureDocument(args.command, str(e))) + "\n")
        return 1


def _warn(args: argparse.Namespace, line: str) -> None:
    sys.stderr.write(f"virby {args.command}: warning: {line}\n")


def failureDocument(command: str, error: str) -> dict[str, Any]:
    """
    What C{--json} prints when the command failed before it could ask or check anything
    (a config it cannot read): still one JSON document, so a program never parses an error
    line.  C{status}'s carries the C{"state"} and C{"reason"} its other failures carry.
    """
    document: dict[str, Any] = {"ok": False, "error": error}
    if command == "status":
        document.update(state="unknown", reason=error)
    return document


if __name__ == "__main__":
    sys.exit(main())
