"""What ``--ema`` costs a step: ``WeightEMA.update`` against one training step, side by side.

For each architecture: one training step (forward, backward, Adam; batch --batch-size at
32x32) and one average update of the same model, alternated in one process, medians.

    python bench/ema_cost.py --arch resnet8 resnet18 --batch-size 64
    python bench/ema_cost.py --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdtool.ema import WeightEMA
from kdtool.models import create_model


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(arch: str, batch_size: int, repeats: int, dev: torch.device) -> str:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_chans=3).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = WeightEMA(model, 0.999)
    x = torch.randn(batch_size, 3, 32, 32, device=dev)
    y = torch.randint(10, (batch_size,), device=dev)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up (allocator, Adam state)
        step()
        ema.update()
    steps, updates = [], []
    for _ in range(repeats):
        steps.append(timed(step, dev))
        updates.append(timed(ema.update, dev))
    s, u = statistics.median(steps) * 1e3, statistics.median(updates) * 1e3
    n = sum(t.numel() for t in model.parameters())
    return f"| {arch} | {n / 1e6:.2f}M | {s:.1f} | {u:.3f} | {100 * u / s:.2f}% |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["resnet8", "resnet18"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print("| arch | params | step ms | EMA update ms | share of a step |\n"
          "|---|---:|---:|---:|---:|")
    for arch in args.arch:
        print(measure(arch, args.batch_size, args.repeats, dev), flush=True)


if __name__ == "__main__":
    main()
