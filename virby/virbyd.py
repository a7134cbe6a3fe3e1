"""
``python -m virby.virbyd`` and the C{virbyd} console script, at the name they have always
had: the program is L{virby.daemon.virbyd}'s.
"""

from __future__ import annotations

from virby.daemon.virbyd import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
