"""Result tables: what a narrow terminal does to long names and numbers."""

from __future__ import annotations

from rich.console import Console

from kdtool import console


def test_a_long_name_folds_whole_in_a_narrow_table():
    name = "dead_leaves_current_4096_weight_seed3.safetensors"
    t = console.table("runs", ["run", "top-1", "images/s"], [[name, "85.28%", "14,320"]])
    c = Console(width=40, record=True, color_system=None)
    c.print(t)
    text = c.export_text()
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines()
                           if line.startswith("│"))
    assert first_column == name  # folded over lines, not cut short with an ellipsis
    assert "…" not in text and "85.28%" in text
