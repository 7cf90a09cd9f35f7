"""``--threads`` on the commands that compute with PyTorch: set while the work runs, then
restored (tests and scripts run many commands in one process)."""

from __future__ import annotations

import os

import pytest
import torch

from kdtool.errors import KdtoolError


def _patch_work(monkeypatch, command: str, seen: list[int]) -> None:
    """Replace ``command``'s work with a recorder of PyTorch's thread count that stops."""

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise KdtoolError("work recorded")

    if command == "train":
        from kdtool.train import Trainer
        monkeypatch.setattr(Trainer, "run", record)
    elif command == "distill":
        from kdtool.distill.loop import DistillRun
        monkeypatch.setattr(DistillRun, "run", record)
    elif command == "calibrate":
        monkeypatch.setattr("kdtool.calibrate.pipeline.calibrate", record)
    elif command == "eval":
        monkeypatch.setattr("kdtool.cli.train_cmds._eval_checkpoint", record)
    elif command == "export":
        monkeypatch.setattr("kdtool.export.pipeline.run_export", record)
    elif command == "demo":
        from kdtool.demo import Demo
        monkeypatch.setattr(Demo, "run", record)
    else:
        monkeypatch.setattr("kdtool.analyze.sweep.run_sweep", record)


@pytest.mark.parametrize("command", ["train", "distill", "calibrate", "eval", "sweep", "demo",
                                     "export"])
def test_threads_hold_while_the_command_works_and_are_restored(cli, monkeypatch, tmp_path,
                                                              digits_teacher, command):
    args = {
        "train": ["train", "--arch", "tiny_cnn", "--data", "digits", "--out",
                  tmp_path / "t.safetensors"],
        "distill": ["distill", "--teacher", digits_teacher, "--out",
                    tmp_path / "s.safetensors"],
        "calibrate": ["calibrate", digits_teacher, "--data", "digits", "--out",
                      tmp_path / "c.safetensors"],
        "eval": ["eval", digits_teacher, "--data", "digits:test"],
        "sweep": ["analyze", "sweep", "--teacher", digits_teacher, "--val", "digits:test",
                  "--out", tmp_path / "sw"],
        "demo": ["demo", "--out", tmp_path / "demo", "--force"],
        "export": ["export", digits_teacher, "--onnx", tmp_path / "m.onnx"],
    }[command]
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    seen: list[int] = []
    _patch_work(monkeypatch, command, seen)
    r = cli(*args, "--threads", want)
    assert r.code == 1 and "work recorded" in r.err, r.err
    assert seen == [want] and torch.get_num_threads() == before
    seen.clear()
    cli(*args)  # no --threads: the library's default, untouched
    assert seen == [before]
    r = cli(*args, "--threads", -1)
    assert r.code == 1 and "--threads must be at least 0, not -1" in r.err and seen == [before]


def test_more_threads_than_cores_are_warned(cli, monkeypatch, digits_teacher):
    monkeypatch.setattr("kdtool.cli.train_cmds._eval_checkpoint",
                        lambda *a, **k: (_ for _ in ()).throw(KdtoolError("work recorded")))
    cores = len(os.sched_getaffinity(0))
    r = cli("eval", digits_teacher, "--data", "digits:test", "--threads", cores + 1)
    err = " ".join(r.err.split())
    assert f"--threads {cores + 1} is more than the {cores} cores" in err
    r = cli("eval", digits_teacher, "--data", "digits:test", "--threads", cores)
    assert "more than the" not in r.err


def test_an_exported_model_is_evaluated_on_the_threads_asked_for(cli, monkeypatch, tmp_path,
                                                                 digits_teacher):
    """eval of an .onnx file hands --threads to ONNX Runtime, as bench and predict do."""
    from kdtool.deploy import predict

    onnx = tmp_path / "m.onnx"
    assert cli("export", digits_teacher, "--onnx", onnx).code == 0
    asked: list = []
    real = predict.start_runner

    def start(model, backend, threads):
        asked.append(threads)
        return real(model, backend, threads)

    monkeypatch.setattr(predict, "start_runner", start)
    r = cli("eval", onnx, "--data", "digits:test", "--threads", 1, "--json")
    assert r.code == 0, r.err
    assert asked == [1]


def test_the_demo_hands_its_threads_to_export_and_bench(monkeypatch, tmp_path):
    """The demo's bench times PyTorch against ONNX Runtime: both on the threads asked for."""
    from kdtool import demo as demo_module
    from kdtool.deploy import bench
    from kdtool.export import pipeline

    seen = {}

    def export(cfg):
        seen["export"] = cfg.threads
        raise KdtoolError("export recorded")

    monkeypatch.setattr(pipeline, "run_export", export)
    with pytest.raises(KdtoolError, match="export recorded"):
        demo_module.Demo(tmp_path / "d", threads=1).export("m.safetensors")
    def run(self):
        seen["bench"] = self.cfg.threads
        return {}

    monkeypatch.setattr(bench.Bench, "run", run)
    demo_module.Demo(tmp_path / "e", threads=1).bench("m.safetensors", {
        "fp32": {"file": "a.onnx"}, "int8": {"file": "b.onnx"}})
    assert seen == {"export": 1, "bench": 1}


def test_export_runs_its_parity_checks_on_the_threads_asked_for(cli, monkeypatch, tmp_path,
                                                                digits_teacher):
    from kdtool.export import runners

    asked: list = []
    real = runners.OrtRunner.__init__

    def init(self, path, *args, threads=None, **kwargs):
        asked.append(threads)
        real(self, path, *args, threads=threads, **kwargs)

    monkeypatch.setattr(runners.OrtRunner, "__init__", init)
    r = cli("export", digits_teacher, "--onnx", tmp_path / "m.onnx", "--threads", 1, "--json")
    assert r.code == 0, r.err
    assert asked and set(asked) == {1}
