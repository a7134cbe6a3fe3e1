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

import sys
from collections.abc import Sequence


def twistd_arguments(arguments: Sequence[str]) -> list[str]:
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
    sys.argv = ["virbyd", *twistd_arguments(arguments)]
    run()


if __name__ == "__main__":
    main()
