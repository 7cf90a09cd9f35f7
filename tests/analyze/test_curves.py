"""``kdtool analyze curves``: learning curves read from the history runs record."""

from __future__ import annotations

import csv
import math
import shutil

import pytest

from kdtool.analyze.curves import labels_for, load_run, panels_for
from kdtool.checkpoint import ModelMeta, read_meta, save_checkpoint
from kdtool.distill.loop import DistillConfig, DistillRun
from kdtool.models import create_model
from kdtool.runstate import load_state, save_state, state_path_for


def _config(teacher, noise="gaussian", epochs=3, val_every=1):
    return DistillConfig(teacher=str(teacher), student="tiny_cnn", noise=noise, epochs=epochs,
                         iters_per_epoch=4, batch_size=32, val="digits:test",
                         val_every=val_every, seed=1)


def _distil(teacher, out, noise="gaussian", epochs=3, val_every=1):
    DistillRun(_config(teacher, noise, epochs, val_every), out).run()
    return out


@pytest.fixture(scope="module")
def runs(digits_teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("curves")
    return {"gauss": _distil(digits_teacher, d / "gauss.safetensors"),
            "leaves": _distil(digits_teacher, d / "leaves.safetensors", "dead_leaves",
                              epochs=4, val_every=2)}


def _csv(path):
    return list(csv.DictReader(path.read_text().splitlines()))


def test_the_csv_holds_every_recorded_number_and_the_summary_the_best_epoch(cli, runs,
                                                                              tmp_path):
    r = cli("analyze", "curves", runs["gauss"], runs["leaves"], "--labels",
            "Gaussian,dead leaves", "--out", tmp_path / "c", "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    rows = _csv(tmp_path / "c.csv")
    for label, path in (("Gaussian", runs["gauss"]), ("dead leaves", runs["leaves"])):
        history = read_meta(path).stages["distill"]["history"]
        mine = {(int(x["epoch"]), x["metric"]): float(x["value"]) for x in rows
                if x["run"] == label}
        expected = {(h["epoch"], k): v for h in history for k, v in h.items()
                    if k != "epoch" and isinstance(v, float)}
        assert mine.keys() == expected.keys()
        assert all(math.isclose(mine[k], v, rel_tol=1e-5) for k, v in expected.items())
    # Progress columns: 4 steps of 32 noise images an epoch, and increasing step time.
    gauss = [x for x in rows if x["run"] == "Gaussian" and x["metric"] == "loss"]
    assert [int(x["images"]) for x in gauss] == [128, 256, 384]
    assert 0 < float(gauss[0]["seconds"]) < float(gauss[1]["seconds"]) < float(gauss[2]["seconds"])
    assert res["runs"][0]["images"] == 384
    leaves = res["runs"][1]
    assert (leaves["run"], leaves["stage"], leaves["epoch"], leaves["epochs"]) == (
        "dead leaves", "distill", 4, 4)
    validated = [h for h in read_meta(runs["leaves"]).stages["distill"]["history"]
                 if "val_top1_current" in h]
    assert [h["epoch"] for h in validated] == [2, 4]  # --val-every 2: sparse points
    best = max(validated, key=lambda h: h["val_top1_current"])
    assert (leaves["val_best"], leaves["val_best_epoch"]) == (best["val_top1_current"],
                                                              best["epoch"])
    assert leaves["val_last"] == validated[-1]["val_top1_current"]


def test_a_run_in_progress_is_drawn_up_to_its_last_epoch(cli, digits_teacher, tmp_path,
                                                         interrupted_distill):
    interrupted_distill(DistillRun(_config(digits_teacher, epochs=5), tmp_path / "s.safetensors"),
                        2)
    r = cli("analyze", "curves", tmp_path / "s.safetensors", "--out", tmp_path / "c")
    assert r.code == 0, r.err
    assert "2/5" in r.out
    assert "step time" in r.out and " s " in r.out  # a time, once headed "steps"
    assert {int(x["epoch"]) for x in _csv(tmp_path / "c.csv")} == {1, 2}


def test_train_and_calibrated_checkpoints_and_the_panels_they_get(cli, digits_teacher, runs,
                                                                   tmp_path):
    teacher = load_run(digits_teacher, "t")
    # A train output keeps the best epoch's model and history; the run state has them all.
    kept = read_meta(digits_teacher).stages["train"]["history"]
    assert len(kept) < 12
    assert (teacher.stage, teacher.source, teacher.epochs) == ("train", "run state", 12)
    assert [h["epoch"] for h in teacher.history] == list(range(1, 13))
    assert teacher.history[:len(kept)] == kept
    titles = [p.title for p in panels_for([teacher])]
    assert "agreement with the teacher (%)" not in titles  # a teacher has none to show
    assert titles[:2] == ["loss", "top-1 (%)"]
    assert "agreement with the teacher (%)" in [p.title for p in panels_for(
        [load_run(runs["gauss"], "g")])]
    cal = tmp_path / "cal.safetensors"
    r = cli("calibrate", runs["gauss"], "--data", "digits", "--batches", "2", "--batch-size",
            "16", "--out", cal)
    assert r.code == 0, r.err
    run = load_run(cal, "cal")  # calibration keeps the run's history
    assert run.stage == "distill"
    assert run.history == read_meta(runs["gauss"]).stages["distill"]["history"]


def test_labels_default_to_file_names_made_unique(tmp_path):
    a, b = tmp_path / "a" / "student.safetensors", tmp_path / "b" / "student.safetensors"
    assert labels_for([a, tmp_path / "t.safetensors"], None) == ["student", "t"]
    assert labels_for([a, b], None) == [str(a.with_suffix("")), str(b.with_suffix(""))]
    assert labels_for([a, b], ["x", "y"]) == ["x", "y"]


@pytest.mark.parametrize("args, message", [
    (["{gauss}", "--labels", "a,b"], "--labels gives 2 names for 1 checkpoint(s)"),
    (["{gauss}", "--labels", " "], "has an empty name"),
    (["{gauss}", "--stage", "trian"], "did you mean 'train'"),
    (["{gauss}", "--stage", "train"], "has no train history (it records distill)"),
    (["{gauss}", "--x", "image"], "did you mean 'images'"),
    (["{plain}"], "records no per-epoch history (its stages: none)"),
    (["{missing}"], "missing.safetensors"),
])
def test_errors_name_the_file_or_value(cli, runs, tmp_path, args, message):
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(plain, create_model("tiny_cnn", num_classes=10, in_chans=1),
                    ModelMeta(arch="tiny_cnn", num_classes=10, in_chans=1, input_size=(8, 8),
                              mean=[0.5], std=[0.5]), force=False)
    files = {"gauss": runs["gauss"], "plain": plain, "missing": tmp_path / "missing.safetensors"}
    r = cli("analyze", "curves", *[a.format(**files) for a in args], "--out", tmp_path / "c")
    assert r.code == 1 and message in r.err, r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "c.png").exists()


def test_outputs_are_not_overwritten_without_force(cli, runs, tmp_path):
    (tmp_path / "c.png").write_bytes(b"mine")
    r = cli("analyze", "curves", runs["gauss"], "--out", tmp_path / "c")
    assert r.code == 1 and "--force" in r.err
    assert (tmp_path / "c.png").read_bytes() == b"mine"
    r = cli("analyze", "curves", runs["gauss"], "--out", tmp_path / "c", "--force", "--x",
            "seconds")
    assert r.code == 0, r.err
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_state_is_read_only_when_it_is_the_same_runs(digits_teacher, tmp_path,
                                                              capsys):
    alone = tmp_path / "alone.safetensors"
    shutil.copy(digits_teacher, alone)
    run = load_run(alone, "a")  # no state beside it: what the checkpoint recorded
    assert run.source == "checkpoint"
    assert run.history == read_meta(digits_teacher).stages["train"]["history"]
    state = load_state(state_path_for(digits_teacher))
    other = {**state, "config": {**state["config"], "lr": 123.0}}  # another run's state
    save_state(state_path_for(alone), other)
    assert load_run(alone, "a").source == "checkpoint"
    moved = {**state, "config": {**state["config"], "device": "cuda"}}  # a resume may move
    save_state(state_path_for(alone), moved)
    assert load_run(alone, "a").source == "run state"
    state_path_for(alone).write_bytes(b"truncated")
    capsys.readouterr()
    run = load_run(alone, "a")  # a warning, and the checkpoint's own history
    assert run.source == "checkpoint"
    assert ("alone.safetensors.state.pt' is not a whole torch.save archive"
            in capsys.readouterr().err.replace("\n", ""))


def test_info_says_which_epoch_the_weights_are_and_where_the_curves_are(cli, digits_teacher,
                                                                        runs):
    from kdtool.cli.model_cmds import _stage_line

    train = read_meta(digits_teacher).stages["train"]
    line = _stage_line("train", train, digits_teacher)
    assert line.startswith(f"resnet8 on digits: weights of epoch {train['epoch']} of 12 "
                           "(the best by validation)")
    assert line.endswith(f"learning curves: kdtool analyze curves {digits_teacher}")
    distill = read_meta(runs["leaves"]).stages["distill"]
    assert _stage_line("distill", distill, runs["leaves"]).startswith(
        f"from {digits_teacher} (resnet8) on dead_leaves noise, teacher BN current: epoch 4 "
        "of 4 x 4 batches of 32; bn_running_stats=noise")
    assert _stage_line("calibrate", {"batches": 2, "folded": True}, runs["leaves"]) == (
        "batches=2, folded=True")
    assert cli("info", runs["leaves"]).code == 0


def test_a_stem_with_dots_keeps_them_and_a_csv_or_png_names_the_stem(cli, runs, tmp_path):
    r = cli("analyze", "curves", runs["gauss"], "--out", tmp_path / "r18.v2", "--json")
    assert r.code == 0, r.err
    assert (r.json()["csv"], r.json()["png"]) == (str(tmp_path / "r18.v2.csv"),
                                                  str(tmp_path / "r18.v2.png"))
    r = cli("analyze", "curves", runs["gauss"], "--out", tmp_path / "c.png", "--json")
    assert r.code == 0 and r.json()["csv"] == str(tmp_path / "c.csv"), r.err
