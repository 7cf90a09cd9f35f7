"""``kdtool demo --quick``: the whole pipeline end to end on digits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image

from kdtool.checkpoint import read_meta
from kdtool.data import load_data
from kdtool.export.metadata import read_info


def test_demo_quick_end_to_end(cli, tmp_path, capsys):
    out = tmp_path / "demo"
    r = cli("demo", "--quick", "--out", out, "--json")
    assert r.code == 0, r.err
    res = r.json()
    students = {s["teacher_bn"] + "/" + s["noise"]: s for s in res["students"]}
    running = students["running/gaussian"]["top1_current"]
    current = students["current/gaussian"]["top1_current"]
    # The paper's point: the teacher's BN on batch statistics is what makes noise work.
    assert current >= running + 10, (current, running)
    assert res["teacher"]["top1"] >= 95
    cal = res["calibrated"]
    # Calibration on 32 x 16 real images recovers current-statistics accuracy on running BN.
    assert cal["top1"] >= cal["top1_current"] - 3, cal
    assert cal["top1"] >= cal["top1_noise_running"] + 5, cal
    assert read_meta(cal["file"]).stages["calibrate"]["folded"] is True
    fp32 = res["export"]["fp32"]
    assert fp32["result"]["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    assert read_info(fp32["file"]).precision == "fp32"
    assert read_info(res["export"]["int8"]["file"]).precision == "int8"
    ok = [row for row in res["bench"]["rows"] if row["status"] == "ok"]
    assert {row["backend"] for row in ok} == {"torch-cpu", "ort-cpu"}
    for name in ("teacher.safetensors", "student.cal.safetensors", "student.onnx",
                 "student.int8.onnx"):
        assert (out / name).is_file()
    # The students' learning curves, validated at several epochs (not only the last).
    rows = list(csv.DictReader(Path(res["curves"]["csv"]).read_text().splitlines()))
    assert {r["run"] for r in rows} == {Path(s["file"]).stem for s in res["students"]}
    assert len({r["epoch"] for r in rows if r["metric"] == "val_top1_current"}) > 1
    assert Path(res["curves"]["png"]).read_bytes()[:4] == b"\x89PNG"
    json.dumps(res)  # everything in the result is JSON

    # The summary ends with what to do next, and that command works on real digits.
    from kdtool.cli.demo_cmd import render_summary

    capsys.readouterr()
    render_summary(res)
    assert f"next: kdtool predict {out / 'student.onnx'} IMAGES" in capsys.readouterr().out
    # A latency row whose timings other work spread out says so, as bench's table does.
    import copy

    spread = copy.deepcopy(res)
    lat = ok[0]["latency_ms"]
    row = next(r for r in spread["bench"]["rows"] if r["status"] == "ok")
    row["latency_ms"] = {**lat, "mean": 10 * lat["p50"]}
    render_summary(spread)
    assert "unstable" in capsys.readouterr().out
    data = load_data("digits:test")
    folder = tmp_path / "test"
    folder.mkdir()
    for i in range(len(data.y)):
        Image.fromarray(data.x[i, 0].numpy()).save(folder / f"{i:03d}_{int(data.y[i])}.png")
    r = cli("predict", out / "student.onnx", folder, "--json")
    assert r.code == 0, r.err
    right = sum(p["predictions"][0]["index"] == int(Path(p["image"]).stem.split("_")[1])
                for p in r.json()["results"])
    # The export's own accuracy on digits:test, image for image (one may flip at a tie).
    onnx_top1 = fp32["result"]["val"]["onnx_fp32_top1"]
    assert abs(100 * right / len(data.y) - onnx_top1) <= 100 / len(data.y) + 1e-6


def test_demo_refuses_a_non_empty_folder(cli, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = cli("demo", "--quick", "--out", tmp_path)
    assert r.code == 1 and "is not empty" in r.err and "--force" in r.err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_demo_teacher_option_trains_that_architecture(tmp_path):
    from dataclasses import replace

    from kdtool.demo import SCALES, Demo

    demo = Demo(tmp_path / "demo", quick=True, teacher="cnn3")
    assert demo.scale == replace(SCALES["quick"], teacher="cnn3")
    demo.scale = replace(demo.scale, teacher_epochs=1)  # the option, not the teacher's quality
    t = demo.train_teacher()
    assert t["arch"] == "cnn3"
    assert read_meta(t["file"]).arch == "cnn3"
    assert Demo(tmp_path / "other").scale == SCALES["full"]


def test_demo_refuses_an_unknown_or_unfit_teacher_before_writing(cli, tmp_path):
    r = cli("demo", "--quick", "--teacher", "cnn", "--out", tmp_path / "demo")
    assert r.code == 1 and "cnn3" in r.err and "Traceback" not in r.err
    # A network that downsamples 8x8 digits below its kernels: the demo has no
    # --image-size, so the fix it names is another teacher.
    r = cli("demo", "--quick", "--teacher", "tv:squeezenet1_0", "--out", tmp_path / "demo")
    assert r.code == 1 and "cannot take 1x8x8 images" in r.err, r.err
    assert "pick a --teacher that takes them" in r.err and "--image-size" not in r.err
    assert not (tmp_path / "demo").exists()
