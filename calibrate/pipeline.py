"""``kdtool calibrate``'s run: recompute BN statistics, validate, fold, check, write.

Every check runs before anything is written: a fold that changes the logits
by more than the tolerance, or any other error, leaves no output behind.  The
checkpoint is written last, after a --sweep's CSV and plot.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kdtool import console
from kdtool.analyze import require_matplotlib
from kdtool.bn import bn_layers
from kdtool.calibrate.fold import DEFAULT_TOLERANCE, fold_bn, logit_scale, max_abs_diff
from kdtool.calibrate.recompute import (
    check_counts,
    check_enough,
    recompute_bn_stats,
    sample_indices,
)
from kdtool.calibrate.sweep import (
    reference_rows,
    run_sweep,
    write_csv,
    write_png,
)
from kdtool.checkpoint import CHECKPOINT_SUFFIX, ModelMeta, load_checkpoint, save_checkpoint
from kdtool.data import (
    Draw,
    ImageData,
    check_fits,
    load_calibration,
    load_data,
    match_classes,
    refuse_unknown_classes,
)
from kdtool.device import device_label, resolve_device
from kdtool.errors import KdtoolError
from kdtool.evaluate import evaluate
from kdtool.imageprep import Fit
from kdtool.io import check_output, file_sha256
from kdtool.loader import DeviceLoader
from kdtool.runinfo import provenance

CHECK_IMAGES = 32  # images the folded and unfolded logits are compared on
CURRENT_BATCH = 256  # the paper's batch for current-statistics evaluation
# --val top-1 points calibration may cost before it is warned: a few images' sampling noise.
LOWERED_WARN = 1.0


@dataclass
class CalibrateConfig:
    checkpoint: str
    data: str
    out: str | None = None  # default: <checkpoint>.cal.safetensors
    batches: int = 32
    batch_size: int = 16
    fold: bool = True
    val: str | None = None
    sweep: list[int] | None = None
    repeats: int = 1
    sweep_out: str | None = None  # CSV path; the PNG goes beside it
    image_size: list[int] | None = None
    tolerance: float | None = None  # None: DEFAULT_TOLERANCE (given only with folding)
    seed: int = 0
    device: str = "auto"
    force: bool = False


def default_out(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(p.suffix) + ".cal.safetensors")


@contextmanager
def _timed(seconds: dict, key: str) -> Iterator[None]:
    """Add the block's wall time to ``seconds[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - start, 3)


def _input_size(cfg_size: list[int] | None, meta: ModelMeta) -> tuple[int, int]:
    """The size calibration images are fitted to: the model's input, the size it is served
    at (BN statistics are per input size)."""
    size = (int(meta.input_size[0]), int(meta.input_size[1]))
    if cfg_size and tuple(cfg_size) != size:
        raise KdtoolError(
            f"--image-size {cfg_size[0]},{cfg_size[1]} is not the model's input "
            f"{size[0]}x{size[1]}: statistics at another size do not fit the inputs it gets",
            f"leave --image-size out: images are fitted to {size[0]}x{size[1]} "
            f"({Fit.of(meta).describe()})",
        )
    return size


class CalibrateRun:
    def __init__(self, cfg: CalibrateConfig):
        if cfg.tolerance is not None and not cfg.fold:
            raise KdtoolError(f"--tolerance {cfg.tolerance:g} bounds what folding BatchNorm may "
                              "change, and --no-fold skips folding", "drop --tolerance or "
                              "--no-fold")
        if cfg.tolerance is None:
            cfg = replace(cfg, tolerance=DEFAULT_TOLERANCE)
        self.cfg = cfg
        if cfg.tolerance <= 0:
            raise KdtoolError(f"--tolerance must be > 0, got {cfg.tolerance}")
        if cfg.repeats < 1:
            raise KdtoolError(f"--repeats must be >= 1, got {cfg.repeats}")
        if cfg.repeats != 1 and not cfg.sweep:
            raise KdtoolError(f"--repeats {cfg.repeats} repeats the points of a --sweep, and "
                              "there is none", "add --sweep 1,2,4,8,16,32 --val DIR, or drop "
                              "--repeats")
        if cfg.sweep_out and not cfg.sweep:
            raise KdtoolError(f"--sweep-out '{cfg.sweep_out}' names the CSV of a --sweep, and "
                              "there is none", "add --sweep 1,2,4,8,16,32 --val DIR, or drop "
                              "--sweep-out")
        if cfg.sweep and not cfg.val:
            raise KdtoolError(
                "--sweep measures accuracy and needs labelled --val data", "add --val DIR"
            )
        check_counts(cfg.batches, cfg.batch_size)
        self.out = check_output(
            cfg.out or default_out(cfg.checkpoint), cfg.force, "checkpoint",
            (CHECKPOINT_SUFFIX,), sources={"the checkpoint to calibrate": cfg.checkpoint}
        )
        self.csv = self.png = None
        if cfg.sweep:
            require_matplotlib("--sweep")
            self.csv = check_output(
                cfg.sweep_out
                or self.out.with_name(self.out.name.removesuffix(".safetensors") + ".sweep.csv"),
                cfg.force,
                "sweep CSV",
                (".csv",),  # the plot goes beside it with .png: one name for both loses one
            )
            self.png = check_output(self.csv.with_suffix(".png"), cfg.force, "sweep plot")

    def run(self) -> dict:
        c, t0 = self.cfg, time.perf_counter()
        model, meta = load_checkpoint(c.checkpoint)
        n_bn = self._check_input(model, meta)
        dev = resolve_device(c.device)
        self.device = dev
        model.to(dev)
        size = _input_size(c.image_size, meta)
        # The images calibration uses, alone: a draw decodes just those files of a folder or
        # zip (the same images, in the same order, as sample_indices picks from all of it).
        # A sweep's points and repeats draw with other seeds, from all of it.
        draw = None if c.sweep else Draw(c.batches * c.batch_size, c.seed)
        data = load_calibration(c.data, meta, "calibration data", "BN statistics", size,
                                draw=draw)
        if draw is None:
            images = data.subset(
                sample_indices(len(data), c.batches, c.batch_size, c.seed, f"'{c.data}'"))
        else:
            check_enough(len(data), c.batches, c.batch_size, f"'{c.data}'")
            images = data
        if c.sweep and max(c.sweep) * c.batch_size > len(data):
            raise KdtoolError(
                f"--sweep up to {max(c.sweep)} batches of {c.batch_size} needs "
                f"{max(c.sweep) * c.batch_size} images but '{c.data}' has {len(data)}",
                "drop the largest --sweep points or add images",
            )
        val = self._load_val(meta, size)
        # Where the time goes: --val scores the model three times, often for longer than the
        # recompute itself, and a total should not look unexplained.
        seconds = {"load": round(time.perf_counter() - t0, 3)}
        result: dict = {
            "checkpoint": str(c.checkpoint),
            "data": c.data,
            "device": str(dev),
            "batches": c.batches,
            "batch_size": c.batch_size,
            "images": len(images),
            "seed": c.seed,
            "bn_layers": n_bn,
        }
        accuracy, current_batch = self._score_input(model, val, meta, dev, seconds)
        sweep_rows = None
        if c.sweep:
            with _timed(seconds, "sweep"):
                sweep_rows = run_sweep(
                    model, data, val, meta.mean, meta.std, c.sweep, c.batch_size, c.seed,
                    c.repeats, dev,
                )
            sweep_rows += reference_rows(accuracy["input_running"], accuracy["input_current"])
        cal = recompute_bn_stats(
            model, images, meta.mean, meta.std, c.batches, c.batch_size, None, dev
        )
        console.info(
            f"recomputed {n_bn} BatchNorm layers from {cal.images} images "
            f"({c.batches} x {c.batch_size}) in {cal.seconds:.1f} s"
        )
        if val is not None:
            with _timed(seconds, "validate"):
                accuracy["calibrated"] = evaluate(
                    model, val, meta.mean, meta.std, batch_size=256, device=dev, progress=True
                )["top1"]
            _warn_if_lowered(accuracy, c, cal.images)
        model = model.cpu()
        seconds["recompute"] = round(cal.seconds, 3)
        stage = {
            "source": c.data,
            # Images of other sizes were fitted to the model's input by this rule.
            "fit": f"{size[0]}x{size[1]} ({Fit.of(meta).describe()})",
            "images": cal.images, "batches": c.batches, "batch_size": c.batch_size,
            "seed": c.seed, "images_checksum": images.checksum(),  # the pixels calibrated on
            "bn_layers": n_bn, "bn_running_stats": "real", "folded": False,
            "seconds": seconds,
        }
        if c.fold:
            model = self._fold(model, images, val, meta, stage, result)
        if accuracy:
            stage["accuracy"] = accuracy
            stage["current_batch"] = current_batch
        # The checkpoint is written last, so a failed plot leaves no checkpoint that a rerun
        # would need --force to replace, and its metadata holds the total time.
        if sweep_rows is not None:
            result["sweep"] = self._write_sweep(sweep_rows, meta)
        stage["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        save_checkpoint(self.out, model, self._meta(meta, stage), force=c.force)
        result.update(
            out=str(self.out), folded=stage["folded"], accuracy=accuracy, seconds=stage["seconds"],
            current_batch=current_batch
        )
        return result

    def _check_input(self, model, meta: ModelMeta) -> int:
        """The number of BN layers to calibrate (none is refused), with a warning for a
        model whose statistics are already real."""
        c = self.cfg
        n_bn = len(bn_layers(model))
        if n_bn == 0:
            folded = (meta.stages.get("calibrate") or {}).get("folded")
            raise KdtoolError(
                f"'{c.checkpoint}' has no BatchNorm layers: nothing to calibrate",
                "it is already calibrated and folded"
                if folded
                else "calibration recomputes BatchNorm statistics; this model has none",
            )
        if "distill" not in meta.stages:  # a trained model: its statistics are real already
            console.warn(
                f"'{c.checkpoint}' records no noise distillation: its BatchNorm statistics are "
                f"likely those of the data it was trained on, and calibration replaces them "
                f"with those of {c.batches * c.batch_size} images of '{c.data}'. Export folds "
                "BatchNorm without it; pass --val to see what the new statistics cost or gain")
        return n_bn

    def _write_sweep(self, rows: list[dict], meta: ModelMeta) -> dict:
        c = self.cfg
        write_csv(self.csv, rows)
        write_png(
            self.png,
            rows,
            f"{meta.arch} ({Path(c.checkpoint).name})\nBN "
            f"calibration on '{c.data}', val '{c.val}'",
            noise=(meta.stages.get("distill") or {}).get("bn_running_stats") == "noise",
        )
        return {"csv": str(self.csv), "png": str(self.png), "rows": rows}

    def _score_input(self, model, val, meta: ModelMeta, dev, seconds: dict
                     ) -> tuple[dict, int | None]:
        """The input's top-1 on --val on its own running and on current statistics (the
        references calibration is read against), and the current-statistics batch."""
        c = self.cfg
        if val is None:
            return {}, None
        current_batch = min(CURRENT_BATCH, len(val))
        if current_batch < CURRENT_BATCH:  # as eval --bn current warns
            console.warn(f"--val '{c.val}' has {len(val)} images, fewer than the "
                         f"{CURRENT_BATCH} its current-statistics figure is meant for: "
                         f"they come from one batch of {len(val)}, noisier")
        accuracy = {}
        for bn in ("running", "current"):
            with _timed(seconds, "validate"):
                accuracy[f"input_{bn}"] = evaluate(
                    model, val, meta.mean, meta.std, batch_size=CURRENT_BATCH, device=dev,
                    bn=bn, seed=c.seed, progress=True,
                )["top1"]
        return accuracy, current_batch

    def _load_val(self, meta: ModelMeta, size) -> ImageData | None:
        if not self.cfg.val:
            return None
        # Converted to the model's channels, as eval's --data: it measures, and BN
        # statistics are never taken from it (--data's channels must match, for those).
        refuse_unknown_classes(self.cfg.val, meta.class_names)
        val = load_data(self.cfg.val, image_size=size, channels=meta.in_chans,
                        fit=Fit.of(meta))
        val.require_labels("validation data")
        val = match_classes(val, meta.class_names)
        check_fits(
            val,
            num_classes=meta.num_classes,
            in_chans=meta.in_chans,
            what="the model",
        )
        return val

    def _fold(self, model, images, val, meta, stage, result):
        c = self.cfg
        t = time.perf_counter()
        # Compare on real images the model has not been calibrated on where there are any.
        source = val if val is not None else images
        # A seeded sample, not the first images: a class-sorted set's are all one class.
        pick = torch.randperm(len(source), generator=torch.Generator().manual_seed(c.seed))
        check = source.subset(pick[:CHECK_IMAGES])
        x = next(iter(DeviceLoader(check, CHECK_IMAGES, "cpu", meta.mean, meta.std)))[0]
        folded, report = fold_bn(model, x, c.tolerance)
        diff, scale = max_abs_diff(model, folded, x), logit_scale(model, x)
        if not diff <= c.tolerance * scale:  # also catches NaN
            raise KdtoolError(
                f"folding BatchNorm changed the logits by up to {diff:.3g} (> --tolerance "
                f"{c.tolerance:g} x {scale:.3g}, the largest logit) on {len(check)} images: "
                "nothing was written",
                "write the calibrated model unfolded with --no-fold, and report this model",
            )
        stage.update(
            folded=True,
            fold_plan=report.plan(),
            fold_check={
                "max_abs_diff": diff,
                "logit_scale": scale,
                "tolerance": c.tolerance,
                "images": len(check),
                "source": source.source,
            },
        )
        stage["seconds"]["fold"] = round(time.perf_counter() - t, 3)
        result["fold"] = {
            "summary": report.summary(),
            **report.counts(),
            "max_abs_diff": diff,
            "logit_scale": scale,
            "tolerance": c.tolerance,
            "layers": [asdict(e) for e in report.entries],
        }
        return folded

    def _meta(self, meta: ModelMeta, stage: dict) -> ModelMeta:
        new = copy.deepcopy(meta)
        stage["input"] = {"file": str(self.cfg.checkpoint),
                          "sha256": file_sha256(self.cfg.checkpoint),
                          "provenance": meta.provenance}
        new.stages["calibrate"] = stage
        metrics = {f"val_top1_{k}": v for k, v in stage.get("accuracy", {}).items()}
        new.provenance = provenance(seed=self.cfg.seed, metrics=metrics,
                                    device=device_label(self.device))
        return new


def _warn_if_lowered(accuracy: dict, c: CalibrateConfig, images: int) -> None:
    """Statistics from a few images can be worse than those a model already had (a trained
    model's, or an earlier calibration on more images): the output is written, but said."""
    before, after = accuracy["input_running"], accuracy["calibrated"]
    if after < before - LOWERED_WARN:
        console.warn(
            f"calibration lowered top-1 on --val '{c.val}' from {before:.2f}% (the input on "
            f"its own running statistics) to {after:.2f}%: the statistics of {images} images "
            f"of '{c.data}' are worse than those '{c.checkpoint}' had; calibrate on more "
            "images (--batches) or on images like those it will see, or keep the input")


def calibrate(cfg: CalibrateConfig) -> dict:
    """Run ``kdtool calibrate`` from a config (the CLI and the benchmark call this)."""
    torch.manual_seed(cfg.seed)
    return CalibrateRun(cfg).run()
