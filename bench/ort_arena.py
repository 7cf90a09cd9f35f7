"""ONNX Runtime's CPU memory arena on and off (``--memory-arena/--no-memory-arena`` of
``kdtool bench`` and ``kdtool serve``): latency and peak resident memory, side by side.

Each (model, batch, arena) runs in a fresh process, so that its peak RSS (``VmHWM``) is its
own: the RSS after loading numpy and onnxruntime is subtracted, leaving the session,
the input and whatever the calls hold. Processes alternate on / off, round by round; the
figures are medians over rounds (latency: the mean of one ``infer`` call per round).

Models: a 3 -> 8 conv at 3 x 256 x 256 (large activations), and random-weight ONNX exports
of CIFAR ResNet-18 and ResNet-8 at 32 x 32 (kdtool's students).

    python bench/ort_arena.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

WORKER = "--worker"


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(path: str, batch: int, arena: bool, threads: int, seconds: float) -> dict:
    import numpy as np

    from kdtool.export.runners import OrtRunner

    base = _vm("VmRSS")
    runner = OrtRunner(path, threads=threads, memory_arena=arena)
    shape = runner.session.get_inputs()[0].shape[1:]
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    for _ in range(3):
        runner.infer(x)
    n, t0 = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t0 < seconds:
        runner.infer(x)
        n += 1
    ms = (time.perf_counter() - t0) / n * 1e3
    return {"ms": ms, "peak_mb": (_vm("VmHWM") - base) / 1024, "held_mb": (_vm("VmRSS") - base)
            / 1024}


def _models(folder: Path) -> dict[str, Path]:
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from kdtool.models import create_model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.5, n)
             for s, n in (((8, 3, 3, 3), "w"), ((8,), "b"))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["logits"])], "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 256, 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8, 256, 256])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    paths = {"conv 3->8, 256x256": folder / "conv.onnx"}
    onnx.save(proto, str(paths["conv 3->8, 256x256"]))
    for arch in ("resnet18", "resnet8"):
        paths[f"{arch}, 32x32"] = folder / f"{arch}.onnx"
        net = create_model(arch, num_classes=10).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(2, 3, 32, 32),), str(paths[f"{arch}, 32x32"]),
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                              dynamo=False)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="timed calls per process")
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        models = _models(Path(tmp))
        print("| model | batch | latency arena on | off | off / on | peak MB on | off | "
              "held after, on | off |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, path in models.items():
            for batch in batches:
                runs: dict[bool, list[dict]] = {True: [], False: []}
                for _ in range(args.rounds):
                    for arena in (True, False):
                        out = subprocess.run(
                            [sys.executable, __file__, WORKER, str(path), str(batch),
                             str(int(arena)), str(args.threads), str(args.seconds)],
                            capture_output=True, text=True, check=True)
                        runs[arena].append(json.loads(out.stdout.strip().splitlines()[-1]))
                med = {a: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                       for a, rs in runs.items()}
                on, off = med[True], med[False]
                print(f"| {label} | {batch} | {on['ms']:.3f} ms | {off['ms']:.3f} ms | "
                      f"{off['ms'] / on['ms']:.2f}x | {on['peak_mb']:.0f} | {off['peak_mb']:.0f} | "
                      f"{on['held_mb']:.0f} | {off['held_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        p, b, a, t, s = sys.argv[2:7]
        print(json.dumps(worker(p, int(b), bool(int(a)), int(t), float(s))))
    else:
        main()
