"""The ``launchd:`` server endpoint for Twisted's endpoint strings (cheap to import)."""

from virby.daemon.launchd import LaunchdParser

launchdEndpointParser = LaunchdParser()
