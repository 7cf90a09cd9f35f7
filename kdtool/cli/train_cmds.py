"""``kdtool train`` and ``kdtool eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import (
    DATA_HELP,
    Arch,
    ChannelsLast,
    Compile,
    CompileMode,
    Device,
    Ema,
    Force,
    ImageSize,
    InChans,
    Interpolation,
    Json,
    LearningRate,
    Mean,
    NumClasses,
    Precision,
    Resize,
    Resume,
    Schedule,
    Seed,
    Std,
    Threads,
    ValLimit,
    WeightDecay,
    foreign_spec,
    parse_image_size,
    parse_norm,
)


@app.command("train")
def train_cmd(
    data: Annotated[str, typer.Option("--data", help="Training data. " + DATA_HELP)],
    arch: Annotated[str, typer.Option("--arch", help="Architecture (see 'kdtool models').")] = (
        "resnet18"),
    val: Annotated[str | None, typer.Option(
        "--val", help="Validation data (same forms as --data); the best epoch by it is kept.")
    ] = None,
    val_every: Annotated[int, typer.Option(
        "--val-every", help="Validate every N epochs and after the last (a large --val costs "
        "time each epoch); the best of the validated epochs is kept.")] = 1,
    val_limit: ValLimit = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training data.")] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 128,
    optimizer: Annotated[str, typer.Option(
        "--optimizer", help="sgd (Nesterov; fast default) or adam (the paper's).")] = "sgd",
    schedule: Schedule = None,
    lr: LearningRate = None,
    weight_decay: WeightDecay = 5e-4,
    label_smoothing: Annotated[float, typer.Option(
        "--label-smoothing", help="Share of each target spread over the other classes, e.g. "
        "0.1.")] = 0.0,
    augment: Annotated[bool | None, typer.Option(
        "--augment/--no-augment", help="Random crop (pad 4) + flip; default on except for "
        "images under 16 px.", show_default=False)] = None,
    cutout: Annotated[int, typer.Option(
        "--cutout", help="With augmentation: erase a random square of this side (0: off).")] = 0,
    image_size: Annotated[str | None, typer.Option(
        "--image-size", help="Fit images to this size, N or H,W, by --resize (default: keep "
        "their size).")] = None,
    resize: Resize = None,
    interpolation: Interpolation = None,
    mean: Mean = None,
    std: Std = None,
    compile_: Compile = False,
    compile_mode: CompileMode = None,
    precision: Precision = "auto",
    channels_last: ChannelsLast = True,
    ema: Ema = 0.0,
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write.")] = Path(
        "teacher.safetensors"),
    resume: Resume = False,
    force: Force = False,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Train a classifier (a teacher) on real data; the data decide classes, channels and size.

    Example: [bold]kdtool train --arch resnet8 --data digits --val digits:test --epochs 15
    --out teacher.safetensors[/bold]
    """
    import os

    from kdtool import console
    from kdtool.device import cpu_threads
    from kdtool.errors import KdtoolError
    from kdtool.runstate import stopped_with_hint
    from kdtool.train import TrainConfig, Trainer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would train alone
        raise KdtoolError("kdtool train runs in one process; torchrun started "
                          f"{os.environ['WORLD_SIZE']}", "run 'kdtool train' without torchrun "
                          "(torchrun is for 'kdtool distill')")
    mean_values, std_values = parse_norm(mean, std)
    size = parse_image_size(image_size)
    if size is not None and size[0] == size[1]:
        size = size[0]  # a square size as an int, as run states have recorded it
    cfg = TrainConfig(arch=arch, data=data, val=val, val_every=val_every, val_limit=val_limit,
                      epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                      schedule=schedule, lr=lr,
                      weight_decay=weight_decay,
                      label_smoothing=label_smoothing, augment=augment, cutout=cutout,
                      image_size=size, resize=resize,
                      interpolation=interpolation or "bilinear",
                      mean=mean_values, std=std_values,
                      seed=seed, device=device, compile=compile_ or compile_mode is not None,
                      compile_mode=compile_mode or "default", precision=precision,
                      channels_last=channels_last, ema=ema)
    with stopped_with_hint(out, resume), cpu_threads(threads):
        result = Trainer(cfg, out, force=force, resume=resume).run()

    def render(r):
        rows = [["output", r["out"]], ["best epoch", f"{r['best_epoch']}/{r['epochs']}"],
                ["train loss", f"{r['loss']:.4f}"], ["train top-1", f"{r['train_top1']:.2f}%"]]
        if "val_top1" in r:
            rows.append(["val top-1", f"{r['val_top1']:.2f}%"])
        if "val_top1_live" in r:
            rows.append(["val top-1, live weights (not --ema)", f"{r['val_top1_live']:.2f}%"])
        rows.append(["throughput",
                     f"{console.rate_text(r['images_per_s'])} img/s on {r['device']}"])
        console.print_kv("kdtool train", rows)

    console.emit(result, as_json, render)


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A kdtool checkpoint (or a plain "
                                               "state_dict with --arch), an .onnx file or a "
                                               "TensorRT engine.")],
    data: Annotated[str, typer.Option("--data", help="Labelled data. " + DATA_HELP)],
    bn: Annotated[str, typer.Option(
        "--bn", help="BatchNorm statistics: running (deployment) or current (batch statistics,"
        " the paper's evaluation of a noise student).")] = "running",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 256,
    per_class: Annotated[bool, typer.Option(
        "--per-class/--no-per-class", help="Show accuracy per class.")] = True,
    tta: Annotated[str, typer.Option(
        "--tta", help="Test-time augmentation: none, or flip (average the logits of each "
        "image and its mirror image; for classes that mirroring does not change, unlike "
        "digits).")] = "none",
    limit: Annotated[int | None, typer.Option(
        "--limit", help="Score a random N of the images (chosen with --seed; a folder or zip "
        "decodes only those): a quick check on a large set, with its 95% interval.")] = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Top-1 accuracy (overall and per class) of a checkpoint on a labelled dataset.

    An .onnx file or TensorRT engine is evaluated as deployed, on ONNX Runtime or TensorRT
    (the runners of 'kdtool bench'), with the normalisation it records.

    Example: [bold]kdtool eval student.safetensors --data digits:test --bn current
    --batch-size 256[/bold]
    """
    from kdtool import console
    from kdtool.bn import BN_MODES
    from kdtool.device import cpu_threads
    from kdtool.errors import KdtoolError, check_choice
    from kdtool.evaluate import TTA_MODES

    check_choice(bn, BN_MODES, "--bn value")
    check_choice(tta, TTA_MODES, "--tta mode")
    if batch_size < 1:
        raise KdtoolError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise KdtoolError(f"--limit must be >= 1, got {limit}")
    if checkpoint.suffix.lower() in DEPLOYED_SUFFIXES:
        described = {"--arch": arch, "--num-classes": num_classes, "--in-chans": in_chans,
                     "--image-size": image_size, "--mean": mean, "--std": std}
        rep = _eval_deployed(checkpoint, data, bn, batch_size, tta, device, described, threads,
                             limit, seed)
    else:
        with cpu_threads(threads):
            rep = _eval_checkpoint(checkpoint, data, bn, batch_size, tta, device, seed, limit,
                                   foreign_spec(checkpoint, arch, num_classes, in_chans, mean,
                                                std, image_size),
                                   parse_norm(mean, std) if arch is None and (mean or std)
                                   else None)
    result = {"checkpoint": str(checkpoint), "data": data, "bn": bn, "tta": tta,
              "batch_size": batch_size, **rep}
    if bn == "current" or limit is not None:  # --seed chose the images, or their batches
        result["seed"] = seed
    if limit is not None:
        result["limit"] = limit
    if not per_class:
        result.pop("per_class")
        result.pop("per_class_images")

    def render(r):
        lo, hi = r["top1_ci95"]
        # fewer images than --limit: all of them were scored, and that is no sample
        drawn = (f" (a random {r['limit']}, --seed {r['seed']})"
                 if r.get("limit") == r["images"] else "")
        rows = [["images", f"{r['images']}{drawn}"], ["top-1", f"{r['top1']:.2f}%"],
                ["top-1, 95% interval", f"{lo:.1f}-{hi:.1f}%"]]
        if "top5" in r:
            rows.append(["top-5", f"{r['top5']:.2f}%"])
        tta_note = f", {r['tta']} TTA" if r["tta"] != "none" else ""
        where = f"{r['backend']}, " if "backend" in r else f"BN {r['bn']}, "
        console.print_kv(f"{r['checkpoint']} on {r['data']} ({where}batch "
                         f"{r['batch_size']}{tta_note})", rows)
        if r.get("per_class"):
            console.out.print(console.table(
                "per class", ["class", "images", "top-1 %"],
                [[k, r["per_class_images"][k], f"{v:.2f}"] for k, v in r["per_class"].items()]))

    console.emit(result, as_json, render)


DEPLOYED_SUFFIXES = (".onnx", ".plan", ".engine", ".trt")


def _eval_checkpoint(checkpoint: Path, data: str, bn: str, batch_size: int, tta: str,
                     device: str, seed: int, limit: int | None, spec, norm) -> dict:
    from kdtool import console
    from kdtool.checkpoint import load_checkpoint, per_channel_norm
    from kdtool.data import Draw, check_fits, open_for_model
    from kdtool.device import memory_format_for, resolve_device
    from kdtool.evaluate import evaluate
    from kdtool.train import trained_with_flips

    model, meta = load_checkpoint(checkpoint, spec)
    override = None
    if norm is not None:  # a kdtool file knows its normalisation; flags override, loudly
        recorded = {"mean": meta.mean, "std": meta.std}
        meta.mean, meta.std = per_channel_norm(*norm, meta.in_chans, f"checkpoint '{checkpoint}'")
        if [meta.mean, meta.std] != [recorded["mean"], recorded["std"]]:
            override = {"recorded": recorded, "used": {"mean": meta.mean, "std": meta.std}}
            console.warn(f"--mean/--std override the normalisation '{checkpoint}' records "
                         f"(mean {recorded['mean']}, std {recorded['std']}): the accuracy is "
                         "that of the model fed otherwise than it was trained")
    # The data first: a wrong --data is the error to see, not a warning about the model.
    dev = resolve_device(device)
    # As export, bench and serve will fit them; --limit: a seeded draw of them; more than
    # memory should hold: decoded a chunk at a time
    ds = open_for_model(data, meta, None if limit is None else Draw(limit, seed))
    check_fits(ds, num_classes=meta.num_classes, in_chans=meta.in_chans,
               what=f"checkpoint '{checkpoint}'", class_names=meta.class_names)
    uncalibrated = meta.noise_bn_warning(str(checkpoint))
    if bn == "running" and uncalibrated:
        console.warn(f"{uncalibrated}; or measure what it learnt with --bn current")
    trained = (meta.stages.get("train") or {}).get("config")
    if tta == "flip" and trained is not None and \
            not trained_with_flips(trained.get("augment"), meta.input_size):
        console.warn(f"'{checkpoint}' was trained without flips (augmentation off): --tta "
                     "flip also shows it mirror images it never learnt, which can cost "
                     "accuracy (digits: 2 and 5 mirror into other shapes); compare with --tta "
                     "none")
    if bn == "current" and len(ds) < batch_size:
        console.warn(f"'{data}' has {len(ds)} images, fewer than --batch-size {batch_size}: the "
                     f"current statistics come from one batch of {len(ds)}, noisier than the "
                     f"{batch_size} the figure is meant for")
    # NHWC, PyTorch's faster layout for convolutions (as train and distill validate)
    model = model.to(dev, memory_format=memory_format_for(True))
    result = evaluate(model, ds, meta.mean, meta.std, batch_size=batch_size, device=dev,
                      bn=bn, seed=seed, channels_last=True, progress=True, lasting=True,
                      tta=tta)
    return {**result, "normalisation_override": override} if override else result


def _eval_deployed(path: Path, data: str, bn: str, batch_size: int, tta: str, device: str,
                   described: dict, threads: int | None, limit: int | None, seed: int) -> dict:
    """An exported file as deployed: it records its input, normalisation and classes, and
    its BatchNorm is fixed (folded, or running statistics), so --bn current cannot apply."""
    from kdtool.deploy.accuracy import evaluate_file
    from kdtool.errors import KdtoolError

    given = [flag for flag, value in described.items() if value is not None]
    if given:
        raise KdtoolError(f"{given[0]} describes a plain state_dict, and '{path}' records its "
                          "own input, normalisation and classes", f"drop {' '.join(given)}")
    if bn == "current":
        raise KdtoolError(f"--bn current renormalises BatchNorm with batch statistics, and "
                          f"'{path}' is an exported graph whose BatchNorm is fixed",
                          "evaluate the checkpoint it was exported from with --bn current")
    return {**evaluate_file(path, data, device=device, batch_size=batch_size, tta=tta,
                            threads=threads, limit=limit, seed=seed), "bn": "as exported"}
