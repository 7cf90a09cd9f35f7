"""Time loading an image zip: the first load decodes it, the second comes from the cache;
and a seeded draw of --draw images (what calibrate, export --calib-data and bench --limit
load), from a fresh cache: it decodes those images alone.

    python bench/data_load.py [ZIP] [--cache-dir DIR] [--draw 512]
    python bench/data_load.py VAL.zip --upscale 256 --images 4000   # photo-sized images

``--upscale S --images N``: the first N images of ZIP resized to S x S (bicubic) and stored
as JPEG quality 90 in a temporary zip, which is what is loaded: CIFAR-10's images at the
size of a photo dataset's, for the cost of decoding larger images.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from kdtool.data import Draw, load_data  # noqa: E402
from kdtool.runinfo import usable_cores  # noqa: E402


def upscaled_zip(src: Path, size: int, count: int, dest: Path) -> Path:
    """The first ``count`` images of the zip ``src`` (by name), ``size`` x ``size``, JPEG
    quality 90, under their own names, in the zip ``dest``."""
    import io
    import zipfile

    from PIL import Image

    from kdtool.imagefiles import IMAGE_EXTS

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        names = sorted(n for n in zin.namelist() if n.lower().endswith(tuple(IMAGE_EXTS)))
        for name in names[:count]:
            with Image.open(io.BytesIO(zin.read(name))) as im:
                big = im.convert("RGB").resize((size, size), Image.BICUBIC)
            out = io.BytesIO()
            big.save(out, "JPEG", quality=90)
            zout.writestr(name, out.getvalue())
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", nargs="?", type=Path,
                        default=REPO.parent / "shared/data/cifar10/train45k.zip")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="dataset cache (default: a fresh temp dir, deleted afterwards)")
    parser.add_argument("--draw", type=int, default=512,
                        help="images of the timed draw (0: none)")
    parser.add_argument("--upscale", type=int, default=0,
                        help="load the first --images images resized to N x N (JPEG q90)")
    parser.add_argument("--images", type=int, default=4000)
    args = parser.parse_args()
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="kdtool-bench-"))
    cores = usable_cores()
    if args.upscale:
        made = Path(tempfile.mkdtemp(prefix="kdtool-bench-zip-"))
        source = args.zip
        args.zip = upscaled_zip(source, args.upscale, args.images, made / source.name)
        print(f"{args.images} images of {source} at {args.upscale}x{args.upscale}, JPEG q90")
    import resource  # peak RSS: what a first decode costs in memory beyond its pixels

    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = None
    try:
        times, drawn = [], None
        if args.draw:  # first, while the cache holds no full decode of the zip
            start = time.perf_counter()
            load_data(str(args.zip), cache_dir=cache_dir, draw=Draw(args.draw, 0))
            drawn = time.perf_counter() - start
        for _ in range(2):
            start = time.perf_counter()
            data = load_data(str(args.zip), cache_dir=cache_dir)
            times.append(time.perf_counter() - start)
            peak = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        if args.upscale:
            shutil.rmtree(args.zip.parent, ignore_errors=True)
    n = len(data)
    print(f"{args.zip}: {n} images {data.channels}x{data.image_size[0]}x{data.image_size[1]}, "
          f"{data.num_classes} classes, {cores} cores")
    for label, t in zip(("first load (decode)", "second load (cache)"), times, strict=True):
        print(f"{label:20s} {t:7.2f} s  {n / t:12,.0f} img/s")
    kib = 1 if sys.platform == "linux" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    print(f"peak RSS during the first load: {(peak - start_rss) / kib / 1024:,.0f} MiB above "
          f"start-up, for {data.x.numel() / 2**20:,.0f} MiB of pixels")
    if drawn is not None:
        print(f"{'draw of ' + str(args.draw):20s} {drawn:7.2f} s  "
              f"({times[0] / drawn:.0f}x less than the first load)")


if __name__ == "__main__":
    main()
