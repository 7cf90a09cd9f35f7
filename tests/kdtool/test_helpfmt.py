"""--help stays readable in an 80-column terminal (an SSH session on a Jetson)."""

from __future__ import annotations

import re

import pytest

from kdtool.cli.app import app


def _commands():
    import typer.main

    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        sub = getattr(command, "commands", None)
        yield from ([name, s] for s in sub) if sub else ([name],)


@pytest.mark.parametrize("command", list(_commands()), ids=" ".join)
def test_help_at_80_columns_cuts_no_option_and_keeps_descriptions_wide(cli, monkeypatch,
                                                                        command):
    monkeypatch.setenv("COLUMNS", "80")
    r = cli(*command, "--help")
    assert r.code == 0
    assert "…" not in r.out  # rich's mark of a cut option name, default or word
    # The descriptions start at most 50 columns in, so they keep 28 of the 80 (typer's own
    # layout left distill 20).
    starts = [m.start(1) - r.out.rfind("\n", 0, m.start(1)) - 1 for m in re.finditer(
        r"^│ [ *]{0,4}-[\w-]+(?:,-\w)?(?: +-\w)?(?: +<[^>]*>)? +(\S)", r.out, re.M)]
    assert starts and max(starts) <= 50, (max(starts, default=None), r.out[:3000])


def test_a_flags_negative_spelling_is_in_its_description_and_still_parses(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = cli("export", "--help").out
    assert "--no-slim turns it off" in re.sub(r"\s*│\s*", " ", out)
    from typer.main import get_command

    export = get_command(app).commands["export"]
    assert "--no-slim" in next(p for p in export.params if p.name == "slim").secondary_opts
