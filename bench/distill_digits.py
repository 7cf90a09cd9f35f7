"""CPU-scale distillation experiments on scikit-learn's digits (real data, no download).

Trains (once, cached in --workdir) a resnet20 teacher on ``digits``, then distils a
student for each named variant at the same noise budget and reports the student's
``digits:test`` accuracy on current and on running BN statistics, with wall time.

    python bench/distill_digits.py --variants schedule bn noise --epochs 30
    python bench/distill_digits.py --variants norm_align     # GroupNorm teacher (resnet8_gn)
    python bench/distill_digits.py --variants method --teacher cnn3 --teacher-epochs 10 \
        --epochs 15 --val digits --seeds 0 1 2 3 4 5         # the spread behind the method's test

A variant may name its own teacher architecture (``_teacher``, trained and cached the
same way). ``_no_align`` distils a GroupNorm teacher with its normalisers left per
sample: ``kdtool distill`` refuses such a teacher, so the bench switches the alignment
off from inside (``kdtool.distill.teacher.batch_aligned`` made a no-op) to measure it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from unittest import mock

import torch

import kdtool.distill.teacher
from kdtool.distill.loop import DistillConfig, DistillRun
from kdtool.train import TrainConfig, Trainer

FAST = {"schedule": "onecycle", "lr": 0.01, "balance": "off"}  # variants name their balance
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
        "gaussian, class-balanced": {**FAST, "balance": "reject"},
        "gaussian, class-weighted": {**FAST, "balance": "weight"},
        "dead leaves": {**FAST, "noise": "dead_leaves"},
        "dead leaves, class-balanced": {**FAST, "noise": "dead_leaves", "balance": "reject"},
        "dead leaves, class-weighted": {**FAST, "noise": "dead_leaves", "balance": "weight"},
    },
    "weight": {  # the free remedy against plain noise, to run over many seeds
        "gaussian": {**FAST},
        "gaussian, class-weighted": {**FAST, "balance": "weight"},
        "dead leaves": {**FAST, "noise": "dead_leaves"},
        "dead leaves, class-weighted": {**FAST, "noise": "dead_leaves", "balance": "weight"},
    },
    "pool": {
        "dead leaves, pool 4096 per epoch": {**FAST, "noise": "dead_leaves", "noise_pool": 4096},
        "dead leaves, pool 1024 per epoch": {**FAST, "noise": "dead_leaves", "noise_pool": 1024},
        "dead leaves, fresh every batch": {**FAST, "noise": "dead_leaves"},
    },
    "pool_weight": {  # pairs with the "weight" group's class-weighted dead leaves, per seed
        "dead leaves, class-weighted, pool 2048 per epoch": {
            **FAST, "noise": "dead_leaves", "balance": "weight", "noise_pool": 2048},
    },
    "norm_align": {
        "BatchNorm teacher (resnet8), current BN": {**FAST, "_teacher": "resnet8"},
        "GroupNorm teacher (resnet8_gn), batch-aligned": {
            **FAST, "_teacher": "resnet8_gn", "teacher_norm_align": True},
        "GroupNorm teacher (resnet8_gn), not aligned": {
            **FAST, "_teacher": "resnet8_gn", "teacher_norm_align": True, "_no_align": True},
    },
    "norm_align_weight": {  # the same with kdtool's default class weighting
        "GroupNorm teacher (resnet8_gn), batch-aligned, class-weighted": {
            **FAST, "_teacher": "resnet8_gn", "teacher_norm_align": True, "balance": "weight"},
        "GroupNorm teacher (resnet8_gn), not aligned, class-weighted": {
            **FAST, "_teacher": "resnet8_gn", "teacher_norm_align": True, "_no_align": True,
            "balance": "weight"},
    },
    "precision": {  # bf16 autocast on the CPU (--precision bf16) against fp32, defaults
        "gaussian, fp32": {**FAST, "balance": "weight", "precision": "fp32"},
        "gaussian, bf16": {**FAST, "balance": "weight", "precision": "bf16"},
        "dead leaves, fp32": {**FAST, "balance": "weight", "noise": "dead_leaves",
                              "precision": "fp32"},
        "dead leaves, bf16": {**FAST, "balance": "weight", "noise": "dead_leaves",
                              "precision": "bf16"},
    },
    "method": {  # tests/distill/test_distill.py::test_current_statistics_distil_running_...
        "teacher BN current": {**FAST},
        "teacher BN current, class-weighted": {**FAST, "balance": "weight"},
        "teacher BN running (classic KD)": {**FAST, "teacher_bn": "running"},
    },
    "method_paper": {  # the "method" group on the paper's schedule (Adam 1e-3 + plateau)
        "teacher BN current": {"balance": "off"},
        "teacher BN current, class-weighted": {"balance": "weight"},
        "teacher BN running (classic KD)": {"teacher_bn": "running", "balance": "off"},
    },
    "demo": {  # kdtool/demo.py's three students (its STUDENTS and full SCALE)
        "gaussian, teacher BN running (classic KD)": {**FAST, "teacher_bn": "running"},
        "gaussian, class-weighted": {**FAST, "balance": "weight"},
        "dead leaves, class-weighted, pool 4096 per epoch": {
            **FAST, "noise": "dead_leaves", "balance": "weight", "noise_pool": 4096},
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
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                   help="distillation seeds, one run each (teachers: seed 0)")
    p.add_argument("--teacher", default="resnet20", help="teacher of variants naming none")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--val", default="digits:test",
                   help="where students are scored (digits: the 1,437 train-split images)")
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir)
    rows = []
    for group in args.variants:
        for name, kw in VARIANTS[group].items():
            kw = dict(kw)
            arch = kw.pop("_teacher", args.teacher)
            no_align = kw.pop("_no_align", False)
            teacher = work / f"teacher_{arch}_{args.teacher_epochs}.safetensors"
            if not teacher.exists():
                r = Trainer(TrainConfig(arch=arch, data="digits", val="digits:test",
                                        epochs=args.teacher_epochs, batch_size=64),
                            teacher, force=True).run()
                print(json.dumps({"teacher": arch, "epochs": args.teacher_epochs,
                                  "digits_test_top1": r["val_top1"]}), flush=True)
            for seed in args.seeds:
                cfg = DistillConfig(teacher=str(teacher), student=args.student,
                                    epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                                    batch_size=args.batch_size, val=args.val,
                                    val_every=args.epochs, seed=seed, **kw)
                off = mock.patch.object(kdtool.distill.teacher, "batch_aligned",
                                        lambda layers: contextlib.nullcontext())
                t0 = time.perf_counter()
                with off if no_align else contextlib.nullcontext():
                    r = DistillRun(cfg, work / "student.safetensors", force=True).run()
                row = {"group": group, "variant": name, "teacher": arch, "seed": seed,
                       "current": r["val_top1_current"], "running": r["val_top1_running"],
                       "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nteacher -> {args.student}, {args.epochs} x {args.iters_per_epoch} batches of "
          f"{args.batch_size}, {args.val} top-1, seeds {' '.join(map(str, args.seeds))}\n")
    print("| teacher | variant | current BN | running BN | wall |\n|---|---|---|---|---|")
    for (arch, name), runs in _by_variant(rows).items():
        print(f"| {arch} | {name} | {_spread([r['current'] for r in runs])} | "
              f"{_spread([r['running'] for r in runs])} | "
              f"{sum(r['seconds'] for r in runs) / len(runs):.0f} s |")


def _by_variant(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["teacher"], r["variant"]), []).append(r)
    return out


def _spread(values: list[float]) -> str:
    """One run: its value; several: mean (min-max)."""
    mean = sum(values) / len(values)
    return f"{mean:.1f}%" if len(values) == 1 else (
        f"{mean:.1f}% ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
