"""bench/distill_speed.py runs end to end at toy scale and reports consistent figures."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "distill_speed.py"


def _load_bench():
    # bench/ is not a package: load the script as a module.
    spec = importlib.util.spec_from_file_location("distill_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distill_speed_bench_toy_run(capsys):
    bench = _load_bench()
    summary = bench.main(["--device", "cpu", "--teacher", "tiny_cnn", "--student", "tiny_cnn",
                          "--batch-size", "8", "--size", "8", "--iters", "2", "--epochs", "2"])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["loop"] for r in rows] == ["baseline", "kdtool"]
    for r in rows:
        assert len(r["epoch_images_per_s"]) == 2 and r["images_per_s"] > 0
        assert r["images_per_s"] == r["epoch_images_per_s"][-1]  # the last epoch is timed
    assert summary["ratio"] == summary["kdtool_images_per_s"] / summary["baseline_images_per_s"]
    assert "| tiny_cnn -> tiny_cnn | 8 |" in out and out.rstrip().endswith("x |")


def test_distill_speed_bench_device_defaults():
    bench = _load_bench()
    args = bench.parse_args(["--device", "cpu"])
    assert (args.teacher, args.student, args.batch_size) == ("resnet8", "tiny_cnn", 256)


def test_distill_speed_bench_counts_the_operators_of_a_step(capsys):
    bench = _load_bench()
    bench.main(["--device", "cpu", "--teacher", "tiny_cnn", "--student", "tiny_cnn",
                "--batch-size", "4", "--size", "8", "--iters", "1", "--epochs", "1",
                "--count-ops"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith('{"device"')]
    # tiny_cnn -> tiny_cnn: tens of operators forward and backward, none of Adam's
    assert len(rows) == 1 and 30 < rows[0]["aten_ops_per_step"] < 300, rows
