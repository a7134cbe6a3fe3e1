"""
twistd plugin drop-in for ``twistd virby``.  Kept tiny: twistd imports every plugin to list
them, so the daemon itself is imported only when this one is chosen.
"""

from twisted.application.service import ServiceMaker

virby = ServiceMaker(
    "Virby",
    "virby.daemon.tap",
    "On-demand Linux builder VM for Nix: a loopback SSH port that boots vfkit when used",
    "virby",
)
