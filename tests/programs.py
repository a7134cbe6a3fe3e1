"""
The command lines that run Virby's programs in this Python, wherever its scripts live.

The unit tests run in the package's check phase too, where C{sys.executable} is nixpkgs'
Python and the package's C{bin/} (C{virby}, C{virbyd}) and Twisted's (C{twistd}) are in
other store paths: nothing may be looked up next to the interpreter.  What the installed
scripts do is tested from a real installation in C{tests/e2e/test_packaging.py}.
"""

from __future__ import annotations

import sys

#: C{virby ...}
VIRBY = [sys.executable, "-m", "virby.cli"]
#: C{virbyd ...}: its main names itself, as the console script does.
VIRBYD = [sys.executable, "-m", "virby.virbyd"]
#: C{twistd ...}, named so, as the script Twisted installs is.
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]
