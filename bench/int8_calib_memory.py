"""Peak memory and time of INT8 calibration: kdtool's streaming calibration against
onnxruntime's ``quantize_static`` calibrating by itself (every batch's activations held at
once), on the same FP32 ONNX, images and options.

Each run is its own process, so its peak RSS (``ru_maxrss``) is its own; the weights are
random (with non-trivial BN statistics), which does not change the activations' volume.

    python bench/int8_calib_memory.py           # tv:mobilenet_v3_small at 96 px, 512 images
    python bench/int8_calib_memory.py --arch resnet18 --size 32 --images 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _child(args) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from kdtool.export.precision import PERCENTILE, _Batches, quantize_int8

    x = np.load(args.images_npy)
    t0 = time.perf_counter()
    out = Path(args.work) / f"{args.way}-{args.method}.onnx"
    if args.way == "kdtool":
        quantize_int8(Path(args.onnx), out, x, input_name="input", batch_size=32,
                      method=args.method)
    else:  # as kdtool did before streaming: pre-processed, then quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(args.work) / f"pre-{args.method}.onnx"
        quant_pre_process(args.onnx, str(pre), skip_symbolic_shape=False)
        batches = [x[i:i + 32] for i in range(0, len(x), 32)]
        quantize_static(str(pre), str(out), _Batches("input", batches),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile}[
                                              args.method],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "CalibPercentile": PERCENTILE})
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tv:mobilenet_v3_small")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--images", type=int, default=512, help="a multiple of 32 (batch)")
    p.add_argument("--methods", nargs="+", default=["minmax", "percentile"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--way", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--images-npy", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)

    import onnx
    import torch

    from kdtool.bn import bn_layers
    from kdtool.export.batch import parse_batch
    from kdtool.export.onnx_export import export_onnx
    from kdtool.models import create_model

    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10).eval()
    for _, bn in bn_layers(model):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    work = Path(tempfile.mkdtemp(prefix="kdtool-int8mem-"))
    proto, _ = export_onnx(model, (3, args.size, args.size), batch=parse_batch("1:32:32"))
    onnx.save(proto, work / "fp32.onnx")
    x = np.random.default_rng(0).standard_normal((args.images, 3, args.size, args.size),
                                                 dtype=np.float32)
    np.save(work / "x.npy", x)
    print(f"{args.arch} at {args.size}x{args.size}, {args.images} calibration images in "
          f"batches of 32, one process per run\n")
    print("| method | calibration | peak RSS | wall |\n|---|---|---:|---:|")
    for method in args.methods:
        for way, label in (("ort", "quantize_static's own"), ("kdtool", "kdtool, streamed")):
            r = subprocess.run([sys.executable, __file__, "--child", "--way", way, "--method",
                                method, "--onnx", str(work / "fp32.onnx"), "--images-npy",
                                str(work / "x.npy"), "--work", str(work)],
                               capture_output=True, text=True, check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {method} | {label} | {row['peak_mib']:,.0f} MiB | "
                  f"{row['seconds']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
