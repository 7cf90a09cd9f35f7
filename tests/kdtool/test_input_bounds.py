"""Values past any sense (NaN, inf, 10**16, an empty path, a terabyte batch) are one-line
errors, not tracebacks from deep in torch or numpy (from a fuzzing audit of every command)."""

from __future__ import annotations

import pytest
import torch

from kdtool.errors import KdtoolError


def _one_line(r, *fragments):
    assert r.code == 1, (r.code, r.err)
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err
    for f in fragments:
        assert f in r.err, (f, r.err)


@pytest.mark.parametrize(("args", "message"), [
    # NaN passed every range check; --lr inf wrote a checkpoint of NaNs with exit 0
    (["distill", "--teacher", "t.safetensors", "--lr", "inf"],
     "--lr must be a finite number, not inf"),
    (["distill", "--teacher", "t.safetensors", "--temperature", "nan"],
     "--temperature must be a finite number, not nan"),
    (["bench", "m.onnx", "--min-accuracy", "nan"], "--min-accuracy must be a finite number"),
    (["calibrate", "s.safetensors", "--data", "digits", "--tolerance", "nan"],
     "--tolerance must be a finite number"),
    # integers that overflowed C types in torch and numpy
    (["train", "--data", "digits", "--seed", "10000000000000000"],
     "--seed 10000000000000000 is out of range"),
    (["eval", "m.safetensors", "--data", "digits", "--threads", "1000000000000"],
     "--threads 1000000000000 is out of range"),
    # more threads than any machine: torch crashed at 100,000
    (["eval", "m.safetensors", "--data", "digits", "--threads", "100000"],
     "--threads 100000 is more than kdtool runs (1024)"),
    (["serve", "m.onnx", "--workers", "100000"], "--workers"),
    # an infinite batching delay killed the batch worker and hung the client
    (["serve", "m.onnx", "--max-delay-ms", "1e300"], "--max-delay-ms"),
    (["serve", "m.onnx", "--body-timeout", "0"], "--body-timeout 0 is not 0.1 to 3600 seconds"),
    (["train", "--data", "digits", "--image-size", "1,100000"],
     "--image-size '1,100000' is more than 16384 pixels a side"),
    # 1e308 overflowed the T^2-scaled loss, which then read as divergence ("lower --lr")
    (["distill", "--teacher", "{teacher}", "--temperature", "1e308", "--loss", "kl"],
     "--temperature must be above 0 and at most 100, got 1e+308"),
    (["distill", "--teacher", "{teacher}", "--temperature", "0"],
     "--temperature must be above 0"),
    (["models", "--timm", ""], "--timm needs a pattern"),  # '' listed all, for minutes
    (["analyze", "toy", "--noise-scale", "-1"], "--noise-scale is a standard deviation"),
])
def test_senseless_numbers_are_refused_in_one_line(cli, tmp_path, monkeypatch, digits_teacher,
                                                  args, message):
    monkeypatch.chdir(tmp_path)
    _one_line(cli(*[str(a).format(teacher=digits_teacher) for a in args]), message)


@pytest.mark.parametrize("args", [
    ["train", "--data", "digits", "--out", ""],
    ["distill", "--teacher", "t.safetensors", "--out", ""],
    ["analyze", "toy", "--out", ""],
])
def test_an_empty_output_path_is_refused(cli, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    _one_line(cli(*args), "names no file", "pass a file")


def test_an_empty_export_path_is_refused(cli, digits_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line(cli("export", digits_teacher, "--onnx", ""), "ONNX model path '.' names no file")


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 256000000000 bytes."),
    MemoryError("Unable to allocate 7.28 TiB for an array"),
])
def test_running_out_of_memory_is_one_line_and_a_bug_keeps_its_traceback(
        cli, digits_teacher, monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr("kdtool.cli.train_cmds._eval_checkpoint", fail)
    r = cli("eval", digits_teacher, "--data", "digits:test")
    _one_line(r, "error: out of memory: ", "use a smaller --batch-size")
    assert "enforce fail" not in r.err  # torch's C++ source location is no help

    def bug(*args, **kwargs):
        raise RuntimeError("shape '[2, 3]' is invalid for input of size 5")

    monkeypatch.setattr("kdtool.cli.train_cmds._eval_checkpoint", bug)
    with pytest.raises(RuntimeError, match="is invalid for input"):
        cli("eval", digits_teacher, "--data", "digits:test")


def test_a_diverged_model_is_never_saved(tmp_path):
    from kdtool.models import create_model
    from kdtool.runstate import RunCheckpoint

    model = create_model("tiny_cnn", num_classes=10, in_chans=1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    ckpt = RunCheckpoint(tmp_path / "m.safetensors", force=False, resume=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KdtoolError, match="the run diverged at epoch 3: 'conv1.weight' holds "
                                          "NaN or infinite values"):
        ckpt.save({}, 2, 0.0, [], model, opt, None)
    assert not (tmp_path / "m.safetensors").exists()


def test_bench_export_dir_that_is_a_file_and_long_model_lists(cli, digits_teacher, tmp_path):
    taken = tmp_path / "exports"
    taken.write_text("a file")
    _one_line(cli("bench", digits_teacher, "--formats", "onnx", "--export-dir", taken),
              "--export-dir", "is a file")
    from kdtool.errors import check_choice

    with pytest.raises(KdtoolError) as e:  # no guess among 40: where to look, not the list
        check_choice("zzzz", [f"model_{i}" for i in range(40)], "timm model",
                     "kdtool models --timm 'PATTERN' lists them")
    assert e.value.hint == "40 to choose from: kdtool models --timm 'PATTERN' lists them"


def test_empty_files_and_names_and_list_items_say_so(cli, digits_teacher, tmp_path):
    empty = tmp_path / "m.onnx"
    empty.write_bytes(b"")
    _one_line(cli("info", empty), "ONNX model", "is empty (0 bytes)")  # not "no metadata"
    (tmp_path / "s.safetensors").write_bytes(b"")
    _one_line(cli("eval", tmp_path / "s.safetensors", "--data", "digits"), "is empty (0 bytes)")
    _one_line(cli("eval", digits_teacher, "--data", ""), "a dataset was given as an empty string")
    _one_line(cli("eval", digits_teacher, "--data", "digits", "--mean", "0.5,,0.5", "--std",
                  "1,1,1"), "--mean '0.5,,0.5' has an empty item")
    onnx = tmp_path / "t.onnx"  # an ONNX where a checkpoint goes: said, not "corrupt"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")
    _one_line(cli("convert", onnx, "--arch", "tiny_cnn", "--out", tmp_path / "c.safetensors"),
              "is an ONNX model, not a model checkpoint", "run it as it is")
