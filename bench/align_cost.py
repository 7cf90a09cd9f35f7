"""What batch alignment (--teacher-norm-align) costs in the teacher's forward pass.

A GroupNorm teacher answers noise in three ways, timed alternately in one process
(median of ``--repeats`` rounds of ``--iters`` forwards under inference mode, NHWC):

* ``per sample``: its own GroupNorm, no alignment (what kdtool refuses to distil from);
* ``aligned``: ``kdtool.distill.align.batch_aligned``, the per-channel batch standardisation
  computed by BatchNorm's fused kernel (training mode, no running statistics);
* ``aligned, composite``: the same arithmetic as separate ops (var_mean, subtract, rsqrt,
  multiply, affine), as kdtool computed it before session 16; its largest difference from
  ``aligned`` is printed as a check;

and the same network with BatchNorm on batch statistics (``resnet8`` in train mode) for scale.

    python bench/align_cost.py --threads 2
    python bench/align_cost.py --threads 2 --channels 3 --size 32 --batch-size 128
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdtool.bn import swapped_forward
from kdtool.distill.align import batch_aligned, per_sample_norms
from kdtool.models import create_model


def composite_aligned(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
    var, mean = torch.var_mean(xhat, dim=(0, 2, 3), keepdim=True, unbiased=False)
    z = (xhat - mean) * torch.rsqrt(var + m.eps)
    return z * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="resnet8_gn", help="a GroupNorm zoo architecture")
    p.add_argument("--bn-teacher", default="resnet8", help="its BatchNorm counterpart")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nhwc = torch.channels_last
    gn = create_model(args.teacher, num_classes=10, in_chans=args.channels).train()
    bn = create_model(args.bn_teacher, num_classes=10, in_chans=args.channels).train()
    gn, bn = gn.to(memory_format=nhwc), bn.to(memory_format=nhwc)
    layers = [m for _, m in per_sample_norms(gn)]
    x = torch.randn(args.batch_size, args.channels, args.size, args.size)
    x = x.contiguous(memory_format=nhwc)

    def run_gn(ctx):
        def f():
            with ctx():
                return gn(x)
        return f

    def run_bn():
        return bn(x)  # train mode: batch statistics (a private model: its buffers may move)

    ways = {
        "per sample (GroupNorm as is)": run_gn(contextlib.nullcontext),
        "aligned (kdtool)": run_gn(lambda: batch_aligned(layers)),
        "aligned, composite ops": run_gn(lambda: swapped_forward(layers, composite_aligned)),
        f"{args.bn_teacher}, BatchNorm on batch statistics": run_bn,
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    with torch.inference_mode():
        ref = ways["aligned (kdtool)"]()
        diff = (ref - ways["aligned, composite ops"]()).abs().max().item()
        for f in ways.values():  # warm-up
            for _ in range(3):
                f()
        for _ in range(args.repeats):
            for name, f in ways.items():  # alternated, so drift hits every way alike
                t = time.perf_counter()
                for _ in range(args.iters):
                    f()
                times[name].append((time.perf_counter() - t) / args.iters * 1e3)
    base = statistics.median(times["aligned, composite ops"])
    print(f"{args.teacher} teacher forward, {args.batch_size}x{args.channels}x{args.size}x"
          f"{args.size}, NHWC, {torch.get_num_threads()} threads, median of {args.repeats} x "
          f"{args.iters}; aligned vs composite max |diff| {diff:.1e}\n")
    print("| forward | ms | composite / this |\n|---|---:|---:|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms:.2f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
