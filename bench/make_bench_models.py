"""Make a random-weight zoo model as a kdtool checkpoint and its ONNX (via ``kdtool export``).

Random weights run at the speed of trained ones: the files behind the speed figures of
``kdtool bench`` and ``kdtool serve`` in docs/BENCHMARKS.md (CIFAR-10 shapes by default).

    python bench/make_bench_models.py --arch resnet18 --size 32 --out-dir /tmp/bench
    kdtool bench /tmp/bench/resnet18.safetensors /tmp/bench/resnet18.onnx --batch 1,64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kdtool.checkpoint import ModelMeta, save_checkpoint
from kdtool.export.pipeline import ExportConfig, run_export
from kdtool.models import create_model

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def make_models(arch: str, out_dir: Path, size: int = 32, num_classes: int = 10,
                force: bool = False) -> tuple[Path, Path]:
    """``out_dir/ARCH.safetensors`` (seeded random weights) and ``out_dir/ARCH.onnx``."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes, in_chans=3).eval()
    meta = ModelMeta(arch=arch, num_classes=num_classes, in_chans=3, input_size=[size, size],
                     mean=CIFAR_MEAN, std=CIFAR_STD,
                     class_names=[f"class_{i}" for i in range(num_classes)],
                     provenance={"weights": "random (bench/make_bench_models.py)"})
    ckpt = save_checkpoint(out_dir / f"{arch}.safetensors", model, meta, force=force)
    onnx = out_dir / f"{arch}.onnx"
    run_export(ExportConfig(checkpoint=str(ckpt), onnx=str(onnx), force=force))
    return ckpt, onnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--out-dir", type=Path, default=Path("bench-models"))
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    ckpt, onnx = make_models(a.arch, a.out_dir, a.size, a.num_classes, a.force)
    print(f"wrote {ckpt} and {onnx}")


if __name__ == "__main__":
    main()
