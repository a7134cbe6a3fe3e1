"""Asks the running daemon to move to what prepare made."""

from __future__ import annotations

from virby.config import Config


def askToRenew(config: Config) -> str | None:
    """Asks the running daemon to move to what prepare made."""
    return None
