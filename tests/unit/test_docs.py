"""
The docs name only what exists: every path of this repository, every relative link (and
its anchor), every C{virby.*} name, and every option of the C{virby} and C{virbyd} command
lines that C{docs/*.md} and the README mention.  Code moves; this keeps the pages that
send a newcomer to it from pointing at nothing.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from virby import cli
from virby.daemon import tap

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

#: The top-level folders of the repository that the docs name paths in.
TOP = ("virby", "docs", "nix", "tests", "testbed", "dev", "bench", "twisted", ".ci")

#: A repository path: one of L{TOP} and what follows, not part of a longer path (so
#: C{/etc/virby/config.json} is not taken for C{virby/config.json}).
PATH = re.compile(r"(?<![\w./<>-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w./-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
DOTTED = re.compile(r"(?<![\w./-])virby(?:\.[A-Za-z_]\w*)+")
COMMAND = re.compile(r"`(?:sudo )?(virbyd?)((?: [^`]*)?)`")


#: The pages checked: docs/ and the README.  The package's own source (nix/package.nix) has
#: no docs/: these tests are the repository's.
pytestmark = pytest.mark.repository

PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"] if DOCS.is_dir() else []
DOC_PAGES = [page for page in PAGES if page.parent == DOCS]


def each(pages: list[Path]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("page", pages, ids=[page.name for page in pages])


def mentions(pattern: re.Pattern[str], page: Path) -> set[str]:
    return {
        m.group(1) if pattern.groups else m.group(0) for m in pattern.finditer(page.read_text())
    }


def slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {
        slug(line.lstrip("#"))
        for line in page.read_text().splitlines()
        if re.match(r"#{1,6} ", line)
    }


@each(PAGES)
def test_every_repository_path_a_page_names_exists(page: Path) -> None:
    missing = sorted(p for p in mentions(PATH, page) if not (ROOT / p.rstrip(".")).exists())
    assert missing == [], f"{page.name} names paths that do not exist: {missing}"


@each(PAGES)
def test_every_relative_link_and_its_anchor_resolve(page: Path) -> None:
    broken = sorted(link for link in mentions(LINK, page) if not leadsSomewhere(link, page))
    assert broken == [], f"{page.name} links to what is not there: {broken}"


def leadsSomewhere(link: str, page: Path) -> bool:
    if re.match(r"^[a-z]+:", link):
        return True  # https:, mailto:: not ours to check offline
    path, _, anchor = link.partition("#")
    linked = (page.parent / path).resolve() if path else page
    if not linked.exists():
        return False
    return not anchor or linked.suffix != ".md" or anchor in anchors(linked)


@each(DOC_PAGES)
def test_every_virby_name_a_doc_gives_can_be_found(page: Path) -> None:
    """C{virby.layout.checkWorkingDirectory}: a module, then attributes of it."""
    unknown = [name for name in sorted(mentions(DOTTED, page)) if not resolves(name)]
    assert unknown == [], f"{page.name} names what the code does not have: {unknown}"


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def virbyOptions() -> dict[str, set[str]]:
    """Each C{virby} subcommand's options, and the top level's under C{""}."""
    parser = cli._parser()
    options = {"": set(parser._option_string_actions)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                options[name] = set(sub._option_string_actions)
    return options


def virbydOptions() -> set[str]:
    options = tap.Options()
    return {"--" + name.rstrip("=") for name in options.longOpt}


@each(PAGES)
def test_every_command_line_a_page_shows_is_one_the_commands_take(page: Path) -> None:
    known = virbyOptions()
    wrong = []
    for match in COMMAND.finditer(page.read_text()):
        program, words = match.group(1), match.group(2).split()
        if program == "virbyd":
            accepted = virbydOptions()
        elif not words or not re.fullmatch(r"[a-z-]+", words[0]):
            continue  # `virby`, or a message such as `virby emulator: ...`, not a command
        elif words[0] not in known:
            wrong.append(match.group(0))
            continue
        else:
            accepted = known[words[0]]
        options = re.findall(r"--[\w-]+", " ".join(words))
        if any(option not in accepted for option in options):
            wrong.append(match.group(0))
    assert wrong == [], f"{page.name} shows command lines the commands refuse: {wrong}"


def test_every_module_has_its_row_in_the_design() -> None:
    """A newcomer finds each concern's module in docs/design.md's table."""
    design = (DOCS / "design.md").read_text()
    package = ROOT / "virby"
    modules = sorted(
        path.relative_to(ROOT).as_posix()
        for path in package.rglob("*.py")
        if "emulator" not in path.relative_to(package).parts  # the emulator has one row
        and path.name != "__main__.py"
        and path != package / "__init__.py"
    )
    assert [m for m in modules if f"`{m}`" not in design] == []
