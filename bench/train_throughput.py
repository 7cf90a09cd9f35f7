"""Training throughput (images/s) of ``kdtool train``'s real code path.

Runs the Trainer (device-side loader, augmentation, bf16 + channels_last on
CUDA) for a few epochs on synthetic 32x32 RGB data and reports the images/s of
the last epoch (the first one pays for cudnn autotuning and allocation).

    python bench/train_throughput.py --arch resnet18 --images 4096 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdtool.train import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["resnet8", "resnet18"])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("KDTOOL_CACHE", tmp)
        data = Path(tmp) / "synthetic.npz"
        np.savez(data, x=rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, args.images))
        for arch in args.arch:
            cfg = TrainConfig(arch=arch, data=str(data), epochs=args.epochs,
                              batch_size=args.batch_size, augment=True, device=args.device,
                              compile=args.compile)
            r = Trainer(cfg, Path(tmp) / f"{arch}.safetensors").run()
            device = r["device"]
            name = torch.cuda.get_device_name() if device.startswith("cuda") else \
                f"CPU, {torch.get_num_threads()} threads"
            row = {"arch": arch, "batch_size": args.batch_size, "device": name,
                   "compile": args.compile,
                   "images_per_s": round(r["history"][-1]["images_per_s"], 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| arch | batch | device | images/s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['arch']} | {r['batch_size']} | {r['device']} | {r['images_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
