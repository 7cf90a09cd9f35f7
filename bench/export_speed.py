"""CPU inference speed of kdtool's exports: ONNX Runtime FP32 and INT8 against PyTorch eager.

One process, one model, the same threads for everyone: PyTorch eager (the folded model
when ``kdtool.calibrate.fold`` exists), ONNX Runtime FP32 (``kdtool export``'s graph),
INT8 QDQ with symmetric activations (the default: valid for TensorRT) as kdtool's
sessions run it (activations re-encoded as uint8, same values) and as a plain onnxruntime
session runs the file, and INT8 with asymmetric uint8 activations
(``--int8-activations asymmetric``: ONNX Runtime CPU only).
Timings alternate between the backends round by round, so a noisy shared machine
slows all of them alike; each figure is the median over rounds of the mean latency of
one ``infer`` call (host numpy in, host numpy out).

Accuracy needs a trained CIFAR-10 checkpoint (``--checkpoint``, or the newest
``runs/**/*.safetensors`` of the architecture at 32x32); without one the weights are
random (with non-trivial BN statistics) and accuracy is reported as n/a.

    python bench/export_speed.py --threads 1              # resnet18, batch 1 and 64
    python bench/export_speed.py --checkpoint runs/r18.safetensors --val .data/cifar10/val5k.zip
    python bench/export_speed.py --threads 1 --compare-exporters resnet8 resnet18 densenet121
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from kdtool.bn import bn_layers
from kdtool.checkpoint import load_checkpoint
from kdtool.export.batch import parse_batch
from kdtool.export.onnx_export import INPUT_NAME, export_onnx
from kdtool.export.parity import normalise
from kdtool.export.precision import quantize_int8
from kdtool.export.runners import OrtRunner, TorchRunner
from kdtool.models import create_model

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
DATA_DIRS = [Path(".data/cifar10"), Path("../shared/data/cifar10")]


def _find(name: str) -> str | None:
    for d in DATA_DIRS:
        if (d / name).is_file():
            return str(d / name)
    return None


def _checkpoint(arch: str) -> Path | None:
    from kdtool.checkpoint import read_meta

    found = []
    for p in Path("runs").rglob("*.safetensors"):
        try:
            m = read_meta(p)
        except Exception:
            continue
        trained = "train" in m.stages or "distill" in m.stages
        if trained and m.arch == arch and m.input_size == [32, 32] and m.in_chans == 3:
            found.append(p)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _model(args):
    path = Path(args.checkpoint) if args.checkpoint else _checkpoint(args.arch)
    if path is not None:
        model, meta = load_checkpoint(path)
        return model, meta.mean, meta.std, str(path), True
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10, in_chans=3).eval()
    for _, bn in bn_layers(model):  # statistics like a trained model's, not the identity
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model, CIFAR_MEAN, CIFAR_STD, f"random {args.arch}", False


def _fold(model):
    try:
        from kdtool.calibrate.fold import fold_bn
    except ImportError:
        return model, False
    if not bn_layers(model):
        return model, True
    folded, _ = fold_bn(model, torch.randn(8, 3, 32, 32))
    return folded.eval(), True


def _time(runner, x: np.ndarray, seconds: float) -> float:
    """Mean seconds per call over about ``seconds`` of calls (at least 3)."""
    runner.infer(x)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        runner.infer(x)
        n += 1
    return (time.perf_counter() - start) / n


def _top1(runner, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    pred = np.concatenate(
        [runner.infer(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)]
    )
    return 100.0 * float((pred == y).mean())


def compare_exporters(archs: list[str]) -> None:
    """Export time of torch's dynamo and TorchScript exporters, and their outputs' parity."""
    from kdtool.export.parity import TOLERANCES, compare

    profile = parse_batch("1:32:64")
    x = [
        np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 37)
    ]
    # warm-up: the first dynamo export pays for imports and registrations
    export_onnx(create_model("tiny_cnn").eval(), (3, 32, 32), batch=profile)
    print(
        "| model | dynamo export | TorchScript export | ratio | max rel. diff vs PyTorch "
        "(dynamo / TorchScript) |"
    )
    print("|---|---:|---:|---:|---:|")
    for arch in archs:
        model = _model(argparse.Namespace(checkpoint=None, arch=arch))[0]
        seconds, diffs = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for exporter in ("dynamo", "torchscript"):
                start = time.perf_counter()
                proto, _ = export_onnx(model, (3, 32, 32), batch=profile, exporter=exporter)
                seconds[exporter] = time.perf_counter() - start
                path = Path(tmp) / f"{exporter}.onnx"
                onnx.save(proto, str(path))
                with OrtRunner(path) as runner:
                    report = compare(TorchRunner(model), runner, x, TOLERANCES["fp32"])
                diffs[exporter] = report.max_rel_diff
        print(
            f"| {arch} | {seconds['dynamo']:.1f} s | {seconds['torchscript']:.2f} s | "
            f"{seconds['dynamo'] / seconds['torchscript']:.0f}x | "
            f"{diffs['dynamo']:.1e} / {diffs['torchscript']:.1e} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--checkpoint", help="a trained kdtool checkpoint (3x32x32, 10 classes)")
    p.add_argument("--val", default=_find("val5k.zip"), help="labelled data for accuracy")
    p.add_argument("--calib", default=_find("train45k.zip"), help="INT8 calibration images")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.5, help="per backend per round")
    p.add_argument("--exporter", default="dynamo")
    p.add_argument(
        "--compare-exporters",
        nargs="+",
        metavar="ARCH",
        help="only time the two torch.onnx exporters on these architectures",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare_exporters:
        compare_exporters(args.compare_exporters)
        return

    from kdtool.data import load_data

    model, mean, std, source, trained = _model(args)
    model, folded = _fold(model)
    calib = None
    if args.calib:
        data = load_data(args.calib, image_size=(32, 32), channels=3)
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        calib = normalise(data.x[idx[: args.calib_images]], mean, std)
    else:
        calib = torch.randn(args.calib_images, 3, 32, 32).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proto, record = export_onnx(
            model, (3, 32, 32), batch=parse_batch("1:64:256"), exporter=args.exporter
        )
        onnx.save(proto, str(tmp / "fp32.onnx"))
        for mode in ("symmetric", "asymmetric"):
            quantize_int8(
                tmp / "fp32.onnx",
                tmp / f"int8_{mode}.onnx",
                calib,
                input_name=INPUT_NAME,
                batch_size=32,
                activations=mode,
            )
        runners = {
            "torch": TorchRunner(model),
            "ort_fp32": OrtRunner(tmp / "fp32.onnx", threads=args.threads),
            "ort_int8_sym": OrtRunner(tmp / "int8_symmetric.onnx", threads=args.threads),
            # The same file in a plain onnxruntime session (no uint8 re-encoding).
            "ort_int8_sym_plain": OrtRunner(
                tmp / "int8_symmetric.onnx", threads=args.threads, uint8_on_cpu=False
            ),
            "ort_int8_asym": OrtRunner(tmp / "int8_asymmetric.onnx", threads=args.threads),
        }
        sizes = {
            "fp32": (tmp / "fp32.onnx").stat().st_size,
            "int8_sym": (tmp / "int8_symmetric.onnx").stat().st_size,
            "int8_asym": (tmp / "int8_asymmetric.onnx").stat().st_size,
        }
        gen = np.random.default_rng(0)
        latency: dict[tuple[str, int], list[float]] = {}
        for b in args.batches:
            x = gen.standard_normal((b, 3, 32, 32)).astype(np.float32)
            for _ in range(args.rounds):  # interleaved: every backend once per round
                for name, runner in runners.items():
                    latency.setdefault((name, b), []).append(_time(runner, x, args.seconds))
        accuracy = {}
        if trained and args.val:
            val = load_data(args.val, image_size=(32, 32), channels=3)
            xv, yv = normalise(val.x, mean, std), val.y.numpy()
            accuracy = {name: _top1(r, xv, yv) for name, r in runners.items()}

    med = {k: statistics.median(v) for k, v in latency.items()}
    rows = []
    for b in args.batches:
        t = {name: med[(name, b)] for name in runners}
        row = {
            "batch": b,
            **{f"{k}_ms": 1e3 * v for k, v in t.items()},
            "ort_fp32_vs_torch": t["torch"] / t["ort_fp32"],
            "int8_sym_vs_fp32": t["ort_fp32"] / t["ort_int8_sym"],
            "int8_sym_plain_vs_fp32": t["ort_fp32"] / t["ort_int8_sym_plain"],
            "int8_asym_vs_fp32": t["ort_fp32"] / t["ort_int8_asym"],
        }
        rows.append(row)
        print(json.dumps(row))
    print(
        json.dumps(
            {
                "source": source,
                "folded": folded,
                "threads": args.threads,
                "exporter": record["exporter"],
                "sizes": sizes,
                "accuracy": accuracy,
            }
        )
    )
    print(
        f"\n{args.arch} ({source}, BN {'folded' if folded else 'not folded'}), "
        f"{args.threads} threads, median of {args.rounds} interleaved rounds\n"
    )
    print(
        "| batch | PyTorch eager | ORT FP32 | INT8 sym | INT8 sym, plain ORT | INT8 asym "
        "| FP32 vs eager | INT8 sym vs FP32 | plain vs FP32 | INT8 asym vs FP32 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['torch_ms']:.2f} ms | {r['ort_fp32_ms']:.2f} ms | "
            f"{r['ort_int8_sym_ms']:.2f} ms | {r['ort_int8_sym_plain_ms']:.2f} ms | "
            f"{r['ort_int8_asym_ms']:.2f} ms | {r['ort_fp32_vs_torch']:.2f}x | "
            f"{r['int8_sym_vs_fp32']:.2f}x | {r['int8_sym_plain_vs_fp32']:.2f}x | "
            f"{r['int8_asym_vs_fp32']:.2f}x |"
        )
    mb = {k: f"{v / 1e6:.1f} MB" for k, v in sizes.items()}
    print(f"\nfile sizes: {mb}")
    if accuracy:
        print("val top-1: " + ", ".join(f"{k} {v:.2f}%" for k, v in accuracy.items()))
    else:
        print("val top-1: n/a (random weights; pass --checkpoint with a trained model)")


if __name__ == "__main__":
    main()
