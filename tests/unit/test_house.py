"""
The house's rules, kept the way the docs are kept: the commands load no reactor, the core
and the commands import nothing from the daemon, and names follow one rule.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "virby"
#: snake_case where a name mirrors an outside schema: a config key (the Config fields and the
#: parameters named after them), a status JSON field, a command-line flag's argparse name.
SCHEMA_NAMES = {"working_directory", "nested_virtualization", "start_timeout", "last_error",
                "print_ssh_config"}  # fmt: skip
SNAKE = re.compile(r"^_*[a-z0-9]+(?:_[a-z0-9]+)+$")


def modules(under: Path) -> list[str]:
    names = []
    for path in sorted(under.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


#: What a command may import: all but the daemon, the emulator, the entry points that run
#: on import, and the daemon's reactor types (only the daemon's parts are typed by them).
COMMANDS_AND_CORE = [
    name
    for name in modules(PACKAGE)
    if not name.startswith(("virby.daemon", "virby.emulator"))
    and not name.endswith("__main__")
    and name not in ("virby.virbyd", "virby.reactors")
]


@pytest.mark.parametrize("module", COMMANDS_AND_CORE)
def test_the_commands_and_the_core_load_no_reactor(module: str) -> None:
    """
    C{virby status} and its siblings are short-lived and block: importing Twisted's reactor
    for them cost a third of a second at every call.  Run in a fresh interpreter.
    """
    program = (
        f"import sys, {module}\n"
        "print(sorted(m for m in sys.modules if m.startswith(('twisted.internet', "
        "'virby.daemon'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", f"{module} loads {result.stdout.strip()}"


def test_a_command_runs_without_the_reactor(short_tmp: Path) -> None:
    """The whole of C{virby status}, not only its imports, with no daemon to ask."""
    config = short_tmp / "config.json"
    config.write_text('{"working-directory": "%s"}' % (short_tmp / "wd"))
    program = (
        "import sys\nfrom virby.cli import main\ncode = main(['status', '--config', "
        f"{str(config)!r}])\n"
        "print(code, sorted(m for m in sys.modules if m.startswith('twisted.internet')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines()[-1] == "3 []", result.stdout + result.stderr


def names() -> list[tuple[str, str]]:
    """Every function, method and parameter name in the package, with where it is."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if not (node.name.startswith("__") and node.name.endswith("__")):
                found.append((node.name, where))
            args = node.args
            found += [(a.arg, where) for a in args.posonlyargs + args.args + args.kwonlyargs]
    return found


def test_names_are_twisteds_camel_case() -> None:
    """One rule: Twisted's camelCase; snake_case only where a name mirrors a schema."""
    wrong = [
        f"{name} ({where})"
        for name, where in names()
        if SNAKE.match(name) and name not in SCHEMA_NAMES
    ]
    assert wrong == []
