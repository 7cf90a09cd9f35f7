"""The paper at real scale on one GPU: CIFAR-10 ResNet-34 teacher -> ResNet-18 students.

Trains (or loads, with --teacher) a ResNet-34 teacher on train45k, then distils ResNet-18
from Gaussian and from dead-leaves noise with the teacher on current statistics, plus a
short running-statistics baseline, and prints val5k accuracies and wall times as a table.
The distillation epochs are sized from --budget-min (total minutes) after measuring the
step rate, so the whole script fits the budget.

    python bench/cifar_distill.py --data ../shared/data/cifar10 --budget-min 9

At CPU scale (2 cores, about an hour): a ResNet-8 teacher and student, shorter epochs,
with the class-weighted runs too:

    python bench/cifar_distill.py --data .data/cifar10 --teacher-arch resnet8 \
        --student resnet8 --teacher-epochs 15 --epochs 10 --iters-per-epoch 100 --weighted

Anchors (paper, R34 93.3% teacher): Gaussian CS 86.0, dead leaves CS 89.4, Gaussian RS
13.5. Runs at toy scale on CPU with --smoke (tests the plumbing, not the figures).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdtool.checkpoint import read_meta
from kdtool.distill.loop import DistillConfig, DistillRun
from kdtool.train import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--teacher", help="an existing teacher checkpoint (skips training)")
    p.add_argument("--budget-min", type=float, default=9.0)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, help="distillation epochs of every current-BN run "
                   "(default: sized from --budget-min)")
    p.add_argument("--pool", type=int, default=4096,
                   help="also distil from a dead-leaves --noise-pool of this size (0: skip)")
    p.add_argument("--workdir", default="runs/cifar_distill")
    p.add_argument("--teacher-arch", default="resnet34")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--iters-per-epoch", type=int, default=196)
    p.add_argument("--lr", type=float, default=0.002, help="Adam one-cycle peak rate")
    p.add_argument("--weighted", action="store_true",
                   help="also distil each noise with --balance weight")
    p.add_argument("--noises", nargs="+", default=["gaussian", "dead_leaves"],
                   choices=["gaussian", "dead_leaves"], help="noises to distil from")
    p.add_argument("--ema", type=float, default=0.0,
                   help="distil with --ema DECAY: each student's table row is the weight "
                   "average, with the live weights' accuracy beside it")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (kdtool distill)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the same pipeline")
    args = p.parse_args()
    t_start = time.perf_counter()
    work = Path(args.workdir)
    data = Path(args.data)
    train, val = str(data / "train45k.zip"), str(data / "val5k.zip")
    t_arch, s_arch = ("resnet8", "tiny_cnn") if args.smoke else (args.teacher_arch,
                                                                 args.student)
    rows = []
    teacher = Path(args.teacher) if args.teacher else work / f"teacher_{t_arch}.safetensors"
    if args.teacher:  # the table names the teacher's real architecture
        t_arch = read_meta(teacher).arch
    else:
        t0 = time.perf_counter()
        r = Trainer(TrainConfig(arch=t_arch, data=train, val=val,
                                epochs=1 if args.smoke else args.teacher_epochs,
                                batch_size=512, lr=0.4, label_smoothing=0.1, cutout=16),
                    teacher, force=True).run()
        rows.append({"run": f"teacher {t_arch}", "val_top1": r["val_top1"],
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    iters = 4 if args.smoke else args.iters_per_epoch
    # (name, noise, teacher BN, noise pool, --balance, share of the epochs)
    runs = [("dead leaves, current BN", "dead_leaves", "current", 0, "off", 1.0),
            ("gaussian, current BN", "gaussian", "current", 0, "off", 1.0),
            ("gaussian, running BN (baseline)", "gaussian", "running", 0, "off", 0.25)]
    if args.pool:
        runs.insert(1, (f"dead leaves, pool {args.pool}, current BN", "dead_leaves", "current",
                        args.pool, "off", 1.0))
    if args.weighted:
        runs += [("dead leaves, class-weighted, current BN", "dead_leaves", "current", 0,
                  "weight", 1.0),
                 ("gaussian, class-weighted, current BN", "gaussian", "current", 0, "weight",
                  1.0)]
    runs = [run for run in runs if run[1] in args.noises]  # before sizing by the budget
    if args.epochs:
        base = args.epochs
    else:  # one epoch of the heaviest noise sizes the epochs from the remaining budget
        probe = DistillRun(DistillConfig(teacher=str(teacher), student=s_arch,
                                         noise="dead_leaves", epochs=1, iters_per_epoch=iters,
                                         schedule="onecycle", lr=args.lr),
                           work / "probe.safetensors", force=True).run()
        left = args.budget_min * 60 - (time.perf_counter() - t_start)
        base = left / sum(w for *_, w in runs) / (probe["seconds"] * 1.1)
    for name, noise, bn, pool, balance, w in runs:
        epochs = max(1, int(base * w))
        t0 = time.perf_counter()
        r = DistillRun(DistillConfig(teacher=str(teacher), student=s_arch, noise=noise,
                                     teacher_bn=bn, noise_pool=pool, balance=balance,
                                     epochs=epochs, iters_per_epoch=iters, schedule="onecycle",
                                     lr=args.lr, val=val, val_every=epochs, ema=args.ema,
                                     precision=args.precision),
                       work / f"{noise}_{bn}_{pool}_{balance}.safetensors", force=True).run()
        rows.append({"run": name, "epochs": epochs, "val_top1": r["val_top1_current"],
                     "teacher_class_balance": r["teacher_class_balance"],
                     "images_per_s": r["images_per_s"],
                     "val_top1_running": r["val_top1_running"],
                     **({"val_top1_live": r["val_top1_current_live"]} if args.ema else {}),
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}; {t_arch} -> {s_arch}; val5k top-1 (students: current BN, batch 256)\n")
    live = f" | live weights (--ema {args.ema})" if args.ema else ""
    print(f"| run | epochs | val5k top-1 | running-BN top-1{live} | img/s (last epoch) | wall |"
          "\n|---|---|---|---|" + "---|" * bool(args.ema) + "---|---|")
    for r in rows:
        speed = f"{r['images_per_s']:,.0f}" if "images_per_s" in r else ""
        running = f"{r['val_top1_running']:.2f}%" if "val_top1_running" in r else ""
        ema = (f" {r['val_top1_live']:.2f}% |" if "val_top1_live" in r else " |") * bool(args.ema)
        print(f"| {r['run']} | {r.get('epochs', '')} | {r['val_top1']:.2f}% | {running} |{ema} "
              f"{speed} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
