"""CPU training and distillation steps: memory layout (NCHW, NHWC) and fused optimisers.

One fp32 step on the CPU, three ways, alternated in one process (medians of --repeats):

* ``before``: NCHW tensors and PyTorch's default (foreach) optimiser, what ``kdtool train``
  and ``kdtool distill`` ran on a CPU before NHWC and fused optimisers became the default;
* ``fused``: NCHW with the fused optimiser (``fused=True``: one kernel for all parameters);
* ``after``: NHWC (channels_last) models and inputs with the fused optimiser: what they run
  now (``--memory-format auto``).

A distillation step is kdtool's own: ``NoiseKD`` with a ``FrozenTeacher`` on current BN
statistics, Gaussian noise, Adam. A training step is cross-entropy and SGD + Nesterov. An
``infer`` case is one eager forward in eval mode (what ``kdtool bench``'s torch backends,
``predict`` and ``eval`` run), with no optimiser, so its ``fused`` column is empty. An
``adam`` or ``sgd`` case times the optimiser step alone (random gradients), where only the
fused column differs. Weights are random: speed does not depend on them.

    python bench/cpu_step_layout.py --threads 2 --repeats 5
    python bench/cpu_step_layout.py --threads 2 --cases distill:cnn3:tiny_cnn:1:8:256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kdtool.distill.distiller import NoiseKD
from kdtool.distill.teacher import FrozenTeacher
from kdtool.models import create_model

# distill:teacher:student:channels:size:batch; train|infer|adam|sgd:arch:-:channels:size:batch
DEFAULT_CASES = [
    "distill:cnn3:tiny_cnn:1:8:256",  # the method's test on digits
    "distill:resnet20:tiny_cnn:1:8:256",  # bench/distill_digits.py's pair
    "distill:resnet8:tiny_cnn:3:32:256",  # bench/distill_speed.py's CPU pair
    "distill:resnet8:resnet8:3:32:128",
    "distill:resnet34:resnet18:3:32:32",
    "train:resnet8:-:3:32:128",
    "train:resnet18:-:3:32:32",
    "train:mobilenetv2:-:3:32:64",
    "train:wrn16_8:-:3:32:16",
    "train:densenet121:-:3:32:16",
    "infer:resnet8:-:3:32:64",
    "infer:resnet18:-:3:32:1",
    "infer:resnet18:-:3:32:64",
    "infer:mobilenetv2:-:3:32:64",
    "adam:resnet18:-:3:32:1",
    "sgd:resnet18:-:3:32:1",
]
WAYS = {"before": (None, False), "fused": (None, True), "after": (torch.channels_last, True)}


def build_step(case: str, memory_format, fused: bool):
    kind, a, b, chans, size, batch = case.split(":")
    chans, size, batch = int(chans), int(size), int(batch)
    torch.manual_seed(0)
    x = torch.randn(batch, chans, size, size)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    if kind == "distill":
        teacher = FrozenTeacher(create_model(a, num_classes=10, in_chans=chans))
        teacher.to("cpu", memory_format)
        model = create_model(b, num_classes=10, in_chans=chans).to(memory_format=memory_format)
        kd = NoiseKD(model, teacher, class_weighted=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)

        def loss_fn():
            return sum(kd(x)[2].values())
    elif kind in ("train", "infer", "adam", "sgd"):
        model = create_model(a, num_classes=10, in_chans=chans).to(memory_format=memory_format)
        y = torch.randint(10, (batch,))
        if kind == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4, fused=fused)
        if kind == "infer":
            model.eval()

            def forward():
                with torch.inference_mode():
                    model(x)

            return forward
        if kind in ("adam", "sgd"):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            return opt.step

        def loss_fn():
            return F.cross_entropy(model(x), y)
    else:
        raise SystemExit(f"unknown kind '{kind}' in case '{case}' (distill, train, infer, "
                         "adam or sgd)")
    model.train()

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def ways_for(case: str) -> dict:
    kind = case.split(":")[0]
    if kind == "infer":  # no optimiser: layout only
        return {w: cfg for w, cfg in WAYS.items() if w != "fused"}
    if kind in ("adam", "sgd"):  # the optimiser alone: NCHW or NHWC holds the same numbers
        return {w: cfg for w, cfg in WAYS.items() if w != "after"}
    return WAYS


def measure(case: str, repeats: int, iters: int) -> dict[str, float]:
    steps = {way: build_step(case, *cfg) for way, cfg in ways_for(case).items()}
    for step in steps.values():  # warm-up: oneDNN primitives, optimiser state
        step()
        step()
    times: dict[str, list[float]] = {way: [] for way in steps}
    for _ in range(repeats):
        for way, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            times[way].append((time.perf_counter() - t0) / iters * 1e3)
    return {way: statistics.median(v) for way, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                   help="kind:teacher:student:channels:size:batch (train: kind:arch:-:...)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.5,
                   help="seconds each timed block runs at least (sets the steps per block)")
    p.add_argument("--threads", type=int, help="intra-op threads (torch's default otherwise)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, medians of "
          f"{args.repeats}\n")
    print("| step | teacher / model | student | input | before (NCHW, foreach) ms | "
          "fused ms | after (NHWC, fused) ms | speed-up over before |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for case in args.cases:
        probe = build_step(case, None, False)
        t0 = time.perf_counter()
        probe()
        probe()
        iters = max(1, round(args.min_time / max((time.perf_counter() - t0) / 2, 1e-6)))
        m = measure(case, args.repeats, iters)
        kind, a, b, chans, size, batch = case.split(":")
        last = m.get("after", m.get("fused"))
        cells = " | ".join(f"{m[w]:.2f}" if w in m else "-" for w in WAYS)
        print(f"| {kind} | {a} | {b if kind == 'distill' else '-'} | {batch}x{chans}x{size}x"
              f"{size} | {cells} | {m['before'] / last:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
