"""``kdtool analyze activations``: per-layer activation distributions, real vs noise."""

from __future__ import annotations

import csv
import math

from kdtool.analyze.activations import CONDITIONS


def test_current_statistics_bring_noise_activations_to_real_ones(cli, digits_teacher, tmp_path):
    stem = tmp_path / "act"
    r = cli("analyze", "activations", digits_teacher, "--data", "digits:test", "--samples",
            "256", "--out", stem, "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert res["layers"] == ["bn1", "layer1", "layer2", "layer3"]  # resnet8's own names
    w1 = {(x["layer"], x["condition"]): x["wasserstein_to_real"] for x in res["rows"]}
    # The paper's Figs. 5-8, layer by layer: noise on current statistics lies closer to real
    # activations than noise on running statistics. Layers differ in scale (the last stage's
    # distances are several times the stem's), so the summary is scale-free: the geometric
    # mean of the per-layer ratios (about 0.25 here; the last stage alone is about 0.8).
    ratios = [w1[(n, CONDITIONS[2])] / w1[(n, CONDITIONS[1])] for n in res["layers"]]
    assert all(r < 1 for r in ratios), ratios
    assert math.prod(ratios) ** (1 / len(ratios)) < 0.5, ratios
    assert all(w1[(n, CONDITIONS[0])] == 0 for n in res["layers"])
    rows = list(csv.DictReader((tmp_path / "act.csv").read_text().splitlines()))
    assert len(rows) == 3 * len(res["layers"])
    assert (tmp_path / "act.png").read_bytes()[:4] == b"\x89PNG"


def test_errors_name_the_layer_and_refuse_overwrite(cli, digits_teacher, tmp_path):
    bad = cli("analyze", "activations", digits_teacher, "--data", "digits:test", "--layers",
              "layer9", "--out", tmp_path / "a")
    assert bad.code == 1 and "layer9" in bad.err and "did you mean" in bad.err
    (tmp_path / "b.png").write_bytes(b"x")
    again = cli("analyze", "activations", digits_teacher, "--data", "digits:test", "--out",
                tmp_path / "b")
    assert again.code == 1 and "already exists" in again.err


def test_analyses_of_one_checkpoint_default_to_stems_beside_it(cli, digits_teacher, tmp_path):
    import shutil

    for name in ("a.safetensors", "b.v2.safetensors"):
        shutil.copy(digits_teacher, tmp_path / name)
    (tmp_path / "a_activations.png").write_bytes(b"x")  # an earlier analysis of a
    (tmp_path / "b_v2_student.csv").write_text("x")  # and of b
    for command, model, stem in (("activations", "a.safetensors", "a_activations"),
                                 ("student", "b.v2.safetensors", "b_v2_student")):
        r = cli("analyze", command, tmp_path / model, "--data", "digits:test")
        assert r.code == 1 and str(tmp_path / stem) in r.err and "already exists" in r.err, \
            r.err
