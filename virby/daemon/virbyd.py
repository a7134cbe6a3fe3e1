"""
``virbyd``: the daemon's own program.

    virbyd --config FILE [--KEY VALUE ...]

runs exactly what ``twistd --nodaemon --pidfile= virby --config FILE ...`` runs, in this
Python, with the C{virby} plugin of this environment.  launchd needs a program that the
package installs: nixpkgs wraps only the console scripts a package declares, so the package's
C{bin/} has no C{twistd}, and a C{twistd} found on C{PATH} could belong to another Python
that has no Virby at all.  C{twistd ... virby} keeps working for runs by hand.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

#: The name this program goes by, which L{main} gives it; run by hand it is twistd's plugin.
PROGRAM = "virbyd"


def programName() -> str:
    """How the daemon names itself in its error line: as the program it was started as."""
    return PROGRAM if os.path.basename(sys.argv[0]) == PROGRAM else "twistd virby"


#: The status of a command line that cannot be read, as C{virby}'s (argparse's).
EXIT_USAGE = 2


def exitWithError(message: str, status: int = 1) -> NoReturn:
    """
    End the daemon with one line on stderr and C{status} (1: it cannot serve), where
    launchd's log shows it: the one way a daemon that cannot serve stops, before the
    reactor runs or as it starts.
    """
    sys.stderr.write(f"{programName()}: error: {message}\n")
    raise SystemExit(status)


def twistdArguments(arguments: Sequence[str]) -> list[str]:
    """
    twistd's command line for the daemon's own C{arguments}: in the foreground (launchd
    supervises it), without a pidfile (the daemon keeps its own state in the working
    directory).  The one place to change how twistd is asked to run Virby.
    """
    return ["--nodaemon", "--pidfile=", "virby", *arguments]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script: hand over to twistd, which exits when done."""
    from twisted.scripts.twistd import run

    arguments = sys.argv[1:] if argv is None else list(argv)
    sys.argv = [PROGRAM, *twistdArguments(arguments)]
    run()


if __name__ == "__main__":
    main()
