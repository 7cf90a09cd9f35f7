"""``kdtool train``: supervised training of a teacher on real data.

Fast default: SGD + Nesterov with a one-cycle schedule; the paper's recipe:
Adam 1e-3 + ReduceLROnPlateau.  Channels-last steps on every device; on CUDA also bf16
autocast and augmentation on the GPU.  The run state is saved after every epoch and
``--resume`` continues exactly; the best-by-validation model is the output.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from kdtool import console, optim
from kdtool.checkpoint import ModelMeta, per_channel_norm
from kdtool.data import (
    Draw,
    ImageData,
    check_fits,
    load_data,
    match_classes,
    refuse_unknown_classes,
    same_dataset,
)
from kdtool.device import (
    COMPILE_MODES,
    PRECISIONS,
    autocast_for,
    begin_step,
    compile_step,
    device_label,
    memory_format_for,
    resolve_device,
    resolve_precision,
)
from kdtool.ema import check_decay, make_ema
from kdtool.errors import (
    KdtoolError,
    check_choice,
    check_val_every,
    check_val_limit,
    check_weight_decay,
)
from kdtool.evaluate import evaluate
from kdtool.imageprep import Fit, parse_resize
from kdtool.loader import Augment, DeviceLoader
from kdtool.models import check_input_size, create_model, model_spec
from kdtool.runinfo import provenance, run_rate
from kdtool.runstate import RunCheckpoint, content_key


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    data: str = "digits"
    val: str | None = None
    val_every: int = 1  # validate every N epochs and after the last
    val_limit: int | None = None  # a seeded random N of --val's images
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    schedule: str | None = None  # None: the optimiser's default
    lr: float | None = None  # None: the optimiser's default
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool | None = None  # None: on, except for images under 16 px (digits)
    cutout: int = 0  # with augment: side of an erased square (0: off)
    image_size: int | list[int] | None = None  # a square size as an int
    resize: str | None = None  # how images are fitted to image_size (None: stretch)
    interpolation: str = "bilinear"  # of those resizes
    mean: list[float] | None = None  # None: the training data's channel statistics
    std: list[float] | None = None
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "default"  # kdtool.device.COMPILE_MODES
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on a CPU (kdtool.device.PRECISIONS)
    channels_last: bool = True  # NHWC models and batches (kdtool.device.memory_format_for)
    ema: float = 0.0  # > 0: validate and write an average of the weights (kdtool/ema.py)

    def fit(self) -> Fit:
        """How images are fitted to --image-size (and, later, to this model's input)."""
        return Fit(parse_resize(self.resize or "stretch"), self.interpolation)

    def resolved(self) -> TrainConfig:
        """Validate user values and fill the defaults that depend on other options."""
        model_spec(self.arch)  # unknown architecture -> "did you mean"
        c = TrainConfig(**asdict(self))
        c.schedule, c.lr = optim.resolve(c.optimizer, c.schedule, c.lr)
        check_weight_decay(c.weight_decay)
        for name, value, low in (("--epochs", c.epochs, 1), ("--batch-size", c.batch_size, 1)):
            if value < low:
                raise KdtoolError(f"{name} must be >= {low}, got {value}")
        check_val_every(c.val_every, c.val)
        check_val_limit(c.val_limit, c.val)
        check_choice(c.compile_mode, COMPILE_MODES, "--compile-mode")
        check_choice(c.precision, PRECISIONS, "--precision")
        check_decay(c.ema)
        c.fit()  # "did you mean" on a typo
        if c.cutout < 0:
            raise KdtoolError(f"--cutout must be >= 0, got {c.cutout}")
        if not 0 <= c.label_smoothing < 1:
            raise KdtoolError(f"--label-smoothing must be in [0, 1), got {c.label_smoothing}")
        return c


def trained_with_flips(augment: bool | None, image_size) -> bool:
    """Whether a ``kdtool train`` run augmented with crops and flips, from its --augment
    setting (None: on, except for images under 16 px: digits, which a mirror turns into
    other shapes)."""
    return bool(augment) if augment is not None else min(image_size) >= 16


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path, force: bool = False,
                 resume: bool = False):
        self.cfg = cfg.resolved()
        self.ckpt = RunCheckpoint(out, force, resume, command="train")
        self.out = self.ckpt.out
        self.device = resolve_device(self.cfg.device)
        self.precision = resolve_precision(self.cfg.precision, self.device)

    def _load_data(self) -> tuple[ImageData, ImageData | None]:
        c = self.cfg
        self.fit = c.fit()
        train = load_data(c.data, image_size=c.image_size, fit=self.fit)
        train.require_labels("training data")
        if train.num_classes < 2:  # one class: every answer is right, nothing is learnt
            raise KdtoolError(f"training data '{c.data}' has {train.num_classes} class "
                              f"({', '.join(map(str, train.class_names)) or 'no name'}); a "
                              "classifier needs at least 2",
                              "give each class a folder of its own: DATA/<class>/<image>")
        val = None
        if c.val:
            if same_dataset(c.data, c.val):
                console.warn(f"--val '{c.val}' is the training data: its accuracy will be "
                             "training accuracy, not a held-out figure")
            # Fitted to the training images' size, as eval and serve will fit them.
            refuse_unknown_classes(c.val, train.class_names, "the training data's")
            draw = None if c.val_limit is None else Draw(c.val_limit, c.seed)
            val = match_classes(load_data(c.val, image_size=train.image_size,
                                          channels=train.channels, fit=self.fit, draw=draw),
                                train.class_names, "the training data's")
            val.require_labels("validation data")
            check_fits(val, num_classes=train.num_classes, in_chans=train.channels,
                       what=f"training data '{c.data}'")
        return train, val

    def run(self) -> dict:
        c = self.cfg
        torch.manual_seed(c.seed)
        train, val = self._load_data()
        if c.mean is None or c.std is None:
            mean, std = train.channel_stats()
        else:
            mean, std = per_channel_norm(c.mean, c.std, train.channels,
                                         f"training data '{c.data}'")
        augment = self._augmentation(train)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        fmt = memory_format_for(c.channels_last)
        model = self._model(train).to(self.device, memory_format=fmt)
        loader = self._loader(train, mean, std, augment, channels_last=fmt is not None)
        opt, sched = optim.build(model, c.optimizer, c.schedule, c.lr, c.weight_decay,
                                 c.epochs * len(loader))
        criterion = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
        step_model = compile_step(model, c.compile_mode, self.device) if c.compile else model
        ema = make_ema(model, c.ema)

        # --val's contents too: it chooses which epoch is the output
        config = {**asdict(c), content_key("data"): train.checksum(),
                  **({content_key("val"): val.checksum()} if val is not None else {})}
        start, best, history = self.ckpt.restore(config, model, opt, sched, ema)
        if start:
            console.info(f"resuming {self.ckpt.path} after epoch {start}/{c.epochs}")
        console.info(f"training {c.arch} on {len(train)} images ({train.num_classes} classes, "
                     f"{train.channels}x{train.image_size[0]}x{train.image_size[1]}) on "
                     f"{self.device} ({self.precision}), {c.optimizer}+{c.schedule}, "
                     f"augment={augment}")

        def make_meta(metrics: dict, epoch: int) -> ModelMeta:
            return ModelMeta(
                arch=c.arch, num_classes=train.num_classes, in_chans=train.channels,
                input_size=list(train.image_size), mean=mean, std=std,
                class_names=list(train.class_names), crop_fraction=self.fit.crop_fraction,
                interpolation=self.fit.interpolation,
                provenance=provenance(seed=c.seed, metrics=metrics,
                                      device=device_label(self.device), precision=self.precision),
                stages={"train": {"config": config, "epoch": epoch, "epochs": c.epochs,
                                  "history": history}})

        def val_top1(m) -> float:
            return evaluate(m, val, mean, std, batch_size=512, device=self.device,
                            channels_last=fmt is not None)["top1"]

        with self.ckpt.writing(), \
                console.progress_task("train", c.epochs * loader.num_images, unit="img",
                                      completed=start * loader.num_images) as advance:
            for epoch in range(start, c.epochs):
                torch.manual_seed(c.seed * 100_003 + epoch)  # dropout etc.: exact on resume
                row = self._train_epoch(step_model, loader, epoch, opt, sched, criterion,
                                        advance, ema)
                validated = val is not None and (
                    (epoch + 1) % c.val_every == 0 or epoch + 1 == c.epochs)
                if validated:
                    # With --ema the average is the model kept; the live one is shown beside.
                    row["val_top1"] = val_top1(ema.module if ema else model)
                    if ema is not None:
                        row["val_top1_live"] = val_top1(model)
                    model.train()
                if not optim.steps_per_iteration(sched) and (val is None or validated):
                    # plateau: on validation accuracy when there is --val (its patience then
                    # counts validations), else on the training loss
                    sched.step(-row["val_top1"] if validated else row["loss"])
                history.append(row)
                console.info(_epoch_line(row, c.epochs))
                # The output is the best validated epoch (every epoch's, without --val).
                improved = validated and row["val_top1"] > best
                best = max(best, row["val_top1"]) if validated else best
                output = make_meta(_metrics(row), epoch + 1) if improved or val is None else None
                self.ckpt.save(config, epoch, best, history, model, opt, sched, output=output,
                               ema=ema)
        scored = [r for r in history if "val_top1" in r]
        best_row = max(scored, key=lambda r: r["val_top1"]) if scored else history[-1]
        return {"out": str(self.out), "state": str(self.ckpt.path), "device": str(self.device),
                "epochs": c.epochs, "best_epoch": best_row["epoch"], **_metrics(best_row),
                **run_rate(history),
                "history": history}

    def _augmentation(self, train: ImageData) -> bool:
        c = self.cfg
        augment = trained_with_flips(c.augment, train.image_size)
        if c.cutout and not augment:  # cutout is part of the augmentation: it would do nothing
            why = "--no-augment" if c.augment is False else \
                f"augmentation is off for {train.image_size[0]}x{train.image_size[1]} images"
            raise KdtoolError(f"--cutout {c.cutout} erases squares during augmentation, and "
                              f"{why}", "drop --cutout, or add --augment")
        return augment

    def _model(self, train: ImageData) -> nn.Module:
        arch = self.cfg.arch
        model = create_model(arch, num_classes=train.num_classes, in_chans=train.channels)
        check_input_size(model, arch, train.channels, train.image_size,
                         f"fit the images to a size it takes (e.g. --image-size "
                         f"{','.join(map(str, model_spec(arch).input_size))}), or pick an "
                         f"architecture for {train.image_size[0]}x{train.image_size[1]} "
                         f"images (kdtool models)")
        return model

    def _loader(self, train: ImageData, mean, std, augment: bool, channels_last: bool
                ) -> DeviceLoader:
        batch_size, seed = self.cfg.batch_size, self.cfg.seed
        if batch_size > len(train):
            tenth = max(1, len(train) // 10)
            console.warn(f"--batch-size {batch_size} is more than the {len(train)} training "
                         f"images: every epoch is one step on all of them; a batch of "
                         f"{tenth} gives {len(train) // tenth} steps an epoch")
        return DeviceLoader(train, batch_size, self.device, mean, std, shuffle=True,
                            augment=Augment(cutout=self.cfg.cutout) if augment else None,
                            drop_last=len(train) >= 2 * batch_size, seed=seed,
                            channels_last=channels_last)

    def _train_epoch(self, model, loader, epoch, opt, sched, criterion, advance,
                     ema=None) -> dict:
        model.train()
        step_sched = optim.steps_per_iteration(sched)
        # Sums stay on the device: no host sync per step.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = reported = 0
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader.epoch(epoch)):
            begin_step(self.cfg.compile_mode if self.cfg.compile else None)
            with autocast_for(self.device, self.precision):
                logits = model(x)
                loss = criterion(logits.float(), y)
            lr = optim.update(loss, opt, sched, step_sched, ema, phase="train")
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if i % 20 == 0 or i == len(loader) - 1:
                advance(seen - reported, info=f"epoch {epoch + 1} loss "
                        f"{loss_sum.item() / seen:.3f} lr {lr:.2e}")
                reported = seen
        secs = time.perf_counter() - t0
        loss = loss_sum.item() / seen
        if not math.isfinite(loss):
            raise KdtoolError(f"training diverged at epoch {epoch + 1} (loss {loss})",
                              "lower --lr or use --optimizer adam")
        return {"epoch": epoch + 1, "loss": loss, "train_top1": 100.0 * correct.item() / seen,
                "lr": lr, "seconds": secs, "images_per_s": seen / secs}


def _metrics(row: dict) -> dict:
    return {k: row[k] for k in ("loss", "train_top1", "val_top1", "val_top1_live") if k in row}


def _epoch_line(row: dict, epochs: int) -> str:
    val = f" val {row['val_top1']:.2f}%" if "val_top1" in row else ""
    if "val_top1_live" in row:
        val += f" (EMA; live weights {row['val_top1_live']:.2f}%)"
    return (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} train "
            f"{row['train_top1']:.2f}%{val} lr {row['lr']:.2e} "
            f"{console.rate_text(row['images_per_s'])} img/s")
