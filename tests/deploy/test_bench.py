"""kdtool bench: timing statistics, backends and their honesty, accuracy, reports, errors."""

from __future__ import annotations

import json
import sys
import time
import warnings

import numpy as np
import onnx
import pytest
import torch

from kdtool.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from kdtool.data import load_data
from kdtool.deploy import backends, memory
from kdtool.deploy.bench import Bench, BenchConfig, cell_stats, clip_outliers, time_calls
from kdtool.evaluate import evaluate
from kdtool.export.metadata import OnnxInfo, write_info
from kdtool.models import create_model

FAST = ("--min-time", "0.03", "--min-iters", "5", "--warmup", "2")


def export_onnx(checkpoint, out, batch: int | None = None):
    """The checkpoint as ONNX with kdtool metadata (TorchScript exporter: ~10x faster to
    export than dynamo, and the graph is the same for these models)."""
    model, meta = load_checkpoint(checkpoint)
    h, w = meta.input_size
    x = torch.randn(batch or 2, meta.in_chans, h, w)
    dynamic = None if batch else {"input": {0: "N"}, "logits": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(out),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=dynamic,
        )
    proto = onnx.load(str(out))
    write_info(
        proto,
        OnnxInfo(
            input_name="input",
            output_name="logits",
            in_chans=meta.in_chans,
            input_size=list(meta.input_size),
            mean=meta.mean,
            std=meta.std,
            num_classes=meta.num_classes,
            class_names=meta.class_names,
            arch=meta.arch,
            batch=batch,
            source=checkpoint.name,
        ),
    )
    onnx.save(proto, str(out))
    return out


@pytest.fixture(scope="module")
def models(digits_teacher, tmp_path_factory):
    """The trained digits teacher, its ONNX, a static-batch ONNX and an untrained tiny ONNX."""
    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    tiny = create_model("tiny_cnn", num_classes=10, in_chans=1).eval()
    teacher_meta = load_checkpoint(digits_teacher)[1]
    meta = ModelMeta(
        arch="tiny_cnn",
        num_classes=10,
        in_chans=1,
        input_size=[8, 8],
        mean=teacher_meta.mean,
        std=teacher_meta.std,
        class_names=teacher_meta.class_names,
    )
    tiny_ckpt = save_checkpoint(d / "tiny.safetensors", tiny, meta, force=False)
    return {
        "teacher": digits_teacher,
        "onnx": export_onnx(digits_teacher, d / "teacher.onnx"),
        "static": export_onnx(digits_teacher, d / "static4.onnx", batch=4),
        "tiny": export_onnx(tiny_ckpt, d / "tiny.onnx"),
        "dir": d,
    }


# ----------------------------------------------------------------------------- statistics


def test_clip_outliers_drops_far_spikes_at_most_one_percent():
    rng = np.random.default_rng(0)
    base = 1.0 + 0.01 * rng.standard_normal(1000)
    spiky = base.copy()
    spiky[[5, 500, 900]] = 10.0  # three far-out spikes: all go
    kept, n = clip_outliers(spiky)
    assert n == 3 and len(kept) == 997 and kept.max() < 1.1
    storm = base.copy()
    storm[:50] = 10.0  # 5% slow calls are a real tail, not outliers: at most 1% go
    kept, n = clip_outliers(storm)
    assert n == 10 and kept.max() == 10.0
    assert clip_outliers(base)[1] == 0  # a normal spread loses nothing
    assert clip_outliers(np.array([1.0, 1.0, 50.0]))[1] == 0  # too few to judge


def test_cell_stats_are_ordered_and_consistent():
    times = np.random.default_rng(1).gamma(4.0, 0.001, size=400)
    s = cell_stats(times, batch=8)
    lat = s["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert s["throughput"] == pytest.approx(8 * 1e3 / lat["mean"])
    assert s["iters"] == 400 and s["clipped"] <= 4


def test_time_calls_honours_warmup_min_time_and_min_iters():
    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(0.002)

    start = time.perf_counter()
    times, warmed = time_calls(fn, 1, warmup=3, min_time=0.05, min_iters=2)
    wall = time.perf_counter() - start
    assert len(calls) == len(times) + 3 and warmed == 3
    # The stop rule is on the wall clock of the timed phase; the per-call times sum to a
    # little less (loop overhead between calls), so the sum gets 0.1 ms per call of slack.
    assert wall >= 0.05 and times.sum() >= 0.05 - 1e-4 * len(times)
    assert np.all(times >= 0.002)
    calls.clear()
    times, warmed = time_calls(fn, 1, warmup=0, min_time=1e-6, min_iters=7)
    assert len(times) == 7 == len(calls) and warmed == 0
    calls.clear()  # a slow call: warm-up stops after half of min_time, and says how many ran
    times, warmed = time_calls(fn, 1, warmup=10, min_time=0.003, min_iters=1)
    assert warmed == 1 and len(calls) == 1 + len(times)


# ----------------------------------------------------------------------------- end to end


def test_bench_checkpoint_and_onnx_end_to_end(cli, models, tmp_path, monkeypatch):
    from kdtool.deploy import bench_report

    # Cells of five calls on a busy machine can be noisy enough for an "unstable" note,
    # which would renumber the notes checked below (that note has a test of its own).
    monkeypatch.setattr(bench_report, "UNSTABLE_MEAN_OVER_P50", float("inf"))
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    r = cli(
        "bench",
        models["teacher"],
        models["onnx"],
        "--backends",
        "torch-cpu,ort-cpu,ort-cuda",
        "--batch",
        "1,16",
        *FAST,
        "--data",
        "digits:test",
        "--markdown",
        md,
        "--plot",
        png,
        "--json",
    )
    assert r.code == 0, r.err
    res = r.json()
    assert {"command", "machine", "settings", "models", "rows", "reference", "ok"} <= set(res)
    assert res["ok"] and res["settings"]["batches"] == [1, 16]
    assert [m["kind"] for m in res["models"]] == ["checkpoint", "onnx"]
    rows = {(row["backend"], row["batch"]): row for row in res["rows"]}
    assert set(rows) == {(b, n) for b in ("torch-cpu", "ort-cpu", "ort-cuda") for n in (1, 16)}

    # kdtool bench's torch accuracy is kdtool eval's, exactly; ONNX Runtime agrees closely.
    model, meta = load_checkpoint(models["teacher"])
    data = load_data("digits:test")
    ref = evaluate(model, data, meta.mean, meta.std, batch_size=16)
    torch_acc = rows["torch-cpu", 16]["accuracy"]
    assert torch_acc["images"] == 360 and torch_acc["batch"] == 16
    assert torch_acc["correct"] == round(ref["top1"] * 360 / 100)
    assert torch_acc["top1"] == pytest.approx(ref["top1"], abs=1e-4) and ref["top1"] > 90
    assert abs(rows["ort-cpu", 1]["accuracy"]["top1"] - ref["top1"]) <= 0.3  # <= 1 image
    assert res["reference"] == {
        "model": models["teacher"].name,
        "backend": "torch-cpu",
        "top1": torch_acc["top1"],
    }

    for backend in ("torch-cpu", "ort-cpu"):
        for batch in (1, 16):
            row = rows[backend, batch]
            lat = row["latency_ms"]
            assert row["status"] == "ok" and row["reason"] == ""
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert row["throughput"] == pytest.approx(batch * 1e3 / lat["mean"])
            assert row["iters"] >= 5 and row["peak_rss_mb"] >= 0
            assert (
                row["file_bytes"]
                == (models["teacher"] if backend == "torch-cpu" else models["onnx"]).stat().st_size
            )
    assert rows["ort-cpu", 1]["providers"] == ["CPUExecutionProvider"]
    assert rows["torch-cpu", 1]["device"] == "cpu"

    # Asked for CUDA on a CPU-only onnxruntime: a row that says so, never CPU numbers.
    for batch in (1, 16):
        row = rows["ort-cuda", batch]
        assert row["status"] == "unavailable" and "CUDAExecutionProvider" in row["reason"]
        assert row["latency_ms"] is None and row["throughput"] is None

    text = md.read_text()
    assert "| model | backend | runs on | batch | status | p50 ms |" in text
    assert f"| {models['onnx'].name} | ort-cpu | CPU | 16 | ok |" in text
    assert f"| {models['teacher'].name} | torch-cpu | CPU | 16 | ok |" in text  # not "cpu"
    assert "unavailable [1]" in text and "1. teacher.onnx ort-cuda (unavailable)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # Outputs are never overwritten without --force, and the refusal comes before measuring.
    again = cli("bench", models["onnx"], "--batch", "1", *FAST, "--markdown", md)
    assert again.code == 1 and "already exists" in again.err and "--force" in again.err
    table = cli("bench", models["onnx"], "--batch", "1", *FAST, "--markdown", md, "--force")
    assert table.code == 0 and "ort-cpu" in table.out and "ok" in table.out
    assert "ort-cpu" in md.read_text() and f"wrote Markdown table {md}" in table.err
    # an accuracy no row can have is refused before measuring
    r = cli("bench", models["onnx"], "--data", "digits:test", "--min-accuracy", "101")
    assert r.code == 1 and "--min-accuracy is a top-1 percentage, 0 to 100" in r.err
    assert "ort-cpu" not in r.out
    # one file for two reports: the plot would replace the table, --force or not
    same = cli("bench", models["onnx"], "--batch", "1", *FAST, "--markdown", png, "--plot",
               png, "--force")
    assert same.code == 1 and "--markdown and --plot both name" in same.err, same.err


def test_a_silent_provider_fallback_is_reported_as_unavailable(models, monkeypatch):
    # An onnxruntime that lists CUDA but cannot start it falls back to CPU with only a
    # warning (here: the CPU build, told that CUDA is there). The row must say so.
    import onnxruntime as ort

    listed = [*ort.get_available_providers(), "CUDAExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    model = backends.load_model(models["onnx"])
    with pytest.raises(backends.BackendUnavailable, match="did not activate CUDAExecution"):
        backends.make_runner(model, "ort-cuda")
    res = Bench(
        BenchConfig(models=[str(models["onnx"])], backends=["ort-cuda"], min_time=0.01, min_iters=2)
    ).run()
    assert [r["status"] for r in res["rows"]] == ["unavailable"] and not res["ok"]
    reason = res["rows"][0]["reason"]
    assert "CUDAExecutionProvider" in reason and "CPUExecutionProvider instead" in reason


def test_accuracy_checks_fail_rows_and_exit_1(cli, models):
    # An untrained network against the trained reference: far beyond --max-drop.
    r = cli(
        "bench",
        models["teacher"],
        models["tiny"],
        "--backends",
        "torch-cpu,ort-cpu",
        "--batch",
        "8",
        *FAST,
        "--data",
        "digits:test",
        "--limit",
        "100",
        "--max-drop",
        "2",
        "--json",
    )
    assert r.code == 1 and "did not pass" in r.err
    # the one JSON object says so too, as every failure's object does
    assert "did not pass" in r.json()["error"] and r.json()["hint"]
    rows = {row["backend"]: row for row in r.json()["rows"]}
    assert rows["torch-cpu"]["status"] == "ok"
    assert rows["torch-cpu"]["accuracy"]["images"] == 100
    tiny = rows["ort-cpu"]
    assert tiny["status"] == "accuracy failed" and "--max-drop 2" in tiny["reason"]
    assert tiny["accuracy"]["drop"] > 2 and tiny["latency_ms"] is not None
    r = cli(
        "bench",
        models["tiny"],
        "--batch",
        "8",
        *FAST,
        "--data",
        "digits:test",
        "--limit",
        "50",
        "--min-accuracy",
        "50",
        "--json",
    )
    row = r.json()["rows"][0]
    assert r.code == 1 and row["status"] == "accuracy failed"
    assert "< --min-accuracy 50%" in row["reason"]


def test_formats_export_on_the_fly_and_failed_exports_are_rows(cli, models, tmp_path):
    out = tmp_path / "exports"
    r = cli(
        "bench",
        models["dir"] / "tiny.safetensors",
        "--formats",
        "torch,onnx",
        "--export-dir",
        out,
        "--batch",
        "2",
        *FAST,
        "--data",
        "digits:test",
        "--limit",
        "40",
        "--json",
    )
    assert r.code == 0, r.err
    res = r.json()
    got = [(row["model"], row["backend"], row["status"]) for row in res["rows"]]
    assert got == [("tiny.safetensors", "torch-cpu", "ok"), ("tiny.onnx", "ort-cpu", "ok")]
    assert [e["status"] for e in res["exports"]] == ["ok", "ok"]
    assert (out / "tiny.onnx").is_file()
    # the export is the checkpoint: same predictions on the same images
    assert res["rows"][1]["accuracy"]["correct"] == res["rows"][0]["accuracy"]["correct"]
    # A rerun reuses the export of the same checkpoint; one of other weights is refused.
    written = (out / "tiny.onnx").stat().st_mtime_ns
    again = cli("bench", models["dir"] / "tiny.safetensors", "--formats", "onnx",
                "--export-dir", out, "--batch", "2", *FAST, "--json")
    assert again.code == 0 and [e["status"] for e in again.json()["exports"]] == ["reused"]
    assert (out / "tiny.onnx").stat().st_mtime_ns == written and "bench: reusing" in again.err
    other = tmp_path / "other" / "tiny.safetensors"  # same name, other weights
    model, meta = load_checkpoint(models["dir"] / "tiny.safetensors")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(other, model, meta, force=False)
    r = cli("bench", other, "--formats", "onnx", "--export-dir", out, "--batch", "2", *FAST,
            "--json")
    assert r.code == 1 and "export failed" in r.err  # a failed export is a row, not a stop
    assert r.json()["exports"][0]["status"] == "export failed"
    assert "already exists" in r.json()["exports"][0]["reason"]
    assert [(row["model"], row["status"]) for row in r.json()["rows"]] == [
        ("tiny.onnx", "export failed")]
    bad = cli("bench", models["onnx"], "--formats", "onnx8")
    assert bad.code == 1 and "unknown bench format 'onnx8'" in bad.err
    bad = cli("bench", models["onnx"], "--formats", "triton")  # no runner executes it
    assert bad.code == 1 and "unknown bench format 'triton'" in bad.err
    bad = cli("bench", models["dir"] / "tiny.safetensors", "--formats", "torch,onnx",
              "--calib-data", "digits")
    assert bad.code == 1 and "--calib-data calibrates INT8 exports, and --formats " \
        "torch,onnx has none" in bad.err


@pytest.mark.parametrize(
    ("backend", "device", "providers", "shown"),
    [
        ("torch-cpu", "cpu", [], "CPU"),
        ("ort-cpu", "cpu", ["CPUExecutionProvider"], "CPU"),
        ("torch-cuda", "cuda", [], "CUDA"),
        ("torch-cuda", "cuda:1", [], "CUDA:1"),
        ("ort-cuda", "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA+CPU"),
        ("trt", "NVIDIA H100", [], "TensorRT"),
        ("torch-cpu", None, [], ""),  # it did not run
    ],
)
def test_the_runs_on_column_names_devices_one_way(backend, device, providers, shown):
    """A torch row said "cpu" where an ONNX Runtime row said "CPU", in one column."""
    from kdtool.deploy.bench_report import runs_on

    assert runs_on({"backend": backend, "device": device, "providers": providers}) == shown


def test_onnx_runtime_backends_and_serve_providers_come_from_one_table():
    """serve once took '--provider tensorrt' where bench and predict took 'ort-trt', from
    tables of their own."""
    from kdtool.deploy.backends import BACKENDS
    from kdtool.errors import KdtoolError
    from kdtool.export.ort_session import ORT_TARGETS, ort_target

    ort = {b: providers for b, (kind, providers) in BACKENDS.items() if kind == "onnx"}
    assert ort == {f"ort-{t}": providers for t, providers in ORT_TARGETS.items()}
    assert all(ps[-1] != "CPUExecutionProvider" for ps in ORT_TARGETS.values() if len(ps) > 1)
    assert [ort_target(n) for n in ("cpu", "CUDA", "trt", "tensorrt")] == \
        ["cpu", "cuda", "trt", "trt"]
    with pytest.raises(KdtoolError, match="did you mean 'cuda'"):
        ort_target("gpu")


def test_checkpoints_of_one_name_in_two_folders_export_and_report_apart(cli, models,
                                                                         tmp_path):
    """c1/s and c2/s once both exported to s.onnx: the second replaced the first, and the
    first's ONNX row scored the second model."""
    model, meta = load_checkpoint(models["teacher"])
    save_checkpoint(tmp_path / "c1" / "s.safetensors", model, meta, force=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5).add_(0.05 * torch.randn_like(p))  # other weights, other answers
    save_checkpoint(tmp_path / "c2" / "s.safetensors", model, meta, force=False)
    out = tmp_path / "exports"
    r = cli("bench", tmp_path / "c1" / "s.safetensors", tmp_path / "c2" / "s.safetensors",
            "--formats", "torch,onnx", "--export-dir", out, "--batch", "2", *FAST,
            "--data", "digits:test", "--limit", "120", "--json")
    assert r.code == 0, r.err
    rows = {row["model"]: row["accuracy"]["correct"] for row in r.json()["rows"]}
    assert list(rows) == ["c1/s.safetensors", "c1/s.onnx", "c2/s.safetensors", "c2/s.onnx"]
    assert rows["c1/s.onnx"] == rows["c1/s.safetensors"] != rows["c2/s.safetensors"]
    assert rows["c2/s.onnx"] == rows["c2/s.safetensors"]
    assert (out / "c1" / "s.onnx").is_file() and (out / "c2" / "s.onnx").is_file()


def test_bench_formats_come_from_the_export_table():
    from kdtool.deploy.bench_export import BENCH_FORMATS, TORCH, Exported
    from kdtool.export.formats import FORMATS

    assert list(BENCH_FORMATS) == ["onnx", "onnx-fp16", "onnx-int8", "tensorrt"]
    assert all(BENCH_FORMATS[n] is FORMATS[n] for n in BENCH_FORMATS)
    backends = {f: Exported(None, f, None).backend for f in [TORCH, *BENCH_FORMATS]}
    assert backends == {"torch": "torch-cpu", "onnx": "ort-cpu", "onnx-fp16": "ort-cpu",
                        "onnx-int8": "ort-cpu", "tensorrt": "trt"}


def test_int8_rows_on_a_cpu_with_overflowing_int8_kernels_say_so(cli, models, tmp_path,
                                                                  monkeypatch):
    """Where the weight probe fails (x86 without VNNI), an INT8 row runs exact on uint8
    weights; its speed is then no guide to a VNNI or ARM target, and the table says so."""
    import kdtool.export.cpu_int8 as cpu_int8

    monkeypatch.setattr(cpu_int8, "int8_weights_exact", lambda: False)
    r = cli("bench", models["dir"] / "tiny.safetensors", "--formats", "onnx-int8",
            "--calib-data", "digits", "--export-dir", tmp_path, "--batch", "2", *FAST,
            "--data", "digits:test", "--limit", "40", "--markdown", tmp_path / "b.md")
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    assert "ok [1]" in text and "weights run as uint8" in text and "time it on the target" in text
    assert "weights run as uint8" in (tmp_path / "b.md").read_text()
    monkeypatch.setattr(cpu_int8, "int8_weights_exact", lambda: True)
    r = cli("bench", tmp_path / "tiny.int8.onnx", "--batch", "2", *FAST, "--json")
    row = r.json()["rows"][0]
    assert r.code == 0 and row["status"] == "ok" and "int8_weights" not in row["details"]


def test_static_batch_onnx_and_padded_accuracy(cli, models):
    r = cli(
        "bench",
        models["static"],
        "--batch",
        "1,4",
        *FAST,
        "--data",
        "digits:test",
        "--limit",
        "37",
        "--json",
    )  # 37 = 9 batches of 4 + 1 image padded to 4
    assert r.code == 0, r.err
    rows = {row["batch"]: row for row in r.json()["rows"]}
    assert rows[1]["status"] == "unavailable" and "static batch of 4" in rows[1]["reason"]
    assert rows[4]["status"] == "ok" and rows[4]["accuracy"]["images"] == 37
    assert rows[4]["accuracy"]["batch"] == 4


def test_nhwc_models_get_nhwc_input():
    model = backends.BenchModel(
        path=backends.Path("m.onnx"),
        kind="onnx",
        file_bytes=1,
        in_chans=3,
        input_size=[4, 5],
        mean=[0.5] * 3,
        std=[0.5] * 3,
        num_classes=2,
        layout="NHWC",
        input_dtype="float16",
    )
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    y = model.prepare(x)
    assert y.shape == (2, 4, 5, 3) and y.dtype == np.float16 and y.flags.c_contiguous
    assert y[1, 2, 3, 0] == x[1, 0, 2, 3]


def test_a_tensorrt_format_that_cannot_run_here_is_unavailable_and_not_made(cli, models,
                                                                             tmp_path):
    from kdtool.deploy import backends

    problem = backends.backend_problem("trt")
    if problem is None:
        pytest.skip("this machine runs TensorRT")
    out = tmp_path / "exports"
    r = cli("bench", models["dir"] / "tiny.safetensors", "--formats", "onnx,tensorrt",
            "--export-dir", out, "--batch", "2", *FAST, "--json")
    assert r.code == 0, r.err  # nothing failed: an engine is simply not for this machine
    rows = [(row["backend"], row["status"], row["reason"]) for row in r.json()["rows"]]
    assert rows == [("ort-cpu", "ok", ""), ("trt", "unavailable", problem)]
    assert [e["status"] for e in r.json()["exports"]] == ["ok", "unavailable"]
    assert sorted(p.name for p in out.iterdir()) == ["tiny.onnx"]  # no spare .trt.onnx


def test_tensorrt_engine_without_tensorrt_or_gpu_is_an_unavailable_row(cli, models, tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not an engine")  # never opened: the backend is unavailable first
    bad = cli("bench", plan)
    assert bad.code == 1 and "has no kdtool metadata next to it" in bad.err
    info = OnnxInfo(
        input_name="input",
        output_name="logits",
        in_chans=1,
        input_size=[8, 8],
        mean=[0.5],
        std=[0.5],
        num_classes=10,
    )
    (tmp_path / "m.plan.json").write_text(
        json.dumps({"tensorrt": "10.x", "kdtool": json.loads(info.to_json())})
    )
    problem = backends.backend_problem("trt")
    if problem is None:
        pytest.skip("TensorRT and a GPU are here: the gpu tests cover engines")
    r = cli("bench", plan, "--batch", "1", *FAST, "--json")
    row = r.json()["rows"][0]
    assert r.code == 1 and row["backend"] == "trt" and row["status"] == "unavailable"
    assert row["reason"] == problem and "no backend could run" in r.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx"], "model 'missing.onnx' does not exist"),
        (
            ["{onnx}", "--backends", "ort-cpux"],
            "unknown backend 'ort-cpux' (did you mean 'ort-cpu'?)",
        ),
        (["{onnx}", "--backends", "torch-cpu"], "backend 'torch-cpu' runs kdtool checkpoints"),
        (["{onnx}", "--batch", "1,x"], "--batch '1,x' is not a comma-separated list of integers"),
        (["{onnx}", "--batch", "0"], "batch sizes must be positive"),
        (["{onnx}", "--max-drop", "1"], "need --data"),
        (["{onnx}", "--limit", "10"], "--limit 10 picks images of --data"),
        (["{onnx}", "--plot", "out.jpg"], "cannot tell the plot format of 'out.jpg'"),
        (["{onnx}", "--data", "digits:tset"], "did you mean 'digits:test'"),
        (["model.h5"], "is not a model file kdtool can run"),
        (["{plain}"], "plain.onnx' has no kdtool metadata"),
        (["{onnx}", "--threads", "-1"], "--threads must be at least 0, not -1"),
    ],
)
def test_errors_are_one_clear_line(cli, models, tmp_path, args, message):
    plain = tmp_path / "plain.onnx"
    proto = onnx.load(str(models["onnx"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    args = [a.format(onnx=models["onnx"], plain=plain) for a in args]
    r = cli("bench", *args, *FAST)
    assert r.code == 1 and message in r.err and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1


@pytest.mark.gpu
def test_torch_cuda_row_measures_gpu_memory(cli, models):
    r = cli(
        "bench",
        models["teacher"],
        "--backends",
        "torch-cpu,torch-cuda",
        "--batch",
        "1,64",
        *FAST,
        "--data",
        "digits:test",
        "--json",
    )
    assert r.code == 0, r.err
    rows = {(row["backend"], row["batch"]): row for row in r.json()["rows"]}
    gpu = rows["torch-cuda", 64]
    assert gpu["status"] == "ok" and gpu["device"] == "cuda" and gpu["gpu_mem_mb"] > 0
    assert gpu["gpu_mem_kind"] == "torch peak allocated"
    # fp32 on both: at most a few images may flip between CPU and GPU kernels
    assert abs(gpu["accuracy"]["top1"] - rows["torch-cpu", 64]["accuracy"]["top1"]) <= 1


def test_plot_without_matplotlib_is_refused_before_the_bench(cli, models, tmp_path,
                                                             monkeypatch):
    import kdtool.deploy.bench as bench_mod

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(bench_mod.Bench, "run", lambda self: pytest.fail("bench ran"))
    r = cli("bench", models["onnx"], "--plot", tmp_path / "b.png", *FAST)
    assert r.code == 1 and "--plot draws its plots with matplotlib" in r.err
    assert "pip install 'kdtool[plot]'" in r.err


@pytest.mark.parametrize("where", ["load", "run"])
def test_a_runtime_failure_is_a_failed_row_and_a_bug_keeps_its_traceback(models, monkeypatch,
                                                                          where):
    import kdtool.deploy.bench as bench_mod

    real = bench_mod.make_runner

    def runner_that_raises(error):
        def make(*args, **kwargs):
            if where == "load":
                raise error
            runner = real(*args, **kwargs)
            runner.infer = lambda x: (_ for _ in ()).throw(error)
            return runner
        return make

    cfg = BenchConfig(models=[str(models["onnx"])], backends=["ort-cpu"], batches=(1,),
                      min_time=0.01, min_iters=2, warmup=1)
    monkeypatch.setattr(bench_mod, "make_runner",
                        runner_that_raises(RuntimeError("the runtime says no")))
    (row,) = Bench(cfg).run()["rows"]
    assert row["status"] == "failed"
    assert row["reason"] == f"{where} failed: RuntimeError: the runtime says no"
    monkeypatch.setattr(bench_mod, "make_runner",
                        runner_that_raises(AttributeError("a kdtool bug")))
    with pytest.raises(AttributeError, match="a kdtool bug"):
        Bench(cfg).run()


def test_an_int8_export_is_reused_only_with_the_same_calibration_data(cli, models, tmp_path):
    out, ckpt = tmp_path / "exports", models["dir"] / "tiny.safetensors"

    def bench(*extra):
        r = cli("bench", ckpt, "--formats", "onnx-int8", "--export-dir", out, "--batch", "2",
                *FAST, "--json", *extra)
        status = r.json()["exports"][0]["status"]
        assert r.code == (1 if status == "export failed" else 0), r.err
        return status

    assert bench("--calib-data", "digits") == "ok"
    assert bench("--calib-data", "digits") == "reused"
    assert bench("--calib-data", "digits:test") == "export failed"  # other data: not reused,
    assert bench("--calib-data", "digits:test", "--force") == "ok"  # and kept without --force


@pytest.mark.skipif(not memory.MemoryProbe().host, reason="no resettable RSS high-water mark")
def test_peak_memory_is_the_cells_own_and_grows_with_the_batch(cli, graph_onnx):
    # One 3->8 conv at 256x256: at batch 64 its input is 50 MB and its output 134 MB (bench
    # reports MB of 10**6 bytes, like its file sizes).
    path = graph_onnx("wide.onnx", in_chans=3, size=256, num_classes=10)
    r = cli("bench", path, "--backends", "ort-cpu", "--batch", "1,64", *FAST, "--json")
    assert r.code == 0, r.err
    peak = {row["batch"]: row["peak_rss_mb"] for row in r.json()["rows"]}
    input_mb, conv_mb = 64 * 3 * 256**2 * 4 / 1e6, 64 * 8 * 256**2 * 4 / 1e6
    # What the batch-64 call holds at once (ONNX Runtime's arena keeps more: ~930 MB here),
    # less 1 MB: in-process RSS is indicative (pages the process freed after the baseline
    # read ~0.1 MB low here).
    held_mb = input_mb + conv_mb - 1
    assert peak[64] >= held_mb
    # The batch-1 cell counts its own memory from the backend's load, not the process's
    # (torch and the test suite hold hundreds of MB).
    assert peak[1] < input_mb
    # Without ONNX Runtime's arena the same calls need less at their peak (bench/ort_arena.py:
    # in fresh processes 472 MB against 616, and 88 against 616 held afterwards).
    r = cli("bench", path, "--backends", "ort-cpu", "--batch", "64", *FAST, "--no-memory-arena",
            "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert res["settings"]["memory_arena"] is False
    (row,) = res["rows"]
    assert held_mb <= row["peak_rss_mb"] < peak[64], (row["peak_rss_mb"], peak)


def test_peak_memory_is_in_the_megabytes_of_the_file_size_column(monkeypatch):
    """The table shows peak memory and file size side by side, both as MB (10**6 bytes)."""
    probe = memory.MemoryProbe()
    probe.host, probe.base_rss_kb = True, 1000
    # /proc reports KiB: 97,656 KiB above the base is 99,999,744 bytes (95.4 MiB).
    monkeypatch.setattr(memory, "_status_kb", lambda field: 1000 + 97_656)
    assert probe.cell_peak()["peak_rss_mb"] == pytest.approx(100.0, abs=0.001)


@pytest.mark.skipif(not memory.MemoryProbe().host, reason="no resettable RSS high-water mark")
def test_a_small_batch_is_not_charged_the_memory_of_a_larger_one_or_of_the_accuracy_run(
        cli, graph_onnx):
    """ONNX Runtime's arena keeps its largest call's memory: the accuracy pass (at the
    largest batch) and a larger batch given first once made batch 1 read as batch 64."""
    path = graph_onnx("wide.onnx", in_chans=3, size=256, num_classes=10)
    r = cli("bench", path, "--backends", "ort-cpu", "--batch", "64,1", *FAST, "--data",
            "digits:test", "--limit", "64", "--json")
    assert r.code == 0, r.err
    rows = r.json()["rows"]
    assert [row["batch"] for row in rows] == [64, 1]  # reported in the order asked
    peak = {row["batch"]: row["peak_rss_mb"] for row in rows}
    assert peak[1] < 64 * 3 * 256**2 * 4 / 1e6 < peak[64], peak  # below batch 64's input
    assert all(row["accuracy"]["images"] == 64 for row in rows)


def test_each_backends_runtime_starts_before_any_model_is_measured(models, monkeypatch):
    """The first model of a backend once carried the runtime's own start-up (15 MB of ONNX
    Runtime): a throwaway session of it runs before the baseline, once per backend."""
    from kdtool.deploy import bench as bench_module

    events = []
    real_make = bench_module.make_runner

    def make(model, backend, *args):
        events.append(("load", model.path.name, backend))
        return real_make(model, backend, *args)

    monkeypatch.setattr(bench_module, "make_runner", make)
    monkeypatch.setattr(bench_module.MemoryProbe, "start_backend",
                        lambda self, backend: events.append(("baseline", backend)))
    Bench(BenchConfig(models=[str(models["onnx"]), str(models["tiny"]), str(models["teacher"])],
                      backends=["ort-cpu", "torch-cpu"], min_time=0.01, min_iters=2,
                      warmup=0)).run()
    assert events == [
        ("load", "teacher.onnx", "ort-cpu"),  # the runtime's start, not measured
        ("baseline", "ort-cpu"), ("load", "teacher.onnx", "ort-cpu"),
        ("baseline", "ort-cpu"), ("load", "tiny.onnx", "ort-cpu"),
        ("load", "teacher.safetensors", "torch-cpu"),
        ("baseline", "torch-cpu"), ("load", "teacher.safetensors", "torch-cpu"),
    ]


def test_unstable_cells_warmup_calls_and_sample_sizes_are_stated():
    from kdtool.deploy.bench_report import _legend, runtime_note

    lat = {"p50": 0.4, "p90": 1.0, "p99": 140.0, "mean": 11.7, "min": 0.3, "max": 150.0,
           "std": 30.0}
    note = runtime_note({"latency_ms": lat, "iters": 40, "details": {}})
    assert "unstable timings: mean 11.7 ms against p50 0.4 ms over 40 calls" in note
    assert "--threads 1" in note
    assert runtime_note({"latency_ms": {**lat, "mean": 0.45}, "iters": 40}) is None
    row = {"latency_ms": lat, "iters": 40, "warmup_calls": 3,
           "accuracy": {"images": 97, "top1": 97.0}}
    result = {"settings": {"min_time": 1, "min_iters": 10, "clip": "drop", "threads": None,
                           "data": "digits:test"},
              "machine": {"cpu": "x86", "usable_cpus": 2, "gpu": None},
              "reference": {"model": "m.onnx", "backend": "ort-cpu", "top1": 97.0},
              "rows": [row, {**row, "warmup_calls": 10, "iters": 500}]}
    text = _legend(result)
    assert "after 3-10 warm-up calls" in text and "p99 of fewer than 100 calls" in text
    assert "temporary folder" not in text
    result["settings"]["formats"] = ["torch", "onnx"]
    assert "--formats exports went to a temporary folder" in _legend(result)
    result["settings"]["export_dir"] = "exports"
    assert "temporary folder" not in _legend(result)
    assert "top-1 on 97 images of digits:test" in text and "default CPU threads" in text
    assert "before loading the model, its runtime already started" in text


def test_formats_are_checked_before_any_work(cli, models):
    r = cli("bench", models["dir"] / "tiny.safetensors", "--formats", "torch,onnx-int8")
    assert r.code == 1 and "--formats onnx-int8 needs calibration images" in r.err
    assert "add --calib-data DIR" in r.err
    r = cli("bench", models["onnx"], "--formats", "onnx")  # nothing to export
    assert r.code == 1 and "exports kdtool checkpoints, and none of the models is one" in r.err


def test_a_model_backend_format_or_batch_given_twice_is_measured_once(cli, models):
    onnx = models["onnx"]
    again = onnx.parent / ".." / onnx.parent.name / onnx.name  # another spelling, one file
    r = cli("bench", onnx, again, "--backends", "ort-cpu,ort-cpu", "--batch", "2,2", *FAST,
            "--json")
    assert r.code == 0, r.err
    assert f"is given twice (as {onnx})" in r.err
    assert [(row["backend"], row["batch"]) for row in r.json()["rows"]] == [("ort-cpu", 2)]
    assert [m["path"] for m in r.json()["models"]] == [str(onnx)]
    r = cli("bench", models["dir"] / "tiny.safetensors", "--formats", "torch,onnx,torch",
            "--backends", "torch-cpu,ort-cpu", "--batch", "1", *FAST, "--json")
    assert r.code == 0, r.err
    assert [e["format"] for e in r.json()["exports"]] == ["torch", "onnx"]


def test_an_engine_built_from_this_checkpoint_for_this_gpu_and_tensorrt_is_reused(
        models, tmp_path, monkeypatch):
    """Engines take minutes to build: bench --export-dir reuses one whose sidecar says it
    was built from the same checkpoint bytes and precision, by this TensorRT for this GPU."""
    from kdtool.deploy import bench_export
    from kdtool.export import engine as engine_mod
    from kdtool.export import pipeline
    from kdtool.io import file_sha256

    checkpoint = models["dir"] / "tiny.safetensors"
    engine = tmp_path / "tiny.trt.engine"
    engine.write_bytes(b"an engine")
    record = {"tensorrt_version": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3", "precision": "fp32",
              "kdtool": {"source_sha256": file_sha256(checkpoint), "precision": "fp32"}}
    (tmp_path / "tiny.trt.engine.json").write_text(json.dumps(record))
    built = []
    monkeypatch.setattr(backends, "backend_problem", lambda b: None)
    monkeypatch.setattr(pipeline, "run_export", lambda cfg: built.append(cfg.onnx))
    here = ("10.9.0", "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(engine_mod, "engine_identity", lambda: here)

    def export(force=False):
        built.clear()
        return bench_export.export_all(checkpoint, ["tensorrt"], tmp_path, None, force, None)[0]

    ex = export()
    assert ex.reused and ex.path == engine and built == []
    assert export(force=True).reused is False and len(built) == 1
    for other in (("10.13.0", here[1]), (here[0], "NVIDIA A100-SXM4-80GB")):
        here = other  # another TensorRT, another GPU: the engine would not run; rebuilt
        assert not export().reused and len(built) == 1
    here = ("10.9.0", "NVIDIA H100 80GB HBM3")
    record["kdtool"]["source_sha256"] = "0" * 64  # from other weights
    (tmp_path / "tiny.trt.engine.json").write_text(json.dumps(record))
    assert not export().reused and len(built) == 1
    (tmp_path / "tiny.trt.engine.json").write_text("{not json")
    assert not export().reused and len(built) == 1


def test_accuracy_on_a_folder_too_large_to_hold_is_scored_a_chunk_at_a_time(
        cli, models, digits_pngs, monkeypatch, decoded):
    import kdtool.data as data_mod

    folder = digits_pngs(37, labelled=True)
    args = ("bench", models["teacher"], models["onnx"], "--batch", "4",
            *FAST, "--data", folder, "--json")
    first = cli(*args)
    assert first.code == 0, first.err
    whole = [row["accuracy"] for row in first.json()["rows"]]
    monkeypatch.setattr(data_mod, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 2 * 4 * 64)  # two batches of 8x8 grey
    decoded.clear()
    r = cli(*args)
    assert r.code == 0, r.err
    assert [row["accuracy"] for row in r.json()["rows"]] == whole
    assert whole[0]["images"] == 37
    assert decoded == [8, 8, 8, 8, 5] * 2  # once per backend
