"""Fixtures of the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every event logged while the test runs."""
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    """
    Each test gets the umask the run started with: building the daemon's service sets the
    daemon's own (077) for the whole process, which would make later tests' folders
    owner-only.
    """
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home folder as macOS makes it (drwxr-x---), holding an ordinary source folder."""
    tmp_path.chmod(0o755)
    (tmp_path / "Users" / "me" / "src").mkdir(parents=True)
    (tmp_path / "Users").chmod(0o755)
    (tmp_path / "Users" / "me").chmod(0o750)
    (tmp_path / "Users" / "me" / "src").chmod(0o755)
    return tmp_path / "Users" / "me"
