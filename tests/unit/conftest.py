"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.logger import formatEvent, globalLogPublisher


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every event logged while the test runs."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)
