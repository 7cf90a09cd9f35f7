"""``kdtool eval`` shows its progress over batches on stderr, as train, distill and export do."""

from __future__ import annotations

import json


def test_eval_reports_progress_on_stderr_and_json_stays_one_object(cli, digits_teacher,
                                                                   monkeypatch):
    monkeypatch.setenv("KDTOOL_PROGRESS", "lines")
    r = cli("eval", digits_teacher, "--data", "digits:test", "--batch-size", "64", "--json")
    assert r.code == 0, r.err
    # 360 images in batches of 64: 6 batches; a few seconds' work gets its last line
    assert "evaluate  100% 6/6 batch" in r.err, r.err
    lines = [ln for ln in r.out.splitlines() if ln.strip()]
    assert len(lines) == 1 and json.loads(lines[0])["images"] == 360
    assert "evaluate" not in r.out


def test_eval_progress_is_silent_when_turned_off(cli, digits_teacher, monkeypatch):
    monkeypatch.setenv("KDTOOL_PROGRESS", "off")
    r = cli("eval", digits_teacher, "--data", "digits:test", "--json")
    assert r.code == 0 and "evaluate" not in r.err, r.err
    assert r.json()["images"] == 360
