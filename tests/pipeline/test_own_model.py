"""README's "With your own model": from a plain state_dict teacher and a folder of
unlabelled images to a benchmarked INT8 student, with the README's commands (digits scale:
the README's CIFAR ResNets would take hours on a CPU)."""

from __future__ import annotations

import torch

from kdtool.checkpoint import load_checkpoint, read_meta
from kdtool.export.metadata import read_info


def test_a_plain_state_dict_teacher_becomes_a_benchmarked_int8_student(
        cli, digits_teacher, tmp_path, digits_pngs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, meta = load_checkpoint(digits_teacher)
    torch.save(model.state_dict(), "teacher.pth")  # what a user holds: weights alone
    (tmp_path / "classes.txt").write_text("\n".join(meta.class_names))
    images = digits_pngs(600)  # unlabelled, as a user's images are

    steps = [
        ("convert", "teacher.pth", "--arch", meta.arch, "--image-size", "8", "--mean",
         str(meta.mean[0]), "--std", str(meta.std[0]), "--class-names", "classes.txt",
         "--out", "teacher.safetensors"),
        ("distill", "--teacher", "teacher.safetensors", "--student", "tiny_cnn", "--noise",
         "dead_leaves", "--epochs", "2", "--iters-per-epoch", "20", "--out",
         "student.safetensors"),
        ("calibrate", "student.safetensors", "--data", images, "--out",
         "student.cal.safetensors"),
        ("export", "student.cal.safetensors", "--precision", "int8", "--calib-data", images),
        ("bench", "student.cal.safetensors", "student.cal.int8.onnx", "--batch", "1,8",
         "--min-time", "0.03", "--min-iters", "5", "--warmup", "2", "--json"),
    ]
    for step in steps:
        r = cli(*step)
        assert r.code == 0, (step[0], r.err)
    converted = read_meta("teacher.safetensors")
    assert converted.class_names == meta.class_names and converted.input_size == [8, 8]
    assert read_meta("student.cal.safetensors").stages["calibrate"]["folded"] is True
    info = read_info("student.cal.int8.onnx")
    assert info.precision == "int8" and info.quantization["calib_data"] == str(images)
    rows = r.json()["rows"]
    assert {(row["backend"], row["batch"], row["status"]) for row in rows} == {
        ("torch-cpu", 1, "ok"), ("torch-cpu", 8, "ok"), ("ort-cpu", 1, "ok"),
        ("ort-cpu", 8, "ok")}
