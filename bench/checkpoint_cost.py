"""What per-epoch checkpointing costs the training loop: written on the main thread (each
file saved in turn, as kdtool did before) against ``RunCheckpoint.save`` (a snapshot on the
main thread, the writing on a background thread), side by side in one process.

Each "epoch" is ``--epoch-seconds`` of waiting (on a GPU the main thread mostly waits on
the device), then the run's per-epoch save: the output checkpoint (the student, or the best
teacher so far) and the run state (model, optimiser, scheduler, history). Reported: the
seconds per epoch the main thread is held by saving, median over ``--epochs``, for a CIFAR
ResNet-18 with SGD + momentum (``kdtool train``) and with Adam (``kdtool distill``).

    python bench/checkpoint_cost.py [--epochs 8] [--epoch-seconds 1.0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdtool.checkpoint import ModelMeta, save_checkpoint
from kdtool.models import create_model
from kdtool.runstate import RunCheckpoint, save_state


def run_parts(optimizer: str):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # optimiser state exists, as after the first epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=10_000)
    meta = ModelMeta(arch="resnet18", num_classes=10, in_chans=3, input_size=[32, 32],
                     mean=[0.5] * 3, std=[0.25] * 3, class_names=[str(i) for i in range(10)])
    return model, opt, sched, meta


def held_per_epoch(mode: str, optimizer: str, folder: Path, epochs: int,
                   epoch_seconds: float) -> list[float]:
    model, opt, sched, meta = run_parts(optimizer)
    out = folder / f"{mode}_{optimizer}.safetensors"
    ckpt = RunCheckpoint(out, force=True, resume=False)
    history: list[dict] = []
    held = []
    with ckpt.writing():
        for epoch in range(epochs):
            time.sleep(epoch_seconds)
            history.append({"epoch": epoch + 1, "loss": 1.0 / (epoch + 1)})
            t0 = time.perf_counter()
            if mode == "main thread":
                save_checkpoint(out, model, meta, force=True)
                save_state(ckpt.path, {
                    "config": {}, "epoch": epoch, "best": 0.0, "history": history,
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict()})
            else:
                ckpt.save({}, epoch, 0.0, history, model, opt, sched, output=meta)
            held.append(time.perf_counter() - t0)
    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--epoch-seconds", type=float, default=1.0,
                    help="the time between two saves (a ResNet-18 CIFAR epoch on a big GPU)")
    ap.add_argument("--dir", default=None, help="where the files go (default: a temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        print(f"files in {folder}; {args.epochs} epochs of {args.epoch_seconds} s each")
        print(f"{'optimiser':<10} {'written on':<18} {'held per epoch (median)':>24} "
              f"{'max':>8}")
        for optimizer in ("sgd", "adam"):
            rows = {}
            # Alternate the two modes, so that drifting disk speed hits both alike.
            for mode in ("main thread", "background", "main thread", "background"):
                rows.setdefault(mode, []).extend(
                    held_per_epoch(mode, optimizer, folder, args.epochs // 2 or 1,
                                   args.epoch_seconds))
            for mode, held in rows.items():
                print(f"{optimizer:<10} {mode:<18} {statistics.median(held):>22.3f} s "
                      f"{max(held):>7.3f}s")
            ratio = statistics.median(rows["main thread"]) / statistics.median(rows["background"])
            print(f"{optimizer:<10} {'ratio':<18} {ratio:>23.1f}x")


if __name__ == "__main__":
    main()
