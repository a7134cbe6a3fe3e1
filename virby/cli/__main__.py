"""``python -m virby.cli``: the C{virby} command."""

import sys

from virby.cli import main

sys.exit(main())
