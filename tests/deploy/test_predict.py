"""kdtool predict: the model's own answers for image files, on each kind of model file."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from kdtool.checkpoint import load_checkpoint
from kdtool.data import load_data


def _digits_pngs(folder, n):
    """The first n digits:test images as 8x8 PNGs under class folders, and their labels."""
    data = load_data("digits:test")
    labels = {}
    for i in range(n):
        label = int(data.y[i])
        path = folder / str(label) / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.x[i, 0].numpy()).save(path)
        labels[str(path)] = label
    return labels


def _softmax(z):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def test_a_checkpoint_predicts_what_its_model_computes(cli, digits_teacher, tmp_path):
    labels = _digits_pngs(tmp_path / "digits", 40)
    r = cli("predict", digits_teacher, tmp_path / "digits", "--top", "3", "--batch-size", "16",
            "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert res["backend"] == "torch-cpu" and res["top"] == 3
    assert res["preprocessing"]["resize"] == "stretch"
    got = {row["image"]: row["predictions"] for row in res["results"]}
    assert sorted(got) == sorted(labels)  # every image once, found in the class folders

    model, meta = load_checkpoint(digits_teacher)
    images = sorted(labels)
    x = np.stack([np.asarray(Image.open(p), np.float32)[None] / 255 for p in images])
    x = (x - np.float32(meta.mean[0])) / np.float32(meta.std[0])
    with torch.no_grad():
        p = _softmax(model.eval()(torch.from_numpy(x)).double().numpy())
    for path, row in zip(images, p, strict=True):
        order = np.argsort(-row)[:3]
        assert [q["index"] for q in got[path]] == order.tolist()
        assert [q["label"] for q in got[path]] == [meta.class_names[i] for i in order]
        assert [q["probability"] for q in got[path]] == pytest.approx(row[order], abs=1e-5)
    correct = sum(got[path][0]["index"] == label for path, label in labels.items())
    assert correct >= 38  # the ~99% teacher, on real digits


def test_onnx_files_predict_as_onnx_runtime_answers_with_a_static_batch_filled(
        cli, tiny_onnx, static_onnx, offline, tmp_path):
    labels = _digits_pngs(tmp_path / "d", 7)  # 7 images: a static batch of 4 is left 1 short
    images = sorted(labels)
    x = np.stack([np.asarray(Image.open(p), np.float32)[None] / 255 for p in images])
    x = (x - 0.5) / 0.25  # the fixtures' normalisation
    for path in (tiny_onnx, static_onnx):
        r = cli("predict", path, *images, "--top", "10", "--batch-size", "3", "--json")
        assert r.code == 0, r.err
        res = r.json()
        assert res["backend"] == "ort-cpu" and res["top"] == 10
        want = _softmax(offline(path, x).astype(np.float64))
        for row, p in zip(res["results"], want, strict=True):
            probs = [q["probability"] for q in sorted(row["predictions"], key=lambda q: q["index"])]
            assert probs == pytest.approx(p, abs=1e-5)
    # more than the classes: all of them, and said (serve's top_k answers 400 instead)
    r = cli("predict", tiny_onnx, images[0], "--top", "20", "--json")
    assert r.code == 0 and r.json()["top"] == 10
    assert "--top 20 is more than the model's 10 classes: showing all 10" in r.err


def test_an_rgb_nhwc_model_gets_its_own_size_channels_and_class_names(
        cli, rgb_nhwc_onnx, offline, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(path, quality=95)
    r = cli("predict", rgb_nhwc_onnx, path, "--top", "9", "--json")
    assert r.code == 0, r.err
    (row,) = r.json()["results"]
    assert len(row["predictions"]) == 5  # --top beyond the class count gives every class
    assert r.json()["preprocessing"]["interpolation"] == "bilinear"  # as serve's metadata
    x = np.asarray(Image.open(path).resize((16, 16), Image.BILINEAR), np.float32) / 255
    want = _softmax(offline(rgb_nhwc_onnx, ((x - 0.5) / 0.25)[None]).astype(np.float64))[0]
    best = int(np.argmax(want))
    assert row["predictions"][0]["label"] == ["cat", "dog", "fox", "owl", "yak"][best]
    assert row["predictions"][0]["probability"] == pytest.approx(want[best], abs=1e-5)


def test_csv_holds_the_table_and_is_not_overwritten_without_force(cli, tiny_onnx, tmp_path):
    labels = _digits_pngs(tmp_path / "d", 5)
    out = tmp_path / "pred.csv"
    r = cli("predict", tiny_onnx, tmp_path / "d", "--top", "2", "--csv", out, "--json")
    assert r.code == 0, r.err
    res = r.json()
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "label1", "p1", "label2", "p2"]
    assert [row[0] for row in rows[1:]] == sorted(labels)
    for row, pred in zip(rows[1:], res["results"], strict=True):
        assert row[1::2] == [q["label"] for q in pred["predictions"]]
        assert [float(v) for v in row[2::2]] == pytest.approx(
            [q["probability"] for q in pred["predictions"]], abs=1e-6)
    before = out.read_bytes()
    r = cli("predict", tiny_onnx, tmp_path / "d", "--top", "3", "--csv", out)
    assert r.code == 1 and "already exists" in r.err and "--force" in r.err
    assert out.read_bytes() == before
    assert cli("predict", tiny_onnx, tmp_path / "d", "--csv", out, "--force").code == 0
    assert out.read_bytes() != before


def test_the_table_names_each_image_and_how_it_was_fitted(cli, tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    labels = _digits_pngs(tmp_path / "d", 3)
    r = cli("predict", tiny_onnx, tmp_path / "d", "--top", "2")
    assert r.code == 0, r.err
    for path in labels:
        assert path in r.out
    assert "on ort-cpu (onnxruntime" in r.out and "fitted to 8x8 by stretch" in r.out


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (None, ["missing.png"], "'{tmp}/missing.png' does not exist"),
        ("empty", ["empty"], "folder '{tmp}/empty' holds no images"),
        ("bad", ["bad.png"], "cannot read image '{tmp}/bad.png'"),
        ("good", ["good.png", "--top", "0"], "--top 0 is not a number of classes"),
        ("good", ["good.png", "--backend", "torch-cpu"], "'{onnx}' is an ONNX file, and "
         "backend torch-cpu runs a kdtool checkpoint"),
        ("good", ["good.png", "--backend", "ort-cpux"], "did you mean 'ort-cpu'"),
        ("good", ["good.png", "--batch-size", "0"], "--batch-size 0 is not a batch size"),
        ("zip", ["val.zip"], "'{tmp}/val.zip' is a dataset archive, and predict takes image "
         "files or folders of them"),
    ],
)
def test_bad_input_is_one_line_naming_it(cli, tiny_onnx, tmp_path, make, args, message):
    if make == "empty":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
    elif make == "bad":
        (tmp_path / "bad.png").write_bytes(b"not a png")
    elif make == "good":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "good.png")
    elif make == "zip":
        import zipfile

        with zipfile.ZipFile(tmp_path / "val.zip", "w") as z:
            z.writestr("a/1.png", b"")
    args = [str(tmp_path / a) if a.endswith((".png", ".zip")) or a == "empty" else a
            for a in args]
    r = cli("predict", tiny_onnx, *args)
    assert r.code == 1
    assert message.format(tmp=tmp_path, onnx=tiny_onnx) in r.err
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_auto_falls_back_to_the_cpu_when_the_gpu_backend_does_not_start(
        cli, tiny_onnx, tmp_path, monkeypatch):
    from kdtool.deploy import predict

    def no_gpu(backend):
        return "no GPU here (test)" if backend != "ort-cpu" else None

    monkeypatch.setattr(predict, "backend_problem", no_gpu)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    r = cli("predict", tiny_onnx, tmp_path / "a.png", "--json")
    assert r.code == 0 and r.json()["backend"] == "ort-cpu"
    monkeypatch.setattr(predict, "backend_problem", lambda backend: "no GPU here (test)")
    r = cli("predict", tiny_onnx, tmp_path / "a.png")
    assert r.code == 1 and "ort-cuda: no GPU here (test); ort-cpu: no GPU here (test)" in r.err


def test_a_folder_scan_finds_every_format_the_decoder_reads(cli, tiny_onnx, tmp_path):
    from kdtool.deploy.server.images import FORMATS

    folder = tmp_path / "mixed"
    folder.mkdir()
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    names = {"JPEG": "a.jpg", "PNG": "b.png", "WEBP": "c.webp", "BMP": "d.bmp", "GIF": "e.gif",
             "TIFF": "f.tiff", "PPM": "g.pgm"}
    assert sorted(names) == sorted(FORMATS)  # one file of each format serve decodes
    for fmt, name in names.items():
        Image.fromarray(pixels).save(folder / name, format=fmt)
    (folder / ".hidden.gif").write_bytes((folder / "e.gif").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    r = cli("predict", tiny_onnx, folder, "--json")
    assert r.code == 0, r.err
    assert [row["image"] for row in r.json()["results"]] == [
        str(folder / n) for n in sorted(names.values())]


def _with_broken(folder, n_good):
    labels = _digits_pngs(folder, n_good)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n1234")  # 12 bytes: a PNG signature, then nothing
    return labels, broken


def test_an_unreadable_image_is_reported_and_the_others_predicted(cli, tiny_onnx, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    labels, broken = _with_broken(tmp_path / "d", 4)
    r = cli("predict", tiny_onnx, tmp_path / "d", "--top", "2", "--batch-size", "2", "--json")
    assert r.code == 1 and "Traceback" not in r.err
    assert f"warning: cannot read image '{broken}'" in r.err  # the file, and why
    assert r.err.strip().splitlines()[-1].startswith("error: 1 of 5 images could not be read")
    res = r.json()  # the result is still the one JSON object on stdout
    rows = {row["image"]: row for row in res["results"]}
    assert sorted(rows) == sorted([*labels, str(broken)])
    assert "predictions" not in rows[str(broken)] and rows[str(broken)]["error"]
    assert all(len(rows[p]["predictions"]) == 2 and "error" not in rows[p] for p in labels)
    assert res["unreadable"] == 1
    # ... and, as every failure's object does, "error" and "hint" (a script tests for them)
    assert res["error"] == "1 of 5 images could not be read"
    assert res["hint"] == "their entries say why; the others were predicted"

    # The table names it too; the CSV gives it a row with its error and no prediction.
    r = cli("predict", tiny_onnx, tmp_path / "d", "--top", "2")
    assert r.code == 1 and str(broken) in r.out and "unreadable" in r.out
    out = tmp_path / "pred.csv"
    r = cli("predict", tiny_onnx, tmp_path / "d", "--top", "2", "--csv", out)
    assert r.code == 1 and "1 of 5 images could not be read" in r.err
    assert "the warnings above say why; the others were predicted" in r.err
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["image", "label1", "p1", "label2", "p2", "error"]
    by_image = {row[0]: row for row in table[1:]}
    assert by_image[str(broken)][1:5] == ["", "", "", ""] and by_image[str(broken)][5]
    assert all(by_image[p][5] == "" and by_image[p][1] for p in labels)


def test_a_truncated_or_float_image_is_one_unreadable_file_not_a_traceback(cli, tiny_onnx,
                                                                          tmp_path):
    """Image.open reads only the header: the decode inside preprocessing raised the
    server's RequestError, which predict did not catch."""
    import io

    from PIL import Image

    folder = tmp_path / "d"
    folder.mkdir()
    buf = io.BytesIO()
    Image.new("L", (64, 64), 120).save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[:200])
    Image.new("F", (8, 8), 0.5).save(folder / "float.tif")
    Image.new("L", (8, 8), 40).save(folder / "ok.png")
    r = cli("predict", tiny_onnx, folder, "--json")
    assert r.code == 1 and "Traceback" not in r.err, r.err
    rows = {row["image"].rsplit("/", 1)[-1]: row for row in r.json()["results"]}
    assert "predictions" in rows["ok.png"] and r.json()["unreadable"] == 2
    assert "is not a decodable image" in rows["cut.jpg"]["error"]
    assert "cannot be converted to the model's input" in rows["float.tif"]["error"]
    assert "request body" not in r.err


def test_when_no_image_can_be_read_the_error_is_one_line(cli, tiny_onnx, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("x.png", "y.png"):
        (folder / name).write_bytes(b"not a png")
    r = cli("predict", tiny_onnx, folder, "--json")
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r.err
    assert f"cannot read image '{folder / 'x.png'}'" in r.err and "none of the 2" in r.err
    assert set(r.json()) == {"error", "hint"}


def test_csv_into_an_existing_folder_is_refused_with_a_file_name(cli, tiny_onnx, tmp_path):
    _digits_pngs(tmp_path / "d", 2)
    folder = tmp_path / "out"
    folder.mkdir()
    for force in ([], ["--force"]):
        r = cli("predict", tiny_onnx, tmp_path / "d", "--csv", f"{folder}/", *force)
        assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r.err
        assert f"--csv '{folder}' is a folder" in r.err
        assert str(folder / "predictions.csv") in r.err
        assert list(folder.iterdir()) == []


def test_threads_zero_is_the_librarys_default_and_negative_is_refused(cli, tiny_onnx, tmp_path):
    """bench refused --threads 0 that predict took and serve documents as one per core."""
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    assert cli("predict", tiny_onnx, tmp_path / "a.png", "--threads", "0").code == 0
    assert cli("bench", tiny_onnx, "--threads", "0", "--batch", "1", "--min-time", "0.01",
               "--min-iters", "2", "--warmup", "0").code == 0
    r = cli("predict", tiny_onnx, tmp_path / "a.png", "--threads", "-1")
    assert r.code == 1 and "--threads must be at least 0, not -1" in r.err


def test_onnx_only_commands_never_import_torch(tiny_onnx, tmp_path):
    """info, predict and bench of an ONNX file run on ONNX Runtime alone: importing torch
    would add 2-3 s to each call (1 s instead of 3.5 for a predict)."""
    import subprocess
    import sys

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    for args in (["info", tiny_onnx], ["predict", tiny_onnx, image],
                 ["bench", tiny_onnx, "--batch", "1", "--min-time", "0.05", "--min-iters", "2"]):
        code = ("import sys\nfrom kdtool.cli.app import main\n"
                f"try:\n    main({[str(a) for a in args]!r})\nexcept SystemExit as e:\n"
                "    assert not e.code, e.code\n"
                "print('torch' in sys.modules)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout.strip().splitlines()[-1] == "False", (args, r.stdout)


def test_a_model_without_class_names_is_labelled_by_index_as_the_server_labels_it(
        cli, graph_onnx, tmp_path):
    from dataclasses import replace

    import onnx

    from kdtool.deploy.server.model import OnnxModel
    from kdtool.export.metadata import read_info, write_info

    path = graph_onnx("unnamed.onnx", in_chans=1, size=8, num_classes=3)
    proto = onnx.load(path)
    write_info(proto, replace(read_info(path), class_names=[]))
    onnx.save(proto, path)
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(tmp_path / "a.png")
    r = cli("predict", path, tmp_path / "a.png", "--top", "3", "--json")
    assert r.code == 0, r.err
    labels = [q["label"] for q in r.json()["results"][0]["predictions"]]
    assert sorted(labels) == ["0", "1", "2"] == OnnxModel(path, threads=1).class_names


def test_an_image_where_the_model_goes_says_the_order(cli, tiny_onnx, tmp_path):
    """'kdtool predict img.png m.onnx' once said the image was no model kdtool bench runs."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img.png")
    r = cli("predict", tmp_path / "img.png", tiny_onnx)
    assert r.code == 1 and "img.png' is an image, and predict takes the model first" in r.err
    assert f"kdtool predict MODEL {tmp_path / 'img.png'}" in r.err


def test_the_default_top_is_capped_quietly_and_a_given_one_with_a_word(capsys):
    """A 4-class model once printed '--top 5 is more than ...' on every call without --top."""
    from kdtool.deploy.predict import check_top

    assert check_top(None, 4) == 4 and check_top(None, 1000) == 5
    assert capsys.readouterr().err == ""
    assert check_top(9, 4) == 4
    assert "--top 9 is more than the model's 4 classes" in capsys.readouterr().err


def test_an_image_over_the_pixel_limit_is_to_be_downscaled(cli, tiny_onnx, tmp_path):
    import struct
    import zlib

    from PIL import Image

    path = tmp_path / "huge.png"  # a few bytes whose header says 9000 x 9000
    Image.new("L", (1, 1)).save(path)
    png = bytearray(path.read_bytes())
    png[16:24] = struct.pack(">II", 9000, 9000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    path.write_bytes(bytes(png))
    r = cli("predict", tiny_onnx, path)
    assert r.code == 1 and "over the 64 megapixel limit" in r.err, r.err
    assert "downscale it" in r.err and "replace this one" not in r.err


def test_an_empty_image_argument_is_refused_not_the_working_folder(cli, tiny_onnx, tmp_path,
                                                                   monkeypatch):
    """predict MODEL "$IMG" with IMG unset classified every image under the working folder."""
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "unrelated.png")
    monkeypatch.chdir(tmp_path)
    r = cli("predict", tiny_onnx, "", "--json")
    assert r.code == 1 and "an image was given as an empty string" in r.err, r.err
    assert "unrelated.png" not in r.out
