"""``kdtool analyze student``: a noise student's features, noise vs real BN statistics."""

from __future__ import annotations

from kdtool.analyze.student import STATES
from kdtool.distill.loop import DistillConfig, DistillRun


def test_calibration_brings_features_back(cli, digits_teacher, tmp_path):
    student = tmp_path / "s.safetensors"
    DistillRun(DistillConfig(teacher=str(digits_teacher), student="tiny_cnn", noise="uniform",
                             epochs=4, iters_per_epoch=20, batch_size=128, schedule="onecycle",
                             lr=0.01), student).run()
    r = cli("analyze", "student", student, "--data", "digits:test", "--calib-data", "digits",
            "--out", tmp_path / "st", "--json")
    assert r.code == 0, r.err
    rows = {x["state"]: x for x in r.json()["rows"]}
    assert set(rows) == set(STATES) and rows["current BN"]["wasserstein_to_current"] == 0
    # noise statistics shift the features; real statistics put them back
    assert (rows["calibrated BN"]["wasserstein_to_current"]
            < 0.5 * rows["noise running BN"]["wasserstein_to_current"])
    assert rows["calibrated BN"]["top1"] >= rows["noise running BN"]["top1"]
    assert (tmp_path / "st.png").is_file() and (tmp_path / "st.csv").is_file()


def test_folded_student_is_refused(cli, tmp_path, digits_teacher):
    r = cli("calibrate", digits_teacher, "--data", "digits", "--out", tmp_path / "f.safetensors")
    assert r.code == 0, r.err
    bad = cli("analyze", "student", tmp_path / "f.safetensors", "--data", "digits:test",
              "--out", tmp_path / "x")
    assert bad.code == 1 and "no BatchNorm layers" in bad.err
