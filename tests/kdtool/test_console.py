"""Result tables in a narrow terminal, and progress as plain lines in a log."""

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


def _models_table(monkeypatch, cli, terminal: bool, columns: str | None) -> list[str]:
    monkeypatch.setattr(console, "_any_terminal", lambda: terminal)
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    r = cli("models")
    assert r.code == 0, r.err
    return r.out.splitlines()


def test_a_table_in_a_pipe_keeps_its_natural_width_and_columns_still_rule(monkeypatch, cli):
    from kdtool.models import list_models

    piped = _models_table(monkeypatch, cli, terminal=False, columns=None)
    rows = [line for line in piped if line.startswith("│")]
    # One line per model: rich's 80-column default would fold the descriptions over lines.
    assert len(rows) == len(list_models()), piped
    assert max(len(line) for line in piped) > 80
    narrow = _models_table(monkeypatch, cli, terminal=False, columns="80")
    assert max(len(line) for line in narrow) <= 80 and len(narrow) > len(piped)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_progress_prints_a_tenth_at_a_time_with_rate_and_eta(capsys):
    clock = _Clock()
    p = console._LineProgress("distill", 1000, "img", transient=False, completed=0, clock=clock)
    for _ in range(100):
        clock.t += 1
        p.advance(10, info="epoch 1 loss 2.0")
    p.finish()
    lines = capsys.readouterr().err.splitlines()
    # 10%, 20%, ... 90% while running, then the end: the end is not printed twice
    assert len(lines) == 10, lines
    assert lines[0].startswith("distill   10% 100/1,000 img  10.0 img/s  elapsed 0:00:10")
    assert "eta 0:01:30" in lines[0] and lines[0].endswith("epoch 1 loss 2.0")
    assert lines[-1].startswith("distill  100% 1,000/1,000 img") and "eta" not in lines[-1]


def test_lines_progress_gives_a_few_seconds_work_its_last_line_only(capsys):
    clock = _Clock()
    p = console._LineProgress("bench", 4, "cell", transient=False, completed=0, clock=clock)
    for _ in range(4):
        clock.t += 0.5
        p.advance()
    p.finish()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench  100% 4/4 cell  2.0 cell/s"), lines


def test_lines_progress_counts_only_this_runs_work_after_a_resume(capsys):
    clock = _Clock()
    p = console._LineProgress("train", 1000, "img", transient=False, completed=500, clock=clock)
    clock.t = 10.0
    p.advance(100)
    line = capsys.readouterr().err.strip()
    # 100 images in 10 s, not 600: the 500 done before the resume took no time here
    assert line.startswith("train   60% 600/1,000 img  10.0 img/s") and "eta 0:00:40" in line


def test_lines_progress_reports_long_silent_work_by_time_and_a_transient_task_not_at_the_end(
        capsys):
    clock = _Clock()
    p = console._LineProgress("decode", 10_000, "img", transient=True, completed=0, clock=clock)
    clock.t = 5.0
    p.advance(2000)  # 20% but transient: nothing yet
    assert capsys.readouterr().err == ""
    clock.t = 31.0
    p.advance(1000)  # 30 s since the start
    assert capsys.readouterr().err.startswith("decode   30% 3,000/10,000 img")
    clock.t = 40.0
    p.advance(7000)
    p.finish()
    assert capsys.readouterr().err == ""


def test_progress_mode_follows_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("KDTOOL_PROGRESS", "off")
    with console.progress_task("x", 10) as advance:
        advance(10)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("KDTOOL_PROGRESS", "lines")
    with console.progress_task("x", 10) as advance:
        advance(10)
    assert capsys.readouterr().err.startswith("x  100% 10/10 it")
    monkeypatch.setenv("KDTOOL_PROGRESS", "sometimes")
    console.reset()
    assert console.progress_mode() == "lines"  # not a terminal here: auto
    warning = capsys.readouterr().err
    assert "KDTOOL_PROGRESS='sometimes' is not one of auto, bar, lines, off" in warning


def test_rates_keep_their_useful_digits():
    """A big model on a CPU runs under one image a second: '0 img/s' said nothing."""
    from kdtool.console import rate_text

    assert [rate_text(r) for r in (17485.4, 123.4, 6.31, 0.4213, 0.0071)] == \
        ["17,485", "123", "6.3", "0.42", "0.0071"]


def test_user_text_prints_as_it_is_never_as_markup(capsys):
    """'runs/[exp1]/s.safetensors' printed as 'runs//s.safetensors', and a class named
    '[/dog]' raised rich's MarkupError, a traceback."""
    from kdtool import console

    console.info("resuming runs/[exp1]/s.safetensors")
    console.warn("class '[/dog]' has no images", once=False)
    console.out.print(console.table("per class", ["class", "top-1"], [["[/dog]", 50.0]]))
    console.print_kv("kdtool eval [x]", [["data", "runs/[exp1]/val"]])
    console.info(": teacher", heading="demo step 1/5")
    out, err = capsys.readouterr()
    assert "runs/[exp1]/s.safetensors" in err and "warning: class '[/dog]' has no" in err
    assert "[/dog]" in out and "kdtool eval [x]" in out and "runs/[exp1]/val" in out
    assert "demo step 1/5: teacher" in err
