"""``kdtool distill``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import (
    DATA_HELP,
    ChannelsLast,
    Compile,
    CompileMode,
    Device,
    Ema,
    Force,
    Json,
    LearningRate,
    Precision,
    Resume,
    Schedule,
    Seed,
    Threads,
    ValLimit,
    WeightDecay,
)


@app.command("distill")
def distill_cmd(
    teacher: Annotated[Path, typer.Option("--teacher", help="The teacher: a kdtool checkpoint "
                                          "(convert a plain state_dict with 'kdtool convert').")],
    student: Annotated[str, typer.Option("--student", help="Student architecture: a kdtool "
                                         "model for 32x32 inputs (see 'kdtool models'), or "
                                         "tv:NAME / timm:NAME for ImageNet-size ones "
                                         "(tv:mobilenet_v3_small).")] = "resnet18",
    noise: Annotated[str, typer.Option(
        "--noise", help="gaussian (N(0,1) in the normalised input space, the paper's), uniform "
        "or dead_leaves.")] = "gaussian",
    shapes: Annotated[str | None, typer.Option(
        "--shapes", help="Dead-leaves shapes: mixed, circle, square, rotated_square, rectangle, "
        "triangle or quadrilateral.", show_default="mixed")] = None,
    balance: Annotated[str, typer.Option(
        "--balance", help="Class balance of the teacher's answers on noise (beyond the paper): "
        "weight (weight each image's loss so every class the teacher predicts in a batch "
        "counts the same; no extra cost; +2-3 points measured, docs/BENCHMARKS.md); reject "
        "(draw 2x the noise, keep an even share of each predicted class; one more teacher "
        "forward per step); off (the paper's plain loss).")
    ] = "weight",
    noise_pool: Annotated[int, typer.Option(
        "--noise-pool", help="Render N noise images per epoch and draw batches from them under "
        "random flips, quarter turns, channel permutations and inversions (0: a fresh batch "
        "every step). Measured as good as fresh noise from 0.6 x iters-per-epoch x batch-size "
        "images up; smaller pools are faster and about a point less accurate.")] = 0,
    teacher_bn: Annotated[str, typer.Option(
        "--teacher-bn", help="Teacher BatchNorm statistics: current (batch statistics: the "
        "method), running (classic KD, the failure baseline) or mixed.")] = "current",
    running_fraction: Annotated[float | None, typer.Option(
        "--running-fraction", help="With --teacher-bn mixed: the share of BN layers, chosen "
        "with --seed, kept on running statistics.")] = None,
    teacher_stats: Annotated[str, typer.Option(
        "--teacher-stats", help="Under torchrun: rank (each process's teacher normalises with "
        "its own batch) or global (with the statistics of all processes' batches, like one "
        "batch of N x --batch-size; see docs/RESULTS.md).")] = "rank",
    teacher_norm_align: Annotated[bool, typer.Option(
        "--teacher-norm-align", help="For a teacher without BatchNorm (GroupNorm, LayerNorm, "
        "InstanceNorm): standardise each normaliser's output per channel over the noise batch "
        "before its affine transform, as BN would (NormShift-KD's batch alignment; beyond the "
        "paper, see docs/RESULTS.md).")] = False,
    loss: Annotated[str, typer.Option(
        "--loss", help="soft_ce (the paper's soft cross-entropy) or kl (KL x T^2).")] = "soft_ce",
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature.")
                           ] = 1.0,
    epochs: Annotated[int, typer.Option(
        "--epochs", help="Epochs of --iters-per-epoch noise batches.")] = 200,
    iters_per_epoch: Annotated[int, typer.Option(
        "--iters-per-epoch", help="Noise batches per epoch (196 = CIFAR-10 at batch 256).")
    ] = 196,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Noise images per batch: the batch whose statistics the teacher "
        "normalises with.")] = 256,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam (the paper's) or sgd.")
                         ] = "adam",
    schedule: Schedule = None,
    lr: LearningRate = None,
    weight_decay: WeightDecay = 0.0,
    val: Annotated[str | None, typer.Option(
        "--val", help="Optional labelled real data to validate on. " + DATA_HELP)] = None,
    val_every: Annotated[int, typer.Option(
        "--val-every", help="Validate every N epochs and after the last.")] = 1,
    val_limit: ValLimit = None,
    compile_: Compile = False,
    compile_mode: CompileMode = None,
    precision: Precision = "auto",
    channels_last: ChannelsLast = True,
    ema: Ema = 0.0,
    out: Annotated[Path, typer.Option("--out", help="Student checkpoint to write.")] = Path(
        "student.safetensors"),
    resume: Resume = False,
    force: Force = False,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Distil a teacher into a student from noise alone: no training data.

    The teacher's BatchNorm layers normalise with the statistics of each noise batch
    (--teacher-bn current), which is what makes noise informative. The teacher is never
    modified. The student's BN running statistics are noise statistics afterwards:
    evaluate it with 'kdtool eval --bn current' or fix them with 'kdtool calibrate'.

    Example: [bold]kdtool distill --teacher teacher.safetensors --student resnet8 --noise
    gaussian --epochs 20 --val digits:test --out student.safetensors[/bold]
    """
    from kdtool import console
    from kdtool.device import cpu_threads
    from kdtool.distill.loop import DistillConfig, DistillRun
    from kdtool.runstate import stopped_with_hint

    options = {"shapes": shapes} if shapes is not None else {}
    cfg = DistillConfig(
        teacher=str(teacher), student=student, noise=noise, noise_options=options, balance=balance,
        noise_pool=noise_pool,
        teacher_bn=teacher_bn, running_fraction=running_fraction,
        teacher_norm_align=teacher_norm_align, teacher_stats=teacher_stats, loss=loss,
        temperature=temperature, epochs=epochs, iters_per_epoch=iters_per_epoch,
        batch_size=batch_size, optimizer=optimizer, schedule=schedule, lr=lr,
        weight_decay=weight_decay, val=val, val_every=val_every, val_limit=val_limit, seed=seed,
        device=device,
        compile=compile_ or compile_mode is not None, compile_mode=compile_mode or "default",
        precision=precision, channels_last=channels_last, ema=ema)
    with stopped_with_hint(out, resume), cpu_threads(threads):
        result = DistillRun(cfg, out, force=force, resume=resume).run()

    def render(r):
        rows = [["output", r["out"]], ["student", f"{r['student']} from {r['teacher']}"],
                ["noise / teacher BN", f"{r['noise']} / {r['teacher_bn']['bn_mode']}"],
                ["final loss", f"{r['loss']:.4f}"],
                ["agreement on noise", f"{r['noise_agreement']:.1f}%"],
                ["teacher class balance on noise", f"{r['teacher_class_balance']:.3f} "
                 "(1 = uniform)"]]
        for bn in ("current", "running"):
            if f"val_top1_{bn}" in r:
                rows.append([f"val top-1 ({bn} BN)", f"{r[f'val_top1_{bn}']:.2f}% "
                             f"(agrees with teacher {r[f'agreement_{bn}']:.1f}%)"])
        if "val_top1_current_live" in r:
            rows.append(["val top-1 (current BN), live weights (not --ema)",
                         f"{r['val_top1_current_live']:.2f}%"])
        if "val_teacher_top1" in r:  # the student's reference, on the same --val
            aligned = (f" ({r['val_teacher_top1_aligned']:.2f}% batch-aligned, the answers "
                       "the student learns from)" if "val_teacher_top1_aligned" in r else "")
            rows.append(["val top-1 (teacher)", f"{r['val_teacher_top1']:.2f}%{aligned}"])
        rows.append(["throughput",
                     f"{console.rate_text(r['images_per_s'])} img/s on {r['device']}"])
        console.print_kv("kdtool distill", rows)

    console.emit(result, as_json, render)
