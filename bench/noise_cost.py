"""Cost of generating a noise batch, against the distillation step it feeds.

Times ``NoiseSource.sample`` for every kind (batch 256, 32x32x3 by default) and
one distillation-like step: a teacher forward in train mode under no_grad, a
student forward/backward with soft cross-entropy, and an Adam step. Prints the
noise/step ratio (the issue's target: under 10% for ResNet-34 -> ResNet-18 at
batch 256 on a GPU).

    python bench/noise_cost.py                      # CPU: resnet8 -> tiny_cnn, batch 256
    python bench/noise_cost.py --device cuda        # adds resnet34 -> resnet18 at batch 256

On CPU the resnet34 -> resnet18 pair runs at ``--big-batch`` (64) only if one
step takes under ``--big-limit`` seconds.

``--reference DIR`` also times the dead-leaves renderer of another checkout (e.g. a
``git worktree`` of an older commit), in the same process, for a side-by-side ratio:

    git worktree add /tmp/kd_ref 256865f && python bench/noise_cost.py --reference /tmp/kd_ref
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdtool.distill.dead_leaves import render_dead_leaves
from kdtool.distill.noise import NOISE_KINDS, make_noise
from kdtool.distill.pool import PooledNoise
from kdtool.models import create_model

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def distill_step(teacher_arch: str, student_arch: str, batch: int, size: int, device):
    teacher = create_model(teacher_arch).to(device).train()
    student = create_model(student_arch).to(device).train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)

    def step():
        with torch.no_grad():
            soft = teacher(x).softmax(1)
        loss = -(soft * F.log_softmax(student(x), 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def reference_renderer(src_dir: str):
    """``render_dead_leaves`` from another checkout's distill/ (loaded as a module)."""
    for name in ("dead_leaves.py", "noise.py"):  # the renderer moved to dead_leaves.py
        path = Path(src_dir) / "distill" / name
        if path.exists() and "def render_dead_leaves" in path.read_text():
            spec = importlib.util.spec_from_file_location(f"reference_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.render_dead_leaves
    raise SystemExit(f"no render_dead_leaves under {src_dir}/distill")


def noise_times(batch: int, size: int, device, repeats: int, pool: int, iters: int,
                reference=None, growths=()) -> dict:
    out = {}
    for kind in NOISE_KINDS:
        src = make_noise(kind, 3, (size, size), CIFAR_MEAN, CIFAR_STD, device)
        gen = torch.Generator(device=device).manual_seed(0)
        out[kind] = timed(lambda src=src, gen=gen: src.sample(batch, gen), device, repeats)
        if kind == "dead_leaves" and reference is not None:
            out["dead_leaves_reference"] = timed(
                lambda g=gen: reference(batch, g, channels=3, size=(size, size), device=device),
                device, repeats)
        if kind == "dead_leaves":
            for g in growths:  # the renderer alone
                out[f"dead_leaves_growth{g:g}"] = timed(
                    lambda g=g, gen=gen: render_dead_leaves(
                        batch, gen, channels=3, size=(size, size), device=device,
                        window_growth=g),
                    device, repeats)
            out["dead_leaves_leaves"] = src.options["leaves"]
            # --noise-pool: the per-epoch refill spread over the epoch's steps, plus a draw
            pooled = PooledNoise(src, pool)
            refill = timed(lambda p=pooled, g=gen: p.start_epoch(g), device, max(1, repeats // 2))
            draw = timed(lambda p=pooled, g=gen: p.sample(batch, g), device, repeats)
            out[f"dead_leaves_pool{pool}"] = refill / iters + draw
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--big-batch", type=int, default=64, help="resnet34 -> resnet18 on CPU")
    p.add_argument("--big-limit", type=float, default=20.0, help="skip the big pair if slower")
    p.add_argument("--pool", type=int, default=4096, help="--noise-pool size to time")
    p.add_argument("--iters", type=int, default=196, help="steps per epoch the refill spreads over")
    p.add_argument("--reference", help="another checkout whose dead-leaves renderer to time too")
    p.add_argument("--window-growth", type=float, nargs="+", default=[],
                   help="also time the renderer with these window-side ratios (default 1.3; "
                   "larger: fewer, larger kernels)")
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    # Other processes on the machine distort CPU timings (small ops most): say how busy it was.
    print(json.dumps({"device": where, "load_avg_1min": round(os.getloadavg()[0], 2)}))

    pairs = [("resnet8", "tiny_cnn", args.batch)]
    big_batch = args.batch if device.type == "cuda" else args.big_batch
    pairs.append(("resnet34", "resnet18", big_batch))
    reference = reference_renderer(args.reference) if args.reference else None
    rows = []
    for teacher, student, batch in pairs:
        step = distill_step(teacher, student, batch, args.size, device)
        first = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - first > args.big_limit:
            print(json.dumps({"skipped": f"{teacher}->{student}", "first_step_s":
                              round(time.perf_counter() - first, 2)}), flush=True)
            continue
        slow = teacher == "resnet34" and device.type == "cpu"
        step_s = timed(step, device, 2 if slow else args.repeats)
        noise = noise_times(batch, args.size, device, args.repeats, args.pool, args.iters,
                            reference, args.window_growth)
        kinds = [*NOISE_KINDS, f"dead_leaves_pool{args.pool}"]
        if reference is not None:
            kinds.insert(kinds.index("dead_leaves") + 1, "dead_leaves_reference")
        at = kinds.index("dead_leaves") + 1
        kinds[at:at] = [f"dead_leaves_growth{g:g}" for g in args.window_growth]
        for kind in kinds:
            row = {"device": where, "pair": f"{teacher}->{student}", "batch": batch,
                   "size": args.size, "kind": kind, "noise_ms": round(noise[kind] * 1e3, 2),
                   "step_ms": round(step_s * 1e3, 1),
                   "ratio_pct": round(100 * noise[kind] / step_s, 2)}
            if kind == "dead_leaves":
                row["leaves_per_image"] = noise["dead_leaves_leaves"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{where}, {args.size}x{args.size}x3, median of {args.repeats} calls "
          "(steps of resnet34 on CPU: of 2)\n")
    print("| pair | batch | step ms | noise | noise ms | noise / step |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['batch']} | {r['step_ms']:,.1f} | {r['kind']} | "
              f"{r['noise_ms']:,.2f} | {r['ratio_pct']:.2f}% |")


if __name__ == "__main__":
    main()
