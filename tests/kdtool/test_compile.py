"""``--compile-mode``: the torch.compile mode of the training step (CUDA graphs and others)."""

from __future__ import annotations

import pytest
import torch

from kdtool.errors import KdtoolError
from kdtool.runstate import check_same_config
from kdtool.train import TrainConfig, Trainer


@pytest.fixture
def recorded(monkeypatch):
    """torch.compile and CUDA-graph step marks, recorded instead of run (no inductor build)."""
    calls = {"modes": [], "marks": 0}

    def fake_compile(fn, mode=None):
        calls["modes"].append(mode)
        return fn

    def mark():
        calls["marks"] += 1

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", mark)
    return calls


def test_train_compiles_in_the_mode_and_marks_each_step(recorded, tmp_path):
    cfg = TrainConfig(arch="tiny_cnn", data="digits", epochs=1, batch_size=512,
                      compile=True, compile_mode="max-autotune")
    Trainer(cfg, tmp_path / "t.safetensors").run()
    assert recorded["modes"] == ["max-autotune"]
    assert recorded["marks"] == 2  # 1,437 images, batches of 512, the last one dropped


def test_compile_mode_implies_compile_on_the_command_line(cli, recorded, digits_teacher,
                                                          tmp_path):
    r = cli("distill", "--teacher", digits_teacher, "--student", "tiny_cnn", "--epochs", "1",
            "--iters-per-epoch", "2", "--batch-size", "32", "--compile-mode", "reduce-overhead",
            "--out", tmp_path / "s.safetensors", "--json")
    assert r.code == 0, r.err
    assert recorded["modes"] == ["reduce-overhead"] and recorded["marks"] == 2
    assert "--compile-mode reduce-overhead: CUDA graphs need a CUDA device; on cpu" in r.err
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--epochs", "1",
            "--out", tmp_path / "t.safetensors", "--json")
    assert r.code == 0, r.err
    assert recorded["modes"] == ["reduce-overhead"]  # no --compile: nothing compiled


def test_a_mistyped_compile_mode_gets_did_you_mean(cli, digits_teacher, tmp_path):
    r = cli("distill", "--teacher", digits_teacher, "--compile-mode", "reduce-overhed",
            "--out", tmp_path / "s.safetensors")
    assert r.code == 1 and "did you mean 'reduce-overhead'" in r.err
    with pytest.raises(KdtoolError, match="did you mean 'max-autotune'"):
        TrainConfig(compile=True, compile_mode="max-autotun").resolved()


def test_a_resumed_run_may_change_how_it_is_compiled_but_not_what_it_does(tmp_path):
    saved = {"lr": 0.1, "compile": False, "compile_mode": "default", "device": "cpu"}
    check_same_config(saved, {**saved, "compile": True, "compile_mode": "reduce-overhead",
                              "device": "cuda"}, tmp_path / "s.pt")
    with pytest.raises(KdtoolError, match="lr was 0.1, now 0.2"):
        check_same_config(saved, {**saved, "lr": 0.2}, tmp_path / "s.pt")
