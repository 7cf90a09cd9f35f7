"""``kdtool analyze toy``: the appendix's toy problem."""

from __future__ import annotations

import csv

import pytest

from kdtool.analyze.toy import SETS, ToyConfig, run_toy


@pytest.mark.parametrize("seed", [0, 1])
def test_current_statistics_bring_noise_to_the_real_embedding(seed):
    r = run_toy(ToyConfig(samples=300, steps=200, seed=seed))
    assert r["train_accuracy"] >= 95
    s = r["summary"]
    # The paper's Fig. 1: on running statistics noise lands far from the real data; on the
    # noise batch's own statistics it overlaps it.
    assert s[SETS[2]]["mean_distance_to_real"] < 0.5 * s[SETS[1]]["mean_distance_to_real"]


def test_cli_writes_png_and_csv_and_refuses_to_overwrite(cli, tmp_path):
    stem = tmp_path / "fig" / "toy"
    r = cli("analyze", "toy", "--out", stem, "--samples", "200", "--steps", "50", "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert set(res["summary"]) == set(SETS)
    assert (tmp_path / "fig" / "toy.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "fig" / "toy.csv").read_text().splitlines()))
    assert len(rows) == 200 + 200 + 3 * 200
    assert {row["set"] for row in rows} == {"real", "noise", *SETS}
    again = cli("analyze", "toy", "--out", stem)
    assert again.code == 1 and "already exists" in again.err
    bad = cli("analyze", "toy", "--out", tmp_path / "x", "--steps", "1")
    assert bad.code == 1 and "--steps must be >= 2" in bad.err
