"""``kdtool analyze sweep``: Table 1 / Fig. 3b sweeps of distillation runs."""

from __future__ import annotations

import csv

import pytest
import torch

from kdtool.analyze.sweep import point_config
from kdtool.distill.loop import DistillConfig
from kdtool.errors import KdtoolError


def test_points_map_to_distill_configs():
    base = DistillConfig(teacher="t", iters_per_epoch=100, batch_size=256)
    assert point_config(base, "running-fraction", 0).teacher_bn == "current"
    assert point_config(base, "running-fraction", 1).teacher_bn == "running"
    mixed = point_config(base, "running-fraction", 0.25)
    assert (mixed.teacher_bn, mixed.running_fraction) == ("mixed", 0.25)
    small = point_config(base, "batch-size", 64)  # the same number of noise images
    assert (small.batch_size, small.iters_per_epoch) == (64, 400)
    steps = point_config(base, "batch-size", 64, keep="steps")  # the same optimiser steps
    assert (steps.batch_size, steps.iters_per_epoch) == (64, 100)
    with pytest.raises(KdtoolError, match="between 0 and 1"):
        point_config(base, "running-fraction", 1.5)
    with pytest.raises(KdtoolError, match="integer >= 2"):
        point_config(base, "batch-size", 1)


def test_running_fraction_sweep_writes_csv_and_png(cli, digits_teacher, tmp_path):
    r = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test",
            "--values", "0,1", "--epochs", "2", "--iters-per-epoch", "10", "--batch-size",
            "64", "--out", tmp_path / "t1", "--json")
    assert r.code == 0, r.err
    rows = r.json()["rows"]
    assert [row["teacher_bn"] for row in rows] == ["current", "running"]
    assert len(list(csv.DictReader((tmp_path / "t1.csv").read_text().splitlines()))) == 2
    assert (tmp_path / "t1.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "t1" / "running-fraction_0_seed0.safetensors").is_file()
    assert rows[0]["val_images"] == 360 and 0 <= rows[0]["val_teacher_top1"] <= 100
    bad = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test",
              "--param", "batchsize", "--out", tmp_path / "x")
    assert bad.code == 1 and "did you mean 'batch-size'" in bad.err


def test_an_interrupted_sweep_resumes_to_the_same_result(cli, digits_teacher, tmp_path,
                                                         monkeypatch):
    from safetensors.torch import load_file

    from kdtool.analyze.sweep import point_path, run_sweep
    from kdtool.distill.loop import DistillRun

    base = DistillConfig(teacher=str(digits_teacher), student="tiny_cnn", epochs=2,
                         iters_per_epoch=10, batch_size=64, schedule="onecycle", lr=0.01,
                         val="digits:test", device="cpu", balance="off")
    whole = run_sweep(base, "running-fraction", [0, 1], tmp_path / "whole")

    real, epochs_run = DistillRun._epoch, []

    def ctrl_c_at_the_fourth_epoch(self, *args):
        epochs_run.append(args[3])
        if len(epochs_run) == 4:  # point 1's second epoch: point 0 done, point 1 half
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(DistillRun, "_epoch", ctrl_c_at_the_fourth_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(base, "running-fraction", [0, 1], tmp_path / "cut")
    # Without --resume or --force the students of the cut-off sweep are not overwritten.
    r = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test",
            "--values", "0,1", "--out", tmp_path / "cut")
    assert r.code == 1 and "exists from an earlier sweep" in r.err and "--resume" in r.err
    epochs_run.clear()
    resumed = run_sweep(base, "running-fraction", [0, 1], tmp_path / "cut", resume=True)
    assert epochs_run == [1]  # only what was lost: point 0 is read back, not run again
    for a, b in zip(whole, resumed, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == \
            {k: v for k, v in b.items() if k != "seconds"}
    for v in (0, 1):
        wa = load_file(point_path(tmp_path / "whole", "running-fraction", v, 0))
        wb = load_file(point_path(tmp_path / "cut", "running-fraction", v, 0))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(("param", "points"), [("running-fraction", [0, 0.25, 0.5, 0.75, 1]),
                                               ("batch-size", [16, 32, 64, 128, 256])])
def test_the_default_points_follow_the_parameter(cli, digits_teacher, tmp_path, monkeypatch,
                                                 param, points):
    """--param batch-size once took the running-fraction points: 'batch size 0.0'."""
    from kdtool.analyze import sweep
    from kdtool.errors import KdtoolError

    def swept(base, param, values, *args, **kwargs):
        raise KdtoolError(f"points {values}")

    monkeypatch.setattr(sweep, "run_sweep", swept)
    r = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test", "--param",
            param, "--out", tmp_path / "s")
    assert r.code == 1 and f"points {[float(p) for p in points]}" in r.err, r.err


def test_keep_is_refused_where_it_means_nothing(cli, digits_teacher, tmp_path):
    r = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test", "--keep",
            "steps", "--out", tmp_path / "s")
    assert r.code == 1 and "--keep steps applies to batch-size sweeps" in r.err


def test_a_teacher_without_batchnorm_is_refused_with_what_the_sweep_offers(cli, tmp_path):
    from kdtool.checkpoint import ModelMeta, save_checkpoint
    from kdtool.models import create_model

    gn = tmp_path / "gn.safetensors"
    save_checkpoint(gn, create_model("resnet8_gn", num_classes=10, in_chans=1),
                    ModelMeta(arch="resnet8_gn", num_classes=10, in_chans=1, input_size=[8, 8],
                              mean=[0.3], std=[0.37]), force=False)
    for param in ("running-fraction", "batch-size"):
        r = cli("analyze", "sweep", "--teacher", gn, "--val", "digits:test", "--param", param,
                "--out", tmp_path / "s")
        assert r.code == 1 and "has no BatchNorm layers, and both sweeps vary" in r.err, r.err
        assert "try --teacher-norm-align" not in r.err and "drop --teacher-bn" not in r.err
    assert not (tmp_path / "s").exists()


def test_force_removes_the_points_of_an_earlier_sweep_at_other_values(tmp_path):
    """A --force run over fewer values left the others with their old settings, and a later
    --resume of the wider sweep refused them, its hint throwing away the finished points."""
    from kdtool.analyze.sweep import clear_other_points, point_path
    from kdtool.runstate import state_path_for

    paths = {v: point_path(tmp_path, "running-fraction", v, 0) for v in (0, 0.5, 1)}
    for path in paths.values():
        path.write_bytes(b"a point")
        state_path_for(path).write_bytes(b"its state")
    other = tmp_path / "batch-size_64.safetensors"  # another parameter's sweep: not ours
    other.write_bytes(b"kept")
    clear_other_points(tmp_path, "running-fraction", [paths[0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [paths[0].name, state_path_for(paths[0]).name, other.name])


def test_several_seeds_per_point_are_run_summarised_and_drawn_as_a_band(cli, digits_teacher,
                                                                        tmp_path):
    """One run is one draw (a few points apart between seeds on digits): --seeds N runs each
    point N times, and the table, the JSON's points and the plot give their mean and range."""
    from safetensors.torch import load_file

    from kdtool.analyze.sweep import point_path

    r = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test",
            "--values", "0,1", "--epochs", "1", "--iters-per-epoch", "5", "--batch-size",
            "32", "--seed", "7", "--seeds", "2", "--out", tmp_path / "s", "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert [(row["value"], row["seed"]) for row in res["rows"]] == [(0, 7), (0, 8), (1, 7),
                                                                    (1, 8)]
    assert len(list(csv.DictReader((tmp_path / "s.csv").read_text().splitlines()))) == 4
    for point in res["points"]:
        runs = [row for row in res["rows"] if row["value"] == point["value"]]
        assert point["seeds"] == 2
        for key in ("val_top1_current", "val_top1_running"):
            scores = [row[key] for row in runs]
            assert point[key] == pytest.approx(sum(scores) / 2)
            assert (point[key + "_min"], point[key + "_max"]) == (min(scores), max(scores))
    a, b = (load_file(point_path(tmp_path / "s", "running-fraction", 0, seed)) for seed in (7, 8))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two draws, not one run twice
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    table = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test",
                "--values", "0,1", "--epochs", "1", "--iters-per-epoch", "5", "--batch-size",
                "32", "--seed", "7", "--seeds", "2", "--out", tmp_path / "s", "--resume")
    assert table.code == 0, table.err
    out = " ".join(table.out.split())
    assert "mean of 2 seeds (min-max)" in out
    p0 = res["points"][0]
    assert (f"{p0['val_top1_current']:.1f}% ({p0['val_top1_current_min']:.1f}-"
            f"{p0['val_top1_current_max']:.1f})") in out
    bad = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test",
              "--seeds", "0", "--out", tmp_path / "z")
    assert bad.code == 1 and "--seeds 0 runs nothing" in bad.err
    # a point given twice ran twice into one student file, and the table had it twice
    bad = cli("analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test",
              "--values", "0,0.5,0", "--out", tmp_path / "z")
    assert bad.code == 1 and "--values '0,0.5,0' gives 0 twice" in bad.err
