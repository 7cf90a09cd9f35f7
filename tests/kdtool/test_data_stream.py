"""Evaluation of a dataset too large to hold: an ImageStream decodes a chunk of whole batches
at a time, caches nothing, and scores exactly what the dataset in memory scores."""

from __future__ import annotations

import pytest
import torch

import kdtool.data as data_mod
from kdtool import imagefolder
from kdtool.checkpoint import load_checkpoint
from kdtool.data import ImageData, ImageStream, load_for_model, open_for_model
from kdtool.evaluate import predict


@pytest.fixture
def streamed(monkeypatch):
    """Every folder streams, in chunks of two batches of 4 (8 images of 8x8 grey)."""
    monkeypatch.setattr(data_mod, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 2 * 4 * 64)


@pytest.mark.parametrize("bn", ["running", "current"])
@pytest.mark.parametrize("tta", ["none", "flip"])
def test_a_stream_scores_as_the_dataset_in_memory(digits_teacher, digits_pngs, monkeypatch,
                                                  decoded, bn, tta):
    # 33 images at batch 4 in chunks of 8: the last chunk is one image, a batch of one that
    # --bn current runs with the batch before it, from the chunk before
    folder = digits_pngs(33, labelled=True)
    model, meta = load_checkpoint(digits_teacher)
    whole = load_for_model(folder, meta)
    kw = dict(batch_size=4, bn=bn, tta=tta, seed=3)
    expected, expected_labels = predict(model, whole, meta.mean, meta.std, **kw)  # one chunk
    monkeypatch.setattr(data_mod, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 2 * 4 * 64)
    decoded.clear()
    stream = open_for_model(folder, meta)
    assert isinstance(stream, ImageStream) and isinstance(whole, ImageData)
    assert torch.equal(stream.y, whole.y) and stream.class_names == whole.class_names
    logits, labels = predict(model, stream, meta.mean, meta.std, **kw)
    assert torch.equal(logits, expected) and torch.equal(labels, expected_labels)
    assert decoded == [8, 8, 8, 8, 1]  # a chunk at a time, never all 33


def test_a_stream_writes_no_cache_and_says_why(digits_teacher, digits_pngs, streamed, tmp_path,
                                               monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDTOOL_CACHE", str(cache))
    folder = digits_pngs(12, labelled=True)
    _, meta = load_checkpoint(digits_teacher)
    stream = open_for_model(folder, meta)
    assert len(stream) == 12 and stream.channels == 1 and stream.image_size == (8, 8)
    for _ in stream.chunks(torch.arange(12), 8):
        pass
    assert not cache.exists() or not any(cache.iterdir())
    assert "decoding them a chunk at a time, uncached" in capsys.readouterr().err


def test_a_small_folder_and_a_draw_stay_in_memory(digits_teacher, digits_pngs):

    folder = digits_pngs(12, labelled=True)
    _, meta = load_checkpoint(digits_teacher)
    assert isinstance(open_for_model(folder, meta), ImageData)
    assert isinstance(open_for_model("digits:test", meta), ImageData)


def test_a_draw_is_never_streamed(digits_teacher, digits_pngs, streamed):
    from kdtool.data import Draw

    _, meta = load_checkpoint(digits_teacher)
    assert isinstance(open_for_model(digits_pngs(12, labelled=True), meta, Draw(5, 0)), ImageData)


def test_a_stream_takes_the_models_class_order(digits_teacher, digits_pngs, streamed):
    # a folder holding three of the ten classes: its labels become the model's indices
    folder = digits_pngs(30, labelled=True)
    for d in folder.iterdir():
        if d.name not in {"2", "5", "7"}:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    _, meta = load_checkpoint(digits_teacher)
    stream = open_for_model(folder, meta)
    assert stream.class_names == meta.class_names
    assert set(stream.y.tolist()) == {2, 5, 7}


@pytest.mark.parametrize("bn", ["running", "current"])
def test_eval_of_a_streamed_folder_reports_what_memory_reports(cli, digits_teacher, digits_pngs,
                                                               monkeypatch, bn):
    folder = digits_pngs(33, labelled=True)
    args = ("eval", digits_teacher, "--data", folder, "--batch-size", "4", "--bn", bn,
            "--json")
    whole = cli(*args).json()
    monkeypatch.setattr(data_mod, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 2 * 4 * 64)
    r = cli(*args)
    assert r.code == 0, r.err
    assert r.json() == whole
    assert "a chunk at a time" in r.err


@pytest.fixture
def held_chunks(monkeypatch):
    """Fails a decode of a streamed chunk while an earlier chunk is still referenced."""
    import weakref

    real = imagefolder.decode_images
    chunks: list = []

    def tracking(*args, **kwargs):
        assert all(ref() is None for ref in chunks), "an earlier chunk is still held"
        x = real(*args, **kwargs)
        chunks.append(weakref.ref(x))
        return x

    monkeypatch.setattr(imagefolder, "decode_images", tracking)
    return chunks


@pytest.mark.parametrize("model_file", ["checkpoint", "onnx"])
def test_a_chunk_is_freed_before_the_next_one_decodes(cli, digits_teacher, digits_pngs,
                                                      tmp_path, streamed, held_chunks,
                                                      model_file):
    # two chunks held at once would double a stream's memory
    path = digits_teacher
    if model_file == "onnx":
        path = tmp_path / "t.onnx"
        assert cli("export", digits_teacher, "--out", path).code == 0
    folder = digits_pngs(37, labelled=True)
    r = cli("eval", path, "--data", folder, "--batch-size", "4", "--json")
    assert r.code == 0, r.err
    assert len(held_chunks) == 5


def test_a_streamed_chunk_decodes_in_worker_processes(digits_teacher, digits_pngs, streamed,
                                                      monkeypatch):
    # a chunk is 256 MiB of large images: worth the workers' start at any image count
    started = []

    class Pool(imagefolder.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(imagefolder, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(imagefolder, "usable_cores", lambda: 2)
    _, meta = load_checkpoint(digits_teacher)
    stream = open_for_model(digits_pngs(12, labelled=True), meta)
    whole = load_for_model(digits_pngs(12, labelled=True), meta)
    assert started == []  # 12 images in memory: too few for workers
    got = [chunk for chunk, _ in stream.chunks(torch.arange(12), 8)]
    assert started == [2, 2]
    assert torch.equal(torch.cat([c.x for c in got]), whole.x)
