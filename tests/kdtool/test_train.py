from pathlib import Path

import numpy as np
import pytest
import torch

from kdtool.checkpoint import load_checkpoint, read_meta
from kdtool.errors import KdtoolError
from kdtool.train import TrainConfig, Trainer


@pytest.mark.timeout(60)  # the bound: digits teacher >= 95% within 60 s on CPU
def test_train_digits_then_eval_reproduces_from_the_file(cli, tmp_path):
    out = tmp_path / "teacher.safetensors"
    r = cli("train", "--arch", "resnet8", "--data", "digits", "--val", "digits:test",
            "--epochs", "12", "--batch-size", "64", "--out", out, "--json")
    assert r.code == 0, r.err
    result = r.json()
    assert result["val_top1"] >= 95.0
    meta = read_meta(out)
    assert meta.arch == "resnet8" and meta.in_chans == 1 and meta.input_size == [8, 8]
    assert meta.class_names == [str(i) for i in range(10)]
    assert meta.provenance["metrics"]["val_top1"] == pytest.approx(result["val_top1"])
    assert meta.provenance["seed"] == 0 and "kdtool train" in meta.provenance["command"]

    ev = cli("eval", out, "--data", "digits:test", "--json")  # no --arch: the file says it all
    assert ev.code == 0, ev.err
    assert ev.json()["top1"] == pytest.approx(result["val_top1"])
    assert set(ev.json()["per_class"]) == {str(i) for i in range(10)}


def test_eval_current_statistics_leaves_buffers_alone(cli, digits_teacher):
    before = {k: v.clone() for k, v in load_checkpoint(digits_teacher)[0].state_dict().items()}
    r = cli("eval", digits_teacher, "--data", "digits:test", "--bn", "current",
            "--batch-size", "128", "--json")
    assert r.code == 0, r.err
    assert r.json()["top1"] > 80  # a real-data teacher on real batches: stats are close
    after = load_checkpoint(digits_teacher)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _cfg(**kw) -> TrainConfig:
    base = dict(arch="tiny_cnn", data="digits", epochs=3, batch_size=128, augment=True, seed=5)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("ema", [0.0, 0.9])  # with --ema, the average resumes exactly too
def test_resume_continues_exactly(tmp_path, monkeypatch, ema):
    straight = tmp_path / "straight.safetensors"
    Trainer(_cfg(ema=ema), straight).run()

    resumed = tmp_path / "resumed.safetensors"
    real_epoch = Trainer._train_epoch

    def killed_in_third_epoch(self, model, loader, epoch, *a):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, model, loader, epoch, *a)

    monkeypatch.setattr(Trainer, "_train_epoch", killed_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(ema=ema), resumed).run()
    epochs = []

    def recorded(self, model, loader, epoch, *a):
        epochs.append(epoch)
        return real_epoch(self, model, loader, epoch, *a)

    monkeypatch.setattr(Trainer, "_train_epoch", recorded)
    Trainer(_cfg(ema=ema), resumed, resume=True).run()
    assert epochs == [2]  # resumed after the two saved epochs, not restarted

    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(resumed)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_same_seed_same_model_other_seed_differs(tmp_path):
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p, seed in zip(paths, (1, 1, 2), strict=True):
        Trainer(_cfg(epochs=1, seed=seed), p).run()
    w = [load_checkpoint(p)[0].state_dict()["conv1.weight"] for p in paths]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_existing_output_and_state_are_protected(tmp_path):
    out = tmp_path / "t.safetensors"
    Trainer(_cfg(epochs=1), out).run()
    # A stopped (or finished) run's two files: the way on is --resume, offered first.
    with pytest.raises(KdtoolError, match="already exists, with the run state .*--resume.*--force"):
        Trainer(_cfg(epochs=1), out)
    state = out.with_name(out.name + ".state.pt")
    state.rename(tmp_path / "kept.pt")
    with pytest.raises(KdtoolError, match="already exists.*--force"):
        Trainer(_cfg(epochs=1), out)
    (tmp_path / "kept.pt").rename(state)
    out.unlink()
    with pytest.raises(KdtoolError, match="run state.*--resume"):
        Trainer(_cfg(epochs=1), out)
    with pytest.raises(KdtoolError, match="batch_size was 128, now 64"):
        Trainer(_cfg(epochs=1, batch_size=64), out, resume=True).run()
    with pytest.raises(KdtoolError, match="no run state"):
        Trainer(_cfg(epochs=1), tmp_path / "other.safetensors", resume=True).run()


def test_adam_plateau_recipe_runs(tmp_path):
    r = Trainer(_cfg(epochs=2, optimizer="adam", val="digits:test"), tmp_path / "a.safetensors")
    result = r.run()
    assert r.cfg.schedule == "plateau" and r.cfg.lr == 1e-3
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]


@pytest.mark.parametrize("kw, match", [
    (dict(optimizer="rmsprop"), "unknown optimizer"),
    (dict(schedule="cosin"), "did you mean 'cosine'"),
    (dict(lr=-1.0), "--lr must be positive"),
    (dict(label_smoothing=1.5), "label-smoothing"),
    (dict(weight_decay=-1.0), r"--weight-decay must be a finite number >= 0, got -1 \(use 0"),
    (dict(weight_decay=float("nan")), "--weight-decay must be a finite number >= 0, got nan"),
    (dict(weight_decay=float("inf")), "--weight-decay must be a finite number >= 0, got inf"),
    (dict(val_every=0, val="digits:test"), "--val-every must be >= 1"),
    (dict(val_every=2), "--val-every 2 paces validation on --val, and there is none"),
    (dict(device="cuda:0" if not torch.cuda.is_available() else "tpu"), "device"),
])
def test_bad_config_values(tmp_path, kw, match):
    with pytest.raises(KdtoolError, match=match):
        Trainer(_cfg(**kw), tmp_path / "x.safetensors").run()


def test_cli_refuses_negative_weight_decay_before_writing(cli, tmp_path):
    out = tmp_path / "x.safetensors"
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--weight-decay", "-1",
            "--epochs", "1", "--out", out)
    assert r.code == 1 and "Traceback" not in r.err
    assert r.err.strip().splitlines() == ["error: --weight-decay must be a finite number >= 0, "
                                          "got -1 (use 0 for none, or a small positive value "
                                          "such as 5e-4)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("schedule", ["onecycle", "plateau"])
def test_val_every_validates_every_nth_and_the_last_epoch(cli, tmp_path, schedule):
    out = tmp_path / "t.safetensors"
    optimizer = "adam" if schedule == "plateau" else "sgd"
    r = Trainer(_cfg(epochs=5, val="digits:test", val_every=2, optimizer=optimizer,
                     schedule=schedule), out).run()
    validated = [row["epoch"] for row in r["history"] if "val_top1" in row]
    assert validated == [2, 4, 5]
    best = max((row for row in r["history"] if "val_top1" in row), key=lambda row: row["val_top1"])
    assert r["best_epoch"] == best["epoch"] and r["val_top1"] == best["val_top1"]
    meta = read_meta(out)  # the file is that epoch's model, with its validation score
    assert meta.stages["train"]["epoch"] == best["epoch"]
    assert meta.provenance["metrics"]["val_top1"] == best["val_top1"]
    ev = cli("eval", out, "--data", "digits:test", "--json")
    assert ev.json()["top1"] == pytest.approx(best["val_top1"])


def test_a_state_from_before_val_every_resumes(tmp_path):
    from kdtool.runstate import check_same_config

    saved = {"arch": "resnet8", "epochs": 3}
    check_same_config(saved, {**saved, "val_every": 1}, tmp_path)
    with pytest.raises(KdtoolError, match="val_every was None, now 2"):
        check_same_config(saved, {**saved, "val_every": 2}, tmp_path)


def test_resume_checks_the_data_by_its_contents_not_its_path(cli, tmp_path, monkeypatch):
    """--data rewritten between a stop and --resume trained the rest on other images."""
    import numpy as np

    from kdtool.data import load_data
    from kdtool.runstate import check_same_config, load_state

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez("d.npz", x=rng.integers(0, 255, (64, 8, 8, 1), dtype=np.uint8),
             y=np.arange(64) % 4)
    args = ["train", "--arch", "tiny_cnn", "--data", "d.npz", "--epochs", "2", "--out",
            "t.safetensors"]
    assert cli(*args).code == 0
    state = "t.safetensors.state.pt"
    saved = load_state(Path(state))["config"]
    np.savez("d.npz", x=rng.integers(0, 255, (64, 8, 8, 1), dtype=np.uint8),
             y=np.arange(64) % 4)
    assert saved["data_contents"] != load_data("d.npz").checksum()  # rewritten: noticed
    changed = {**saved, "data_contents": load_data("d.npz").checksum()}
    with pytest.raises(KdtoolError, match="the data 'd.npz' is not the one the run started "
                                          "with"):
        check_same_config(saved, changed, Path(state))
    # the same contents under another spelling of the path resume
    check_same_config(saved, {**saved, "data": str(tmp_path / "d.npz")}, Path(state))
    # a state written before contents were recorded: the paths decide, as they did
    old = {k: v for k, v in saved.items() if k != "data_contents"}
    check_same_config(old, changed, Path(state))
    with pytest.raises(KdtoolError, match="data was 'd.npz', now 'e.npz'"):
        check_same_config(old, {**changed, "data": "e.npz"}, Path(state))


def test_one_class_of_training_data_is_refused_before_writing(cli, tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "data" / "cat").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "data/cat" / f"{i}.png")
    out = tmp_path / "t.safetensors"
    r = cli("train", "--arch", "tiny_cnn", "--data", tmp_path / "data", "--epochs", "1",
            "--out", out)
    assert r.code == 1 and "has 1 class (cat); a classifier needs at least 2" in r.err, r.err
    assert "Traceback" not in r.err and not out.exists()


def test_a_batch_larger_than_the_data_is_warned(cli, tmp_path):
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--epochs", "1", "--batch-size",
            "5000", "--out", tmp_path / "t.safetensors")
    assert r.code == 0, r.err
    said = " ".join(r.err.split())
    assert "--batch-size 5000 is more than the 1437 training images" in said
    assert "a batch of 143 gives 10 steps an epoch" in said  # 1437 // 143
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--epochs", "1", "--batch-size",
            "256", "--out", tmp_path / "u.safetensors")
    assert r.code == 0 and "is more than" not in r.err


def test_validating_on_the_training_data_is_named_and_unlabelled_val_refused(tmp_path, capsys):
    from kdtool.data import same_dataset

    assert same_dataset("digits", "digits:train") and not same_dataset("digits", "digits:test")
    assert same_dataset(str(tmp_path / "a" / ".." / "d.zip"), str(tmp_path / "d.zip"))
    Trainer(_cfg(epochs=1, val="digits:train"), tmp_path / "t.safetensors").run()
    assert "is the training data: its accuracy will be training accuracy" in " ".join(
        capsys.readouterr().err.split())
    np.savez(tmp_path / "u.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.full(4, -1))
    with pytest.raises(KdtoolError, match="validation data .* has no labels"):
        Trainer(_cfg(epochs=1, val=str(tmp_path / "u.npz")), tmp_path / "u.safetensors").run()


def test_a_runs_rate_is_its_images_over_its_time():
    """train averaged its epochs' rates and distill gave its last epoch's: a run that slowed
    (a busy machine) or was resumed elsewhere was misstated either way."""
    from kdtool.runinfo import run_rate

    history = [{"seconds": 10.0, "images_per_s": 100.0}, {"seconds": 30.0, "images_per_s": 20.0}]
    assert run_rate(history) == {"seconds": 40.0, "images_per_s": 1600 / 40}


def test_resume_checks_the_val_data_by_its_contents(cli, tmp_path, monkeypatch):
    """--val chooses the epoch that is the output: rewritten between a stop and --resume,
    the best of the first epochs and of the rest were scored on other images."""
    import numpy as np

    from kdtool.data import load_data
    from kdtool.runstate import check_same_config, load_state

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("d.npz", "v.npz"):
        np.savez(name, x=rng.integers(0, 255, (64, 8, 8, 1), dtype=np.uint8),
                 y=np.arange(64) % 4)
    assert cli("train", "--arch", "tiny_cnn", "--data", "d.npz", "--val", "v.npz", "--epochs",
               "1", "--out", "t.safetensors").code == 0
    saved = load_state(Path("t.safetensors.state.pt"))["config"]
    assert saved["val_contents"] == load_data("v.npz").checksum()
    changed = {**saved, "val_contents": "0" * 8}
    with pytest.raises(KdtoolError, match="the --val data 'v.npz' is not the one the run started"):
        check_same_config(saved, changed, Path("t.safetensors.state.pt"))
    # a run without --val records none
    assert cli("train", "--arch", "tiny_cnn", "--data", "d.npz", "--epochs", "1", "--out",
               "u.safetensors").code == 0
    assert "val_contents" not in load_state(Path("u.safetensors.state.pt"))["config"]


def test_train_under_torchrun_is_refused(cli, tmp_path, monkeypatch):
    """Each rank trained alone (the second was then refused by the run lock)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--out", tmp_path / "t.safetensors")
    assert r.code == 1 and "kdtool train runs in one process; torchrun started 2" in r.err
    assert not (tmp_path / "t.safetensors").exists()


def test_val_limit_draws_the_validation_images(tmp_path):
    cfg = TrainConfig(arch="tiny_cnn", data="digits", val="digits:test", val_limit=40,
                      epochs=1)
    _, val = Trainer(cfg, tmp_path / "t.safetensors")._load_data()
    _, whole = Trainer(TrainConfig(arch="tiny_cnn", data="digits", val="digits:test"),
                       tmp_path / "u.safetensors")._load_data()
    assert len(val) == 40 and len(whole) == 360
    first = torch.randperm(360, generator=torch.Generator().manual_seed(0))[:40]
    assert torch.equal(val.x, whole.x[first])  # the first 40 of --seed's order
    with pytest.raises(KdtoolError, match="--val-limit 3 draws images of --val"):
        Trainer(TrainConfig(arch="tiny_cnn", data="digits", val_limit=3),
                tmp_path / "v.safetensors")
