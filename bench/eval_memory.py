"""Peak memory and time of ``kdtool eval`` on a folder too large to hold: the images decoded
whole into memory (and cached) against an ImageStream decoding a chunk of batches at a time.

    python bench/eval_memory.py [ZIP] --upscale 224 --images 5000

The first --images images of ZIP (default: CIFAR-10's val5k) are resized to --upscale
(bicubic, JPEG q90, as bench/data_load.py --upscale makes them) and scored by a random-weight
tiny_cnn taking that size, so that decoding, not the model, is what is measured. Each mode
runs ``kdtool eval`` in a fresh process with an empty dataset cache; both must report the
same top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "bench"))

from data_load import upscaled_zip  # noqa: E402

# Runs kdtool eval in-process with the stream threshold set, then prints its peak RSS.
_CHILD = """
import resource, sys
import kdtool.data as d
d.STREAM_ABOVE_BYTES = int(sys.argv[1])
from kdtool.cli import main
try:
    main(sys.argv[2:])
except SystemExit as e:
    if e.code:
        raise
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _checkpoint(path: Path, size: int, class_names: list[str]) -> Path:
    import torch

    from kdtool.checkpoint import ModelMeta, save_checkpoint
    from kdtool.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=len(class_names), in_chans=3)
    meta = ModelMeta(arch="tiny_cnn", num_classes=len(class_names), in_chans=3,
                     input_size=[size, size], mean=[0.5] * 3, std=[0.25] * 3,
                     class_names=class_names)
    return save_checkpoint(path, model, meta, force=True)


def _run(threshold: int, ckpt: Path, data: Path, batch: int, cache: Path) -> dict:
    env_cache = {"KDTOOL_CACHE": str(cache), "KDTOOL_PROGRESS": "off"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, str(threshold), "eval", str(ckpt),
                        "--data", str(data), "--batch-size", str(batch), "--json"],
                       capture_output=True, text=True, env={**os.environ, **env_cache})
    seconds = time.perf_counter() - start
    if r.returncode:
        sys.exit(r.stderr)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    peak_mb = int(r.stderr.strip().splitlines()[-1]) / 1024
    cached = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "cache_mb": cached,
            "top1": report["top1"], "images": report["images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", nargs="?", type=Path,
                        default=REPO.parent / "shared/data/cifar10/val5k.zip")
    parser.add_argument("--upscale", type=int, default=224)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not args.zip.is_file():
        sys.exit(f"no zip at {args.zip}: pass a zip of <class>/<image> folders")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = upscaled_zip(args.zip, args.upscale, args.images, tmp / "big.zip")
        with zipfile.ZipFile(data) as zf:  # <class>/<image>, as CIFAR-10's zips hold them
            classes = sorted({n.split("/")[0] for n in zf.namelist()})
        ckpt = _checkpoint(tmp / "model.safetensors", args.upscale, classes)
        pixels = args.images * 3 * args.upscale ** 2 / 2**20
        print(f"{args.images} images at {args.upscale}x{args.upscale}: {pixels:.0f} MB of "
              f"pixels; batch {args.batch}")
        rows = {}
        for mode, threshold in [("in memory", 1 << 62), ("stream", 0)]:
            rows[mode] = _run(threshold, ckpt, data, args.batch, tmp / f"cache-{len(rows)}")
            r = rows[mode]
            print(f"{mode:>9}: {r['seconds']:6.1f} s, peak RSS {r['peak_rss_mb']:6.0f} MB, "
                  f"cache written {r['cache_mb']:5.0f} MB, top-1 {r['top1']:.2f}%")
        if rows["in memory"]["top1"] != rows["stream"]["top1"]:
            sys.exit("the two modes scored differently")


if __name__ == "__main__":
    main()
