"""Distillation images/s: kdtool's real loop against a straightforward baseline loop.

Both loops distil a random-weight teacher into a student on Gaussian noise, with
the teacher's BN layers on batch statistics, soft cross-entropy and Adam 1e-3,
on the same device in one process:

* baseline: the authors' style (Piyush-555/GaussianDistillation): fp32 eager,
  NCHW, the teacher simply in ``.train()`` mode under ``torch.no_grad`` (which
  also overwrites its running statistics; harmless here, it is a private copy),
  noise drawn with ``torch.randn`` on the CPU and copied to the device every
  iteration, and ``loss.item()`` every iteration, as a logging loop does;
* kdtool: ``DistillRun(DistillConfig(...)).run()``, the code ``kdtool distill``
  runs (noise on the device, bf16 autocast on CUDA, NHWC and a fused Adam, BN via
  ``kdtool.bn.batch_stats``, a host sync every ``log_every`` steps, optionally
  ``torch.compile``).

Each loop runs ``--epochs`` epochs of ``--iters`` iterations; the last epoch's
images/s counts, so the first one pays for warm-up (cudnn autotuning,
allocation, compilation). Prints one JSON line per measurement, then a
Markdown table with the ratio kdtool / baseline.

    python bench/distill_speed.py                                # CPU: resnet8 -> tiny_cnn
    python bench/distill_speed.py --device cuda                  # resnet34 -> resnet18, 256
    python bench/distill_speed.py --device cuda --compile
    python bench/distill_speed.py --device cuda --profile prof/   # + where the time goes

``--profile DIR`` then runs kdtool's loop once more under ``torch.profiler`` (after
``--profile-skip`` warm-up iterations, ``--profile-steps`` recorded) and writes
``DIR/kernels.txt`` (operators and kernels by self time on the device, or on the CPU
without CUDA), ``DIR/phases.json`` (noise / forward / backward / optimizer, the loop's
labelled ranges) and ``DIR/trace.json`` (open in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdtool.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from kdtool.device import resolve_device
from kdtool.distill.loop import DistillConfig, DistillRun
from kdtool.models import create_model

# (CUDA, CPU) defaults: the GPU pair, and a pair that runs in seconds on 2 cores.
DEFAULTS = {"teacher": ("resnet34", "resnet8"), "student": ("resnet18", "tiny_cnn"),
            "batch_size": (256, 256), "iters": (100, 10)}
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="teacher architecture (resnet34 on CUDA, resnet8 on CPU)")
    p.add_argument("--student", help="student architecture (resnet18 on CUDA, tiny_cnn on CPU)")
    p.add_argument("--batch-size", type=int, help="noise batch size (256)")
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--iters", type=int, help="iterations per epoch (100 on CUDA, 10 on CPU)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs per loop; only the last is timed (the others warm up)")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate baseline and kdtool this many times; report the medians")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int,
                   help="CPU intra-op threads (torch's default otherwise); 1 is steadier on a "
                        "machine shared with other jobs")
    p.add_argument("--compile", action="store_true", help="torch.compile kdtool's step")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="kdtool's step: auto (bf16 on CUDA, fp32 on a CPU), fp32 or bf16; "
                        "the baseline is always fp32")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for kdtool's step (implies --compile): default, "
                        "reduce-overhead (CUDA graphs), max-autotune, ...")
    p.add_argument("--baseline-noise", choices=("cpu", "device"), default="cpu",
                   help="where the baseline draws its noise: cpu (+ copy, the default) or "
                        "device (what the authors' distill_gaussian.py does)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also profile kdtool's loop and write kernels.txt, phases.json, trace.json")
    p.add_argument("--profile-skip", type=int, default=5, help="iterations before recording")
    p.add_argument("--profile-steps", type=int, default=5, help="iterations recorded")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the ATen operators one step of kdtool's loop dispatches "
                        "(each a kernel launch on CUDA; the count barely depends on the batch)")
    p.add_argument("--baseline-cudnn-benchmark", action="store_true",
                   help="let the baseline use cudnn.benchmark too (kdtool always does on CUDA)")
    args = p.parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    pick = 0 if args.device.type == "cuda" else 1
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[pick])
    if min(args.iters, args.epochs, args.repeats) < 1 or args.batch_size < 2:
        p.error("--iters, --epochs and --repeats must be >= 1 and --batch-size >= 2")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_teacher(args, path: Path) -> Path:
    """A random-weight teacher checkpoint: speed does not depend on what it learnt."""
    torch.manual_seed(SEED)
    model = create_model(args.teacher, num_classes=args.num_classes, in_chans=args.channels)
    meta = ModelMeta(arch=args.teacher, num_classes=args.num_classes, in_chans=args.channels,
                     input_size=[args.size, args.size], mean=[0.5] * args.channels,
                     std=[0.25] * args.channels)
    return save_checkpoint(path, model, meta, force=True)


def baseline(args, teacher_path: Path) -> list[float]:
    """images/s of each epoch of the straightforward loop."""
    dev = args.device
    if dev.type == "cuda":
        # DistillRun switches cudnn.benchmark on for the process; the authors' code leaves
        # PyTorch's default (off). Set it either way so the order of the runs does not matter.
        torch.backends.cudnn.benchmark = args.baseline_cudnn_benchmark
    # A fresh copy from the checkpoint: .train() below rewrites its running statistics.
    teacher, _ = load_checkpoint(teacher_path)
    teacher = teacher.to(dev).train()
    torch.manual_seed(SEED)
    student = create_model(args.student, num_classes=args.num_classes,
                           in_chans=args.channels).to(dev).train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    shape = (args.batch_size, args.channels, args.size, args.size)
    noise_dev = dev if args.baseline_noise == "device" else torch.device("cpu")
    rates = []
    for _ in range(args.epochs):
        total = 0.0
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            x = torch.randn(shape, device=noise_dev).to(dev)
            with torch.no_grad():
                soft = F.softmax(teacher(x), dim=1)
            loss = -(soft * F.log_softmax(student(x), dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()  # a host sync per iteration, as a logging loop does
        sync(dev)
        rates.append(args.iters * args.batch_size / (time.perf_counter() - t0))
    return rates


def loop_config(args, teacher_path: Path, epochs: int, iters: int) -> DistillConfig:
    return DistillConfig(teacher=str(teacher_path), student=args.student, noise="gaussian",
                         teacher_bn="current", loss="soft_ce", epochs=epochs,
                         iters_per_epoch=iters, batch_size=args.batch_size,
                         optimizer="adam", lr=1e-3, seed=SEED, device=str(args.device),
                         compile=args.compile, compile_mode=args.compile_mode or "default",
                         precision=args.precision)


def kdtool_loop(args, teacher_path: Path, out: Path) -> list[float]:
    """images/s of each epoch of ``kdtool distill``'s own loop, as its history reports."""
    cfg = loop_config(args, teacher_path, args.epochs, args.iters)
    result = DistillRun(cfg, out, force=True).run()
    return [row["images_per_s"] for row in result["history"]]


def count_ops(args, teacher_path: Path, out: Path, steps: int = 4) -> dict:
    """ATen operators one iteration of kdtool's loop dispatches, the optimiser step aside
    (median over ``steps``).

    Each is one CPU trip through PyTorch's dispatcher and, on CUDA, about one kernel
    launch: times the per-op CPU cost, it bounds the step when kernels are short. The
    optimiser is left out: it is fused (a few kernels for all parameters).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0
        paused = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += not Counter.paused
            return func(*args, **(kwargs or {}))

    real_step = torch.optim.Adam.step

    def uncounted_step(self, *a, **kw):
        Counter.paused = True
        try:
            return real_step(self, *a, **kw)
        finally:
            Counter.paused = False

    cfg = loop_config(args, teacher_path, 1, steps + 1)
    cfg.compile = False
    run = DistillRun(cfg, out / "student_ops.safetensors", force=True)
    marks: list[int] = []
    run.step_hook = lambda: marks.append(Counter.n)
    torch.optim.Adam.step = uncounted_step
    try:
        with Counter():
            run.run()
    finally:
        torch.optim.Adam.step = real_step
    per_step = [b - a for a, b in itertools.pairwise(marks)]  # the first step sets things up
    return {"device": device_name(args.device), "teacher": args.teacher,
            "student": args.student, "aten_ops_per_step": int(statistics.median(per_step))}


def profile(args, teacher_path: Path, out: Path) -> dict:
    """kdtool's loop under torch.profiler: kernel table, phase times and a trace in ``out``."""
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    cuda = args.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    iters = args.profile_skip + args.profile_steps
    cfg = loop_config(args, teacher_path, 1, iters)
    run = DistillRun(cfg, out / "student.safetensors", force=True)
    with torch_profile(activities=activities,
                       schedule=schedule(wait=max(0, args.profile_skip - 1), warmup=min(
                           1, args.profile_skip), active=args.profile_steps)) as prof:
        run.step_hook = prof.step
        run.run()
    events = prof.key_averages()
    where = "device" if cuda else "cpu"
    sort = f"self_{where}_time_total"
    (out / "kernels.txt").write_text(events.table(sort_by=sort, row_limit=40))
    prof.export_chrome_trace(str(out / "trace.json"))
    steps = args.profile_steps
    phases = {}
    for e in events:
        if e.key.startswith("distill/"):
            row = phases.setdefault(e.key[8:], {"cpu_ms": 0.0, "device_ms": 0.0})
            row["cpu_ms"] += e.cpu_time_total / 1e3 / steps
            row["device_ms"] += getattr(e, "device_time_total", 0.0) / 1e3 / steps
    top = sorted(events, key=lambda e: getattr(e, sort, 0.0), reverse=True)[:10]
    result = {"device": device_name(args.device), "steps": steps,
              "phases_ms_per_step": {k: {m: round(v, 3) for m, v in r.items()}
                                     for k, r in phases.items()},
              "top_self_ms_per_step": {e.key: round(getattr(e, sort) / 1e3 / steps, 3)
                                       for e in top}}
    (out / "phases.json").write_text(json.dumps(result, indent=1))
    return result


def run(args) -> dict:
    name = device_name(args.device)
    common = {"device": name, "precision": args.precision, "teacher": args.teacher,
              "student": args.student,
              "batch_size": args.batch_size, "size": args.size, "channels": args.channels,
              "iters": args.iters, "epochs": args.epochs, "torch": torch.__version__}
    base, fast = [], []
    compiled = (args.compile_mode or "default") if args.compile else False  # the mode, or off
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = save_teacher(args, Path(tmp) / "teacher.safetensors")
        for r in range(args.repeats):
            # Alternating spreads drift (clocks, a neighbour's load) over both loops.
            rates = baseline(args, teacher_path)
            base.append(rates[-1])
            print(json.dumps({"loop": "baseline", **common, "repeat": r,
                              "noise": args.baseline_noise,
                              "cudnn_benchmark": args.baseline_cudnn_benchmark
                              if args.device.type == "cuda" else None,
                              "images_per_s": round(rates[-1], 1),
                              "epoch_images_per_s": [round(v, 1) for v in rates]}), flush=True)
            rates = kdtool_loop(args, teacher_path, Path(tmp) / f"student{r}.safetensors")
            fast.append(rates[-1])
            print(json.dumps({"loop": "kdtool", **common, "repeat": r, "compile": compiled,
                              "images_per_s": round(rates[-1], 1),
                              "epoch_images_per_s": [round(v, 1) for v in rates]}), flush=True)
        if args.count_ops:
            print(json.dumps(count_ops(args, teacher_path, Path(tmp))), flush=True)
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            print(json.dumps({"profile": str(args.profile),
                              **profile(args, teacher_path, args.profile)}), flush=True)
    b, k = statistics.median(base), statistics.median(fast)
    return {**common, "compile": compiled, "baseline_images_per_s": b,
            "kdtool_images_per_s": k, "ratio": k / b}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    s = run(args)
    kd = f"kdtool + compile ({s['compile']})" if s["compile"] else "kdtool"
    kd += f", {s['precision']}" if s["precision"] != "auto" else ""
    print(f"\n| device | teacher -> student | batch | baseline img/s | {kd} img/s | ratio |\n"
          "|---|---|---|---:|---:|---:|\n"
          f"| {s['device']} | {s['teacher']} -> {s['student']} | {s['batch_size']} | "
          f"{s['baseline_images_per_s']:,.0f} | {s['kdtool_images_per_s']:,.0f} | "
          f"{s['ratio']:.2f}x |")
    return s


if __name__ == "__main__":
    main()
