"""Does this CPU run an INT8 QDQ file right? Four ways to run one file on ONNX Runtime's CPU
provider, each against the graph's exact meaning and against PyTorch.

* plain: a plain ``onnxruntime.InferenceSession`` of the file;
* exact: the same with graph optimisation off, so every Q/DQ pair runs as written around
  float ops (the reference: what the file means, on any CPU);
* uint8 activations: kdtool's activation re-encoding alone (what kdtool did before the
  weight probe);
* kdtool: ``open_session`` as ``kdtool bench``/``serve``/``export`` use it (activations,
  and on CPUs whose int8-weight kernels overflow also weights, as uint8).

On x86 with VNNI all four agree to rounding; on x86 without it (AVX2, AVX-512 alone) the
int8-weight kernels overflow and only "exact" and "kdtool" are right. Latency is the
median of 7 alternating rounds of one call on the whole set.

    python bench/int8_cpu_exactness.py runs/demo/student.cal.safetensors \\
        runs/demo/student.int8.onnx --fp32 runs/demo/student.onnx --data digits:test
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch

from kdtool.checkpoint import load_checkpoint, read_meta
from kdtool.data import load_data
from kdtool.deploy.bench import machine_info
from kdtool.export.cpu_int8 import (
    cpu_session,
    int8_activations_to_uint8,
    int8_weights_exact,
)
from kdtool.export.ort_session import open_session
from kdtool.export.parity import normalise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the kdtool checkpoint the INT8 file was exported from")
    p.add_argument("onnx", help="the INT8 ONNX file (kdtool export --precision int8)")
    p.add_argument("--data", default="digits:test", help="labelled images (a kdtool dataset)")
    p.add_argument("--limit", type=int, default=1000, help="images to use (first N)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp32", help="the FP32 ONNX file of the same checkpoint, timed beside")
    args = p.parse_args()

    meta = read_meta(args.checkpoint)
    data = load_data(args.data, image_size=tuple(meta.input_size), channels=meta.in_chans)
    x = np.ascontiguousarray(normalise(data.x[: args.limit], meta.mean, meta.std))
    y = data.y[: args.limit].numpy()
    model = load_checkpoint(args.checkpoint)[0].eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()

    activations_only = onnx.load(args.onnx)
    int8_activations_to_uint8(activations_only)
    sessions = {
        "plain": cpu_session(args.onnx, threads=args.threads),
        "exact": cpu_session(args.onnx, fused=False, threads=args.threads),
        "uint8 activations": cpu_session(activations_only.SerializeToString(),
                                      threads=args.threads),
        "kdtool": open_session(args.onnx, threads=args.threads).session,
    }
    if args.fp32:
        sessions["fp32 (for speed)"] = cpu_session(args.fp32, threads=args.threads)
    name = sessions["plain"].get_inputs()[0].name
    outs = {k: s.run(None, {name: x})[0] for k, s in sessions.items()}
    rounds: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(7):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {name: x})
            rounds[k].append(time.perf_counter() - t)

    print(f"CPU: {machine_info()['cpu']}; onnxruntime {ort.__version__}; "
          f"int8 weights exact here: {int8_weights_exact()}; {len(x)} images of {args.data}; "
          f"torch fp32 top-1 {(ref.argmax(1) == y).mean() * 100:.2f}%")
    print("| session | top-1 | agreement with torch | max abs diff vs exact | ms per call |")
    print("|---|---:|---:|---:|---:|")
    for k, out in outs.items():
        print(f"| {k} | {(out.argmax(1) == y).mean() * 100:.2f}% "
              f"| {(out.argmax(1) == ref.argmax(1)).mean() * 100:.1f}% "
              f"| {np.abs(out - outs['exact']).max():.3g} "
              f"| {statistics.median(rounds[k]) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
