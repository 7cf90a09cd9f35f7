"""Shared fixtures: run the CLI in-process, and one small digits teacher per session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kdtool.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        lines = [ln for ln in self.out.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one JSON line on stdout, got {self.out!r}"
        return json.loads(lines[0])


@pytest.fixture
def cli(capsys):
    """``cli("eval", "x.safetensors", ...)`` -> CliResult(code, stdout, stderr)."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Decoded-dataset caches go to a temporary folder, never to ~/.cache.
    monkeypatch.setenv("KDTOOL_CACHE", str(tmp_path_factory.getbasetemp() / "kdtool-cache"))


@pytest.fixture(scope="session", autouse=True)
def _torchlib_registry_built_once():
    """Test speed only: ``torch.onnx.export(dynamo=True)`` rebuilds the same torchlib op
    registry on every call, re-reading the source of ~500 onnxscript functions. The suite
    exports dozens of models, so each opset's registry is built once and shared: each export
    test ran about 2 s faster (`python -m pytest tests/export/test_export_cli.py
    --durations=8`, 2-core AVX2 EPYC). kdtool registers no custom ops, so the
    shared registry is never changed; a torch without this internal runs unpatched."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:
        yield
        return
    real = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(real, classmethod):
        yield
        return
    built: dict = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = real.__func__(cls, *args, **kwargs)
        return built[key]

    ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = real


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A resnet8 trained on digits through the CLI (about 98.9% on digits:test; ~5 s)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    try:
        main(["train", "--arch", "resnet8", "--data", "digits", "--val", "digits:test",
              "--epochs", "12", "--batch-size", "64", "--out", str(out), "--json"])
    except SystemExit as e:
        assert e.code == 0
    return out


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """How many images each decode of an image folder or zip was asked for, in order."""
    from kdtool import imagefolder

    counts: list[int] = []
    real = imagefolder.decode_images

    def counting(path, names, *args, **kwargs):
        counts.append(len(names))
        return real(path, names, *args, **kwargs)

    monkeypatch.setattr(imagefolder, "decode_images", counting)
    return counts


@pytest.fixture
def digits_pngs(tmp_path):
    """``digits_pngs(n)``: a folder of the first ``n`` digits training images as PNGs,
    without class folders (unlabelled, as calibration data is); ``labelled=True``: in
    class folders named after their digit."""
    from PIL import Image

    from kdtool.data import load_data

    def make(n: int, labelled: bool = False) -> Path:
        folder = tmp_path / f"digits_{n}{'_labelled' * labelled}"
        digits = load_data("digits")
        for i in range(n):
            where = folder / str(int(digits.y[i])) if labelled else folder
            where.mkdir(parents=True, exist_ok=True)
            Image.fromarray(digits.x[i, 0].numpy()).save(where / f"{i:04d}.png")
        return folder

    return make


@pytest.fixture
def interrupted_distill(monkeypatch):
    """``interrupted_distill(run, epoch)``: a ``DistillRun`` whose ``run()`` is stopped by
    Ctrl-C as the 0-based ``epoch`` starts, as a user would stop it; later runs are not."""
    from kdtool.distill.loop import DistillRun

    real = DistillRun._epoch

    def interrupt(run: DistillRun, at_epoch: int) -> None:
        def killed(self, step_fn, student, noise, epoch, *a):
            if epoch == at_epoch:
                raise KeyboardInterrupt
            return real(self, step_fn, student, noise, epoch, *a)

        monkeypatch.setattr(DistillRun, "_epoch", killed)
        try:
            with pytest.raises(KeyboardInterrupt):
                run.run()
        finally:
            monkeypatch.setattr(DistillRun, "_epoch", real)

    return interrupt


@pytest.fixture
def recorded_epochs(monkeypatch):
    """``with recorded_epochs() as epochs: run.run()``: the 0-based epochs a DistillRun
    computes, so a test tells a resume (the lost epochs only) from a restart."""
    from contextlib import contextmanager

    from kdtool.distill.loop import DistillRun

    real = DistillRun._epoch

    @contextmanager
    def record():
        epochs: list[int] = []

        def spy(self, step_fn, student, noise, epoch, *a):
            epochs.append(epoch)
            return real(self, step_fn, student, noise, epoch, *a)

        monkeypatch.setattr(DistillRun, "_epoch", spy)
        try:
            yield epochs
        finally:
            monkeypatch.setattr(DistillRun, "_epoch", real)

    return record


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
