"""--data-dir and --config work in every position, on every command that reads the data directory or settings."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from appliance.cli import main

# (command words, extra arguments) for each command that reads the data directory
COMMANDS = [
    (["models", "list"], []),
    (["collections", "list"], []),
    (["tenants", "list"], []),
    (["keys", "list"], []),
    (["usage", "verify"], []),
    (["usage", "report"], ["--format", "json"]),
    (["data", "status"], []),
]


def _positions(words: list[str], option: list[str]) -> list[list[str]]:
    """The option before the command, after each of its words."""
    return [[*words[:i], *option, *words[i:]] for i in range(len(words) + 1)]


@pytest.mark.parametrize(("words", "extra"), COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_data_dir_in_every_position(tmp_path: Path, words: list[str], extra: list[str]) -> None:
    runner = CliRunner()
    for args in _positions(words, ["--data-dir", str(tmp_path / "d")]):
        result = runner.invoke(main, [*args, *extra])
        assert result.exit_code == 0, (args, result.output)
        # the directory named was the one used (opened and marked, or reported on)
        assert (tmp_path / "d" / "data-format.json").exists() or str(tmp_path / "d") in result.output


def test_innermost_data_dir_wins(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--data-dir", str(tmp_path / "outer"), "models", "list", "--data-dir", str(tmp_path / "inner")]
    )
    assert result.exit_code == 0 and str(tmp_path / "inner" / "models") in result.output


@pytest.mark.parametrize("position", [0, 1, 2])
def test_config_in_every_position_prices_the_report(tmp_path: Path, position: int) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(f'data_dir = "{tmp_path / "d"}"\n[gateway.prices.default]\nprompt_per_1k = 1.0\n')
    args = ["usage", "report", "--format", "json"]
    args[position:position] = ["--config", str(config)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # settings came from the file: the data directory it names was opened
    assert (tmp_path / "d" / "data-format.json").exists()


def test_every_settings_command_accepts_both() -> None:
    skip = {"version", "peer", "restore"}

    def walk(cmd: click.Command, path: str) -> list[str]:
        missing = [] if {"data_dir", "config"} <= {p.name for p in cmd.params} else [path]
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                if name not in skip:
                    missing += walk(sub, f"{path} {name}")
        return missing

    assert walk(main, "appliance") == []


def test_usage_report_table_has_no_none_and_stays_aligned() -> None:
    from appliance.cli_gateway import _table

    columns = ["route", "requests", "cost"]
    rows = [
        {"route": "/v1/collections/a-very-long-collection-name/ask", "requests": 3, "cost": 0.0123},
        {"route": None, "requests": 12, "cost": 0.0},
    ]
    lines = _table(columns, rows).splitlines()
    assert "None" not in "\n".join(lines) and lines[2].startswith("- ")
    # right-aligned numbers end where their header ends, on every line, however long the route
    end = lines[0].index("REQUESTS") + len("REQUESTS")
    assert [line[end - 2 : end + 1] for line in lines[1:]] == [" 3 ", "12 "]
    assert len({len(line) for line in lines}) == 1
