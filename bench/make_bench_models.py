"""Make a random-weight zoo model as a kdtool checkpoint and its ONNX, for ``kdtool bench``.

The ONNX comes from ``torch.onnx.export`` (dynamo exporter, dynamic batch) with kdtool's
metadata, without ``kdtool export``'s parity checks and slimming: the files behind the
``kdtool bench`` figures in docs/BENCHMARKS.md. ``kdtool bench CKPT --formats torch,onnx``
does the same through ``kdtool export``.

    python bench/make_bench_models.py --arch resnet18 --size 32 --out-dir /tmp/bench
    kdtool bench /tmp/bench/resnet18.safetensors /tmp/bench/resnet18.onnx --batch 1,64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
import torch

from kdtool.checkpoint import ModelMeta, save_checkpoint
from kdtool.export.metadata import OnnxInfo, write_info
from kdtool.io import atomic_path, check_output
from kdtool.models import create_model

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--out-dir", type=Path, default=Path("bench-models"))
    p.add_argument("--force", action="store_true")
    a = p.parse_args()

    out = check_output(a.out_dir / f"{a.arch}.onnx", a.force, "ONNX model")
    check_output(a.out_dir / f"{a.arch}.safetensors", a.force, "checkpoint")
    torch.manual_seed(0)
    model = create_model(a.arch, num_classes=a.num_classes, in_chans=3).eval()
    classes = [f"class_{i}" for i in range(a.num_classes)]
    meta = ModelMeta(
        arch=a.arch,
        num_classes=a.num_classes,
        in_chans=3,
        input_size=[a.size, a.size],
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        class_names=classes,
    )
    ckpt = save_checkpoint(a.out_dir / f"{a.arch}.safetensors", model, meta, force=a.force)

    program = torch.onnx.export(
        model,
        (torch.randn(2, 3, a.size, a.size),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},),
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    write_info(
        proto,
        OnnxInfo(
            input_name="input",
            output_name="logits",
            in_chans=3,
            input_size=[a.size, a.size],
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            num_classes=a.num_classes,
            class_names=classes,
            arch=a.arch,
            source=ckpt.name,
            opset=proto.opset_import[0].version,
        ),
    )
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    print(f"wrote {ckpt} and {out}")


if __name__ == "__main__":
    main()
