"""
The real C{launch_activate_socket} seam, called for real.  Not in tests/unit: the package's
check phase runs those inside a Nix build on a Mac, where the build user's job is whatever
launchd made it, so the answer is not ours to assert.
"""

from __future__ import annotations

import errno
import sys

import pytest

from virby.daemon.launchd import activateSocket

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(sys.platform == "darwin", reason="a Mac has launchd: the answer depends on it")
def test_not_under_launchd_on_this_system() -> None:
    with pytest.raises(OSError) as caught:
        activateSocket("Listener")
    assert caught.value.errno == errno.ESRCH
