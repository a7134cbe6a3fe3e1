"""
Command-line flags for every config key, shared by ``virby`` (argparse) and ``twistd virby``
(``usage.Options``) so the two can never disagree on a name.
"""

from __future__ import annotations

import argparse
from typing import Any

from virby.config import KEYS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add C{--config} and one flag per key (C{--KEY}/C{--no-KEY} for booleans)."""
    parser.add_argument("--config", metavar="FILE", help="the JSON config file")
    for key in KEYS:
        if key.kind == "flag":
            group = parser.add_mutually_exclusive_group()
            group.add_argument(
                f"--{key.name}",
                dest=key.attribute,
                action="store_const",
                const=True,
                default=None,
                help=key.help,
            )
            group.add_argument(
                f"--no-{key.name}",
                dest=key.attribute,
                action="store_const",
                const=False,
                help=argparse.SUPPRESS,
            )
        elif key.kind == "map":
            parser.add_argument(
                f"--{key.name}",
                dest=key.attribute,
                action="append",
                metavar="TAG=DIR",
                help=key.help,
            )
        else:
            parser.add_argument(f"--{key.name}", dest=key.attribute, metavar="VALUE", help=key.help)


def collected(namespace: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, by kebab-case key name."""
    return {
        key.name: getattr(namespace, key.attribute)
        for key in KEYS
        if getattr(namespace, key.attribute, None) is not None
    }
