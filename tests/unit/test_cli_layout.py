"""The CLI's modules import downwards: appliance.cli assembles the command modules, they share
appliance.cli_common, and no command module imports appliance.cli (no import cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import appliance

PACKAGE = Path(appliance.__file__).parent


def _cli_imports(path: Path) -> set[str]:
    """The appliance.cli* modules `path` imports, at its top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "appliance":
            found |= {f"appliance.{a.name}" for a in node.names if a.name == "cli" or a.name.startswith("cli_")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1].startswith("cli"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("appliance.cli")}
    return found


def test_no_command_module_imports_the_entry_point() -> None:
    modules = sorted(PACKAGE.glob("cli_*.py"))
    assert modules
    offenders = {m.name: _cli_imports(m) for m in modules if "appliance.cli" in _cli_imports(m)}
    assert offenders == {}


def test_the_shared_module_imports_no_command_module() -> None:
    assert _cli_imports(PACKAGE / "cli_common.py") == set()


def test_the_entry_point_assembles_every_command_module() -> None:
    commands = {f"appliance.{m.stem}" for m in PACKAGE.glob("cli_*.py")} - {"appliance.cli_common", "appliance.cli_remote"}
    assert commands <= _cli_imports(PACKAGE / "cli.py")
