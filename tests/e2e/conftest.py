"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import pytest

from testbed.builder import Builder


@pytest.fixture
def make_builder(tmp_path):
    """Make whole Virbys (L{Builder}) under this test's directory; clean them all up."""
    made: list[Builder] = []

    def make(**settings) -> Builder:
        root = tmp_path / f"builder{len(made)}"
        root.mkdir()
        builder = Builder(root, **settings)
        made.append(builder)
        return builder

    yield make
    for builder in made:
        builder.cleanup()
