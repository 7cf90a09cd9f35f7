"""Speed of ``kdtool calibrate`` on ResNet-18 (CIFAR), and of the folded model it writes.

1. Calibrate + fold a CIFAR ResNet-18 (random weights, random "noise" BN statistics) with
   32 x 16 images of 32x32: CIFAR-10 ``train45k.zip`` when it exists, else random images.
   The command runs as a user runs it (a fresh ``python -m kdtool`` process, data cache warm);
   the wall time includes start-up, and the command's own phase timings are shown too.
2. CPU inference of the unfolded (BN, eval) and the folded model, measured side by side in
   one process (interleaved rounds, median), at batch 1 and batch 64.

    python bench/calibrate_speed.py [--data .data/cifar10/train45k.zip] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdtool.bn import bn_layers
from kdtool.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from kdtool.data import load_data
from kdtool.models import create_model

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".data" / "cifar10" / "train45k.zip"


def make_student(path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    for _, bn in bn_layers(model):  # what a noise student carries: statistics of noise
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 4)
    meta = ModelMeta(
        arch="resnet18",
        num_classes=10,
        in_chans=3,
        input_size=[32, 32],
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        class_names=[str(i) for i in range(10)],
    )
    save_checkpoint(path, model, meta, force=True)


def random_images(path: Path, n: int = 1024) -> None:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.full(n, -1))


@torch.inference_mode()
def speed(models: dict[str, torch.nn.Module], batch: int, rounds: int, seconds: float) -> dict:
    """Median images/s of each model; rounds alternate the models so load hits both alike."""
    x = torch.randn(batch, 3, 32, 32)
    for m in models.values():  # warm-up (oneDNN primitive creation)
        for _ in range(3):
            m(x)
    per = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds / rounds:
                m(x)
                n += 1
            per[name].append(n * batch / elapsed)
    return {k: statistics.median(v) for k, v in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=6.0, help="Timing per model and batch.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="calibrate_speed."))
    student, out = work / "r18.safetensors", work / "r18.cal.safetensors"
    make_student(student)
    data, kind = args.data, "CIFAR-10 train45k.zip"
    if not Path(data).exists():
        data, kind = str(work / "random.npz"), "random 32x32 images (CIFAR-10 zip not found)"
        random_images(Path(data))
    t0 = time.perf_counter()
    load_data(data)  # fill the decoded-image cache, as any earlier use of the data would
    load_s = time.perf_counter() - t0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        "-m",
        "kdtool",
        "calibrate",
        str(student),
        "--data",
        data,
        "--batches",
        "32",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--json",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"kdtool calibrate failed:\n{proc.stderr}")
    res = json.loads(proc.stdout)

    unfolded, _ = load_checkpoint(student)
    folded, _ = load_checkpoint(out)
    rows = {
        b: speed({"unfolded": unfolded, "folded": folded}, b, args.rounds, args.seconds)
        for b in (1, 64)
    }
    report = {
        "data": kind,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "data_cache_fill_s": load_s,
        "command_wall_s": wall,
        "phases_s": res["seconds"],
        "fold": {k: res["fold"][k] for k in ("into_prev", "into_next", "affine", "max_abs_diff")},
        "images_per_s": rows,
        "speedup": {b: r["folded"] / r["unfolded"] for b, r in rows.items()},
    }
    print(json.dumps(report, indent=1))
    print(
        f"\ndata: {kind}; {args.threads} threads; load average "
        f"{', '.join(f'{v:.1f}' for v in report['load_average'])}"
    )
    print(
        f"kdtool calibrate (32 x 16, fold, check): {wall:.2f} s wall "
        f"(phases: {', '.join(f'{k} {v:.2f} s' for k, v in res['seconds'].items())})"
    )
    print("| batch | unfolded img/s | folded img/s | folded / unfolded |\n|---|---|---|---|")
    for b, r in rows.items():
        print(
            f"| {b} | {r['unfolded']:,.0f} | {r['folded']:,.0f} | "
            f"{r['folded'] / r['unfolded']:.2f}x |"
        )


if __name__ == "__main__":
    main()
