"""``kdtool distill``'s run: noise in, teacher outputs as targets, a student out.

Noise is drawn on the training device every iteration from a generator seeded
by (seed, epoch), so an epoch's noise depends on the seed (and the device's
generator) alone and ``--resume`` on the same device is exact.  The loss terms
are summed on the device and read back only every ``log_every`` steps: no host
synchronisation per iteration.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

from kdtool import console, optim
from kdtool.checkpoint import ModelMeta, load_checkpoint
from kdtool.data import Draw, check_fits, load_for_model
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
from kdtool.dist import all_reduce_mean, finish, init_from_env, sync_buffers
from kdtool.distill.balance import BALANCE_MODES, BalancedNoise
from kdtool.distill.distiller import NoiseKD, check_temperature
from kdtool.distill.noise import check_noise_options, make_noise
from kdtool.distill.pool import PooledNoise
from kdtool.distill.teacher import TEACHER_BN_MODES, TEACHER_STATS, FrozenTeacher
from kdtool.ema import check_decay, make_ema
from kdtool.errors import (
    KdtoolError,
    check_choice,
    check_val_every,
    check_val_limit,
    check_weight_decay,
)
from kdtool.evaluate import percent_equal, predict
from kdtool.io import file_sha256, refuse_input_as_output
from kdtool.loader import epoch_generator
from kdtool.models import check_input_size, count_params, create_model, model_spec
from kdtool.runinfo import provenance, run_rate
from kdtool.runstate import RunCheckpoint, content_key

MIN_GOOD_BATCH = 32  # below this the teacher's batch statistics get noisy (appendix Fig. 3b)
# A teacher below this share of the way from chance to 100% on --val is warned.
NEAR_CHANCE = 0.1
ALIGNED_TEACHER_LOSS_WARN = 5.0  # points of --val top-1 that alignment may cost silently
# A student run at this many times its design input's pixels (a CIFAR network, made for
# 32x32 with no early downsampling, at 224x224 costs 49x) is better replaced.
OVERSIZE_INPUT = 4


def warn_student_fit(student: torch.nn.Module, name: str, teacher: torch.nn.Module,
                     teacher_arch: str, size: tuple[int, int]) -> None:
    """Warn before a run whose student is no smaller than its teacher, or runs far above
    the input size its architecture was made for: both cost hours for nothing."""
    n_student, n_teacher = count_params(student), count_params(teacher)
    if n_student >= n_teacher:
        console.warn(f"the student {name} ({console.params_text(n_student)} parameters) is "
                     f"not smaller than the teacher {teacher_arch} "
                     f"({console.params_text(n_teacher)}): pick a "
                     "smaller --student (kdtool models; tv: and timm: names work too)")
    design = model_spec(name).input_size
    ratio = (size[0] * size[1]) / (design[0] * design[1])
    if ratio >= OVERSIZE_INPUT:
        console.warn(f"the student {name} is made for {design[0]}x{design[1]} inputs and "
                     f"runs at the teacher's {size[0]}x{size[1]}, {ratio:.0f}x the pixels and "
                     "about as much more compute per image: a student made for this size, "
                     "e.g. --student tv:mobilenet_v3_small or tv:resnet18, is faster")


@dataclass
class DistillConfig:
    teacher: str
    student: str = "resnet18"
    noise: str = "gaussian"
    noise_options: dict = field(default_factory=dict)
    # Class balance of the teacher's answers: weight (the loss; the default, measured in
    # docs/BENCHMARKS.md), reject (resample the noise) or off (the paper's plain loss).
    balance: str = "weight"
    noise_pool: int = 0  # > 0: images rendered per epoch into a reused pool (distill/pool.py)
    teacher_bn: str = "current"
    running_fraction: float | None = None
    # Teachers without BN: batch-align their GroupNorm/LayerNorm layers (distill/align.py).
    teacher_norm_align: bool = False
    teacher_stats: str = "rank"  # under torchrun: "global" normalises over all ranks' batches
    loss: str = "soft_ce"
    temperature: float = 1.0
    epochs: int = 200
    iters_per_epoch: int = 196  # the length of a CIFAR-10 loader at batch 256 (the paper's)
    batch_size: int = 256
    optimizer: str = "adam"
    schedule: str | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    val: str | None = None
    val_every: int = 1
    val_limit: int | None = None  # a seeded random N of --val's images
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "default"  # kdtool.device.COMPILE_MODES
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on a CPU (kdtool.device.PRECISIONS)
    channels_last: bool = True  # NHWC models and noise (kdtool.device.memory_format_for)
    ema: float = 0.0  # > 0: validate and write an average of the student (kdtool/ema.py)
    log_every: int = 20

    def resolved(self) -> DistillConfig:
        c = DistillConfig(**asdict(self))
        model_spec(c.student)
        check_choice(c.teacher_bn, TEACHER_BN_MODES, "--teacher-bn mode")
        check_choice(c.teacher_stats, TEACHER_STATS, "--teacher-stats")
        check_choice(c.balance, BALANCE_MODES, "--balance mode")
        check_choice(c.compile_mode, COMPILE_MODES, "--compile-mode")
        check_choice(c.precision, PRECISIONS, "--precision")
        check_decay(c.ema)
        c.schedule, c.lr = optim.resolve(c.optimizer, c.schedule, c.lr)
        check_weight_decay(c.weight_decay)
        check_temperature(c.temperature)  # before the teacher loads
        check_noise_options(c.noise, c.noise_options)
        for name, value in (("--epochs", c.epochs), ("--iters-per-epoch", c.iters_per_epoch),
                            ("--batch-size", c.batch_size), ("--log-every", c.log_every)):
            if value < 1:
                raise KdtoolError(f"{name} must be >= 1, got {value}")
        if c.batch_size < 2:
            raise KdtoolError("--batch-size must be >= 2: the teacher normalises with the "
                              "statistics of the batch")
        check_val_every(c.val_every, c.val)
        check_val_limit(c.val_limit, c.val)
        return c


class DistillRun:
    def __init__(self, cfg: DistillConfig, out: str | Path, force: bool = False,
                 resume: bool = False):
        self.cfg = cfg.resolved()
        self.dist, self.device = init_from_env(resolve_device(self.cfg.device))
        refuse_input_as_output(out, {"the teacher": self.cfg.teacher})
        self.ckpt = RunCheckpoint(out, force, resume, writer=self.dist.is_main,
                                  command="distill")
        self.precision = resolve_precision(self.cfg.precision, self.device)
        # Called after every iteration when set (a profiler's ``step``: bench/distill_speed.py).
        self.step_hook = None
        if self.cfg.teacher_stats == "global" and not self.dist.enabled:
            console.warn("--teacher-stats global normalises over all ranks' batches; this is "
                         "one process, so the teacher uses its own batch (run under torchrun "
                         "for more ranks)")
        if self.cfg.batch_size < MIN_GOOD_BATCH:
            console.warn(f"--batch-size {self.cfg.batch_size} is below {MIN_GOOD_BATCH}: the "
                         "teacher's batch statistics get noisy and the student learns less")

    def run(self) -> dict:
        c, dev = self.cfg, self.device
        cuda = dev.type == "cuda"
        fmt = memory_format_for(c.channels_last)
        self.memory_format = fmt
        if cuda:
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(c.seed)
        teacher_model, tmeta = load_checkpoint(c.teacher)
        self.num_classes = tmeta.num_classes
        teacher = FrozenTeacher(teacher_model, c.teacher_bn, c.running_fraction, c.seed,
                                source=f"teacher '{c.teacher}'",
                                norm_align=c.teacher_norm_align,
                                stats=c.teacher_stats).to(dev, fmt)
        noise = self._noise(tmeta, teacher)
        student = self._student(tmeta, teacher_model).to(dev, memory_format=fmt)
        distiller = NoiseKD(student, teacher, c.temperature, c.loss,
                            class_weighted=c.balance == "weight")
        self.ema = make_ema(student, c.ema)
        if self.dist.enabled:
            # Gradients are averaged across ranks and BN buffers averaged after each epoch
            # (sync_buffers), so every rank holds the same student. Each rank's teacher
            # normalises with the statistics of its own batch, or with --teacher-stats global
            # of all ranks' batches (distill/teacher.py).
            distiller.student = DDP(student, device_ids=[dev.index] if dev.type == "cuda"
                                    else None)
        val = self._load_val(tmeta)
        teacher_val, teacher_scores = None, {}
        if val is not None and self.dist.is_main:  # the teacher's own answers, computed once
            logits, labels = predict(teacher_model, val, tmeta.mean, tmeta.std, 512, dev)
            teacher_val = logits.argmax(1)
            teacher_scores = self._teacher_scores(teacher, teacher_val, labels, val, tmeta)
        opt, sched = optim.build(student, c.optimizer, c.schedule, c.lr, c.weight_decay,
                                 c.epochs * c.iters_per_epoch)
        step_fn = compile_step(distiller, c.compile_mode, dev) if c.compile else distiller
        # world_size: its ranks draw their own noise and average gradients, so another
        # number of processes is another run (refused on resume; recorded in the output)
        config = {**asdict(c), content_key("teacher"): file_sha256(c.teacher),
                  "world_size": self.dist.world_size}
        start, best, history = self.ckpt.restore(config, student, opt, sched, self.ema)
        if start:
            console.info(f"resuming {self.ckpt.path} after epoch {start}/{c.epochs}")
        console.info(f"distilling {tmeta.arch} -> {c.student} on {c.noise} noise "
                     f"({c.batch_size} x {c.iters_per_epoch} per epoch, {c.epochs} "
                     f"epoch{'s' * (c.epochs != 1)}), "
                     f"teacher BN {c.teacher_bn}, on {dev} ({self.precision})")
        row: dict = history[-1] if history else {}
        per_epoch = c.iters_per_epoch * c.batch_size
        with self.ckpt.writing(), \
                console.progress_task("distill", c.epochs * per_epoch, unit="img",
                                      completed=start * per_epoch) as advance:
            for epoch in range(start, c.epochs):
                torch.manual_seed(c.seed * 100_003 + epoch)
                row = self._epoch(step_fn, student, noise, epoch, opt, sched, advance)
                sync_buffers(student, self.dist)
                if not optim.steps_per_iteration(sched):
                    sched.step(row["loss"])
                if val is not None and self.dist.is_main and (
                        (epoch + 1) % c.val_every == 0 or epoch + 1 == c.epochs):
                    row.update(self._validate(student, val, tmeta, teacher_val))
                    row.update(teacher_scores)
                history.append(row)
                console.info(_epoch_line(row, c.epochs))
                # the best validated top-1 so far (the output is the last epoch's student)
                best = max(best, row.get("val_top1_current", best))
                meta = self._meta(tmeta, teacher, noise, config, history, row)
                self.ckpt.save(config, epoch, best, history, student, opt, sched, output=meta,
                               ema=self.ema)
        self.student = self.ema.module if self.ema else student  # the model written
        finish(self.dist)
        return {"out": str(self.ckpt.out), "state": str(self.ckpt.path), "device": str(dev),
                "world_size": self.dist.world_size,
                "teacher": c.teacher, "student": c.student, "noise": c.noise,
                "teacher_bn": teacher.describe(), **row, **run_rate(history),
                **({"val_images": len(val)} if val is not None else {}), "history": history}

    def _noise(self, tmeta: ModelMeta, teacher: FrozenTeacher):
        """The noise source: rendered fresh, drawn from a pool, and/or class-balanced."""
        c = self.cfg
        noise = make_noise(c.noise, tmeta.in_chans, tuple(tmeta.input_size), tmeta.mean,
                           tmeta.std, self.device, **c.noise_options)
        if c.noise_pool:
            noise = PooledNoise(noise, c.noise_pool)
        if c.balance == "reject":
            noise = BalancedNoise(noise, teacher, tmeta.num_classes)
        return noise

    def _student(self, tmeta: ModelMeta, teacher_model: torch.nn.Module) -> torch.nn.Module:
        """A new student for the teacher's classes, channels and input size."""
        arch, size = self.cfg.student, tuple(tmeta.input_size)
        student = create_model(arch, num_classes=tmeta.num_classes, in_chans=tmeta.in_chans)
        check_input_size(student, arch, tmeta.in_chans, size,
                         f"the student learns at the teacher's input size: pick a student "
                         f"that takes {size[0]}x{size[1]} images (kdtool models)")
        warn_student_fit(student, arch, teacher_model, tmeta.arch, size)
        return student

    def _load_val(self, tmeta: ModelMeta):
        c = self.cfg
        if not c.val:
            return None
        val = load_for_model(c.val, tmeta, None if c.val_limit is None else
                             Draw(c.val_limit, c.seed))
        check_fits(val, num_classes=tmeta.num_classes, in_chans=tmeta.in_chans,
                   what=f"teacher '{c.teacher}'")
        val.require_labels("validation data")
        return val

    def _epoch(self, step_fn, student, noise, epoch, opt, sched, advance) -> dict:
        c, dev = self.cfg, self.device
        student.train()
        # each rank draws different noise: seed + rank
        gen = epoch_generator(c.seed + 1_000_003 * self.dist.rank, epoch, dev)
        noise.start_epoch(gen)
        per_step = optim.steps_per_iteration(sched)
        sums: dict[str, torch.Tensor] = {}
        agree = torch.zeros((), device=dev, dtype=torch.long)
        hist = torch.zeros(self.num_classes, device=dev, dtype=torch.long)
        reported = 0
        t0 = time.perf_counter()
        for i in range(c.iters_per_epoch):
            begin_step(c.compile_mode if c.compile else None)
            # The labelled ranges name the phases in a profile; outside one they cost ~us.
            with record_function("distill/noise"):
                x = noise.sample(c.batch_size, gen)
                if self.memory_format is not None:
                    x = x.contiguous(memory_format=self.memory_format)
            with record_function("distill/forward"):
                with autocast_for(dev, self.precision):
                    s_logits, t_logits, terms = step_fn(x)
                loss = sum(terms.values())
            lr = optim.update(loss, opt, sched, per_step, self.ema, phase="distill")
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach()
            t_pred = t_logits.argmax(1)
            agree += (s_logits.argmax(1) == t_pred).sum()
            # not bincount: on CUDA it reads the maximum back to the host every step
            hist.scatter_add_(0, t_pred, torch.ones_like(t_pred))
            if (i + 1) % c.log_every == 0 or i + 1 == c.iters_per_epoch:
                mean_loss = sum(sums.values()).item() / (i + 1)  # the only host sync
                advance((i + 1 - reported) * c.batch_size,
                        info=f"epoch {epoch + 1} loss {mean_loss:.4f} lr {lr:.2e}")
                reported = i + 1
            if self.step_hook is not None:
                self.step_hook()
        secs = time.perf_counter() - t0
        n = c.iters_per_epoch
        # Averaged over ranks: the plateau scheduler must take the same step everywhere.
        terms_mean = {k: all_reduce_mean(v, self.dist).item() / n for k, v in sums.items()}
        loss = sum(terms_mean.values())
        if not math.isfinite(loss):
            raise KdtoolError(f"distillation diverged at epoch {epoch + 1} (loss {loss})",
                              "lower --lr")
        return {"epoch": epoch + 1, "loss": loss, **terms_mean,
                "noise_agreement": 100.0 * agree.item() / (n * c.batch_size),
                "teacher_class_balance": class_balance(hist), "lr": lr,
                "seconds": secs, "images_per_s": n * c.batch_size / secs}

    def _teacher_scores(self, teacher: FrozenTeacher, answers: torch.Tensor,
                        labels: torch.Tensor, val, tmeta: ModelMeta) -> dict:
        """The teacher's own top-1 on --val, the student's reference; batch-aligned too with
        --teacher-norm-align, since alignment changes the teacher itself, on real images as
        on noise, and the student can learn no better than the teacher it is shown."""
        scores = {"val_teacher_top1": percent_equal(answers, labels)}
        chance = 100.0 / tmeta.num_classes
        if scores["val_teacher_top1"] < chance + NEAR_CHANCE * (100.0 - chance):
            console.warn(f"the teacher scores {scores['val_teacher_top1']:.2f}% on --val "
                         f"'{self.cfg.val}', near chance ({chance:.3g}%): --val is likely not "
                         "the teacher's task (other classes or class order, other images), and "
                         "the student's --val figures will say little; pass the teacher's "
                         "validation data")
        if not self.cfg.teacher_norm_align:
            return scores
        logits, _ = predict(_Answering(teacher), val, tmeta.mean, tmeta.std, 256, self.device,
                            seed=self.cfg.seed, shuffle=True)  # batches as the student's
        aligned = percent_equal(logits.argmax(1), labels)
        scores["val_teacher_top1_aligned"] = aligned
        console.info(f"teacher on --val: {scores['val_teacher_top1']:.2f}% as is, "
                     f"{aligned:.2f}% batch-aligned (the answers the student learns from)")
        if aligned < scores["val_teacher_top1"] - ALIGNED_TEACHER_LOSS_WARN:
            console.warn(f"batch alignment costs this teacher "
                         f"{scores['val_teacher_top1'] - aligned:.1f} points on --val "
                         f"({aligned:.2f}% against {scores['val_teacher_top1']:.2f}% as is): "
                         "expect a student below the aligned teacher's accuracy")
        return scores

    def _validate(self, student, val, tmeta, teacher_val) -> dict:
        """Accuracy and agreement of the model written (the average with --ema) on both BN
        statistics; with --ema also the live student's, on current statistics."""
        def scores(model, bn: str) -> tuple[float, float]:  # (top-1, agreement with teacher)
            logits, labels = predict(model, val, tmeta.mean, tmeta.std, 256, self.device,
                                     bn=bn, seed=self.cfg.seed)
            pred = logits.argmax(1)
            return percent_equal(pred, labels), percent_equal(pred, teacher_val)

        out = {}
        for bn in ("current", "running"):
            out[f"val_top1_{bn}"], out[f"agreement_{bn}"] = scores(
                self.ema.module if self.ema else student, bn)
        if self.ema is not None:
            out["val_top1_current_live"] = scores(student, "current")[0]
        student.train()
        return out

    def _meta(self, tmeta, teacher, noise, config, history, row) -> ModelMeta:
        metrics = {k: v for k, v in row.items() if k.startswith(("val_", "agreement", "loss"))}
        return ModelMeta(
            arch=self.cfg.student, num_classes=tmeta.num_classes, in_chans=tmeta.in_chans,
            input_size=list(tmeta.input_size), mean=list(tmeta.mean), std=list(tmeta.std),
            class_names=list(tmeta.class_names), crop_fraction=tmeta.crop_fraction,
            interpolation=tmeta.interpolation,
            provenance=provenance(seed=self.cfg.seed, metrics=metrics,
                                  device=device_label(self.device), precision=self.precision),
            stages={"distill": {
                "teacher": {"file": self.cfg.teacher, "arch": tmeta.arch,
                            "metrics": tmeta.provenance.get("metrics", {})},
                "teacher_bn": teacher.describe(), "noise": noise.describe(),
                "config": config, "epoch": row["epoch"], "history": history,
                # The student's BN running buffers hold statistics of noise, not of real
                # images: evaluate it on current statistics or run `kdtool calibrate`.
                "bn_running_stats": "noise"}})


def class_balance(hist: torch.Tensor) -> float:
    """Entropy of the teacher's predicted-class histogram over log(classes): 1 = uniform."""
    p = hist.double() / hist.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    # max(0, ...): one class only gives -0.0, which would print as "-0.000"
    return max(0.0, entropy / math.log(len(hist))) if len(hist) > 1 else 1.0


class _Answering(torch.nn.Module):
    """A FrozenTeacher as a module, for ``predict``: its BN mode and alignment stay its own,
    but on per-rank statistics, since only rank 0 answers --val."""

    def __init__(self, teacher: FrozenTeacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x, stats="rank")


def _epoch_line(row: dict, epochs: int) -> str:
    val = ""
    if "val_top1_current" in row:
        val = (f" val {row['val_top1_current']:.2f}% (current BN) "
               f"{row['val_top1_running']:.2f}% (running BN), agreement "
               f"{row['agreement_current']:.1f}%")
        if "val_top1_current_live" in row:
            val += f", live weights {row['val_top1_current_live']:.2f}% (current BN)"
    return (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f}{val} lr {row['lr']:.2e} "
            f"{console.rate_text(row['images_per_s'])} img/s")
