"""CPU-scale distillation experiments on scikit-learn's digits (real data, no download).

Trains (once, cached in --workdir) a resnet20 teacher on ``digits``, then distils a
student for each named variant at the same noise budget and reports the student's
``digits:test`` accuracy on current and on running BN statistics, with wall time.

    python bench/distill_digits.py --variants schedule bn noise --epochs 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdtool.distill.loop import DistillConfig, DistillRun
from kdtool.train import TrainConfig, Trainer

FAST = {"schedule": "onecycle", "lr": 0.01}
VARIANTS = {
    "schedule": {
        "adam 1e-3 + plateau (paper)": {},
        "adam one-cycle 1e-2": FAST,
        "adam cosine 1e-2": {"schedule": "cosine", "lr": 0.01},
    },
    "bn": {
        "teacher BN current": {**FAST, "teacher_bn": "current"},
        "teacher BN mixed 0.5": {**FAST, "teacher_bn": "mixed", "running_fraction": 0.5},
        "teacher BN running": {**FAST, "teacher_bn": "running"},
    },
    "balance": {
        "gaussian": {**FAST},
        "gaussian, class-balanced": {**FAST, "balance": True},
        "dead leaves, class-balanced": {**FAST, "noise": "dead_leaves", "balance": True},
    },
    "pool": {
        "dead leaves, pool 4096 per epoch": {**FAST, "noise": "dead_leaves", "noise_pool": 4096},
        "dead leaves, pool 1024 per epoch": {**FAST, "noise": "dead_leaves", "noise_pool": 1024},
        "dead leaves, fresh every batch": {**FAST, "noise": "dead_leaves"},
    },
    "noise": {
        "gaussian": {**FAST, "noise": "gaussian"},
        "uniform": {**FAST, "noise": "uniform"},
        "dead leaves": {**FAST, "noise": "dead_leaves"},
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--student", default="tiny_cnn")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--iters-per-epoch", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workdir", default="runs/distill_digits")
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir)
    teacher = work / "teacher_resnet20.safetensors"
    if not teacher.exists():
        Trainer(TrainConfig(arch="resnet20", data="digits", val="digits:test", epochs=15,
                            batch_size=64), teacher, force=True).run()
    rows = []
    for group in args.variants:
        for name, kw in VARIANTS[group].items():
            cfg = DistillConfig(teacher=str(teacher), student=args.student, epochs=args.epochs,
                                iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size,
                                val="digits:test", val_every=args.epochs, **kw)
            t0 = time.perf_counter()
            r = DistillRun(cfg, work / "student.safetensors", force=True).run()
            row = {"group": group, "variant": name, "current": r["val_top1_current"],
                   "running": r["val_top1_running"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nresnet20 -> {args.student}, {args.epochs} x {args.iters_per_epoch} batches of "
          f"{args.batch_size}, digits:test top-1\n")
    print("| variant | current BN | running BN | wall |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['current']:.1f}% | {r['running']:.1f}% | "
              f"{r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
