"""Options shared by several commands, and parsers for their values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from kdtool.errors import KdtoolError

Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same run.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue the interrupted run that writes --out (state saved per epoch).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the training step.")]
Precision = Annotated[str, typer.Option(
    "--precision", help="Arithmetic of the training step: auto (bf16 on CUDA, fp32 on a CPU), "
    "fp32, or bf16 (bf16 autocast; on a CPU with bf16 instructions, AVX512-BF16, AMX or Arm "
    "BF16, 2-3x faster than fp32).")]
ChannelsLast = Annotated[bool, typer.Option(
    "--channels-last/--no-channels-last", help="Lay models and batches out as NHWC, where "
    "convolutions run fastest on CUDA and, measured, on x86 CPUs too (1.00-1.36x for fp32 "
    "steps on 2 cores); --no-channels-last keeps PyTorch's NCHW. It changes speed, not what "
    "is computed, and may change on --resume.")]
CompileMode = Annotated[str | None, typer.Option(
    "--compile-mode", help="torch.compile mode, implies --compile: default, reduce-overhead "
    "(CUDA graphs: no CPU cost per kernel launch), max-autotune (CUDA graphs and tuned "
    "kernels; slow to start) or max-autotune-no-cudagraphs.")]
ValLimit = Annotated[int | None, typer.Option(
    "--val-limit", help="Validate on a seeded random N of --val's images (chosen with "
    "--seed; a folder or zip decodes only those): for a validation set too large to score, "
    "or to hold, every epoch.", show_default=False)]
Ema = Annotated[float, typer.Option(
    "--ema", help="Keep an exponential moving average of the weights with this decay (e.g. "
    "0.999; it spans ~1/(1-decay) steps) and validate and write it instead of the last "
    "weights; the live weights' accuracy is shown beside it. 0: off.")]
Resize = Annotated[str | None, typer.Option(
    "--resize", help="How images of another size are fitted to the model's input, recorded in "
    "the checkpoint and used by eval, calibrate, export, bench and serve: stretch (resize to "
    "HxW) or crop[:F] (keep the aspect ratio, resize to cover HxW / F, take the centre HxW; "
    "crop:0.875 is torchvision's resize 256 / crop 224).",
    rich_help_panel="Normalisation")]
Interpolation = Annotated[str | None, typer.Option(
    "--interpolation", help="Of the --resize resizes: bilinear or bicubic (recorded like "
    "--resize).", show_default="bilinear; for tv: and timm: architectures, their weights' own",
    rich_help_panel="Normalisation")]
DATA_HELP = ("A dataset: an ImageFolder directory (<class>/<image>), a zip of one, an .npz "
             "(x uint8 NHWC, y int), or the embedded 'digits' / 'digits:test'.")

# For plain state_dicts (.pt/.pth), which do not describe themselves.
Arch = Annotated[str | None, typer.Option(
    "--arch", help="Architecture of a plain state_dict (kdtool models; tv:NAME for torchvision, "
    "timm:NAME for timm).",
    rich_help_panel="Plain state_dict")]
NumClasses = Annotated[int | None, typer.Option(
    "--num-classes", help="Classes of a plain state_dict (default: read from its classifier's "
    "shape).",
    rich_help_panel="Plain state_dict")]
InChans = Annotated[int | None, typer.Option(
    "--in-chans", help="Input channels of a plain state_dict (default: read from its first "
    "layer's shape).",
    rich_help_panel="Plain state_dict")]
ImageSize = Annotated[str | None, typer.Option(
    "--image-size", help="Input size of a plain state_dict, N or H,W (default: the "
    "architecture's: 32 for kdtool's, torchvision's crop size for tv:, the pretrained "
    "config's for timm:). It "
    "must be the size the model was trained at: a CIFAR model scored at 224 is scored at "
    "chance.",
    rich_help_panel="Plain state_dict")]
Mean = Annotated[str | None, typer.Option(
    "--mean", help="Normalisation mean per channel, e.g. 0.4914,0.4822,0.4465. Default: "
    "'kdtool train' measures its data's; a tv: or timm: state_dict has its weights'; a plain "
    "state_dict of a kdtool architecture needs it given; on a kdtool checkpoint it overrides "
    "the recorded one, with a warning.",
    rich_help_panel="Normalisation")]
Std = Annotated[str | None, typer.Option(
    "--std", help="Normalisation std per channel, e.g. 0.2023,0.1994,0.2010; given with "
    "--mean, and defaulted as it is.",
    rich_help_panel="Normalisation")]


def parse_list(text: str, option: str, kind: type = float, example: str = "0.5,0.5,0.5",
               what: str = "numbers", distinct: bool = False) -> list:
    """``--option 1,2,3`` as a list of ``kind`` (int or float), in the order given;
    ``distinct``: points of a sweep or a benchmark, where a repeat would run twice."""
    items = text.replace(" ", "").split(",")
    if len(items) > 1 and "" in items:  # '0.5,,0.5' once lost a value without a word
        raise KdtoolError(f"{option} '{text}' has an empty item", f"e.g. {option} {example}")
    try:
        values = [kind(v) for v in items if v]
    except ValueError:
        raise KdtoolError(f"{option} '{text}' is not a comma-separated list of {what}",
                          f"e.g. {option} {example}") from None
    if not values:
        raise KdtoolError(f"{option} is empty", f"e.g. {option} {example}")
    if not all(math.isfinite(v) for v in values):  # float() reads "nan" and "inf"
        raise KdtoolError(f"{option} '{text}' has a value that is not a finite number",
                          f"e.g. {option} {example}")
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if distinct and repeated is not None:
        raise KdtoolError(f"{option} '{text}' gives {repeated:g} twice", f"e.g. {option} "
                          f"{example}")
    return values


def parse_floats(text: str | None, option: str, distinct: bool = False
                 ) -> list[float] | None:
    return None if text is None else parse_list(text, option, distinct=distinct)


def parse_norm(mean: str | None, std: str | None) -> tuple[list[float] | None, ...]:
    """--mean and --std as lists, both or neither: half a normalisation is refused, not
    quietly replaced by a default."""
    m, s = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    if (m is None) != (s is None):
        given, missing = ("--mean", "--std") if s is None else ("--std", "--mean")
        raise KdtoolError(f"{given} was given without {missing}",
                          "pass both --mean and --std (the values the model was trained with)")
    return m, s


def parse_image_size(text: str | None, option: str = "--image-size") -> list[int] | None:
    """'32', '32,32' or '32x32' -> [32, 32]."""
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        size = [int(v) for v in parts]
    except ValueError:
        size = []
    if len(size) == 1:
        size *= 2
    if len(size) != 2 or min(size) < 1:
        raise KdtoolError(f"{option} '{text}' is not a size", f"e.g. {option} 32 or 32,32")
    from kdtool.imageprep import MAX_SIDE

    if max(size) > MAX_SIDE:  # what a checkpoint may record: refused before, not after, work
        raise KdtoolError(f"{option} '{text}' is more than {MAX_SIDE} pixels a side",
                          f"e.g. {option} 224")
    return size



def foreign_spec(path: Path, arch: str | None, num_classes: int | None, in_chans: int | None,
                 mean: str | None, std: str | None, image_size: str | None = None):
    """A ForeignSpec when the user described a plain state_dict, else None (kdtool file)."""
    from kdtool.checkpoint import FOREIGN_SUFFIXES, ForeignSpec, has_kdtool_meta, read_meta

    if path.name.endswith(".state.pt"):
        read_meta(path)  # raises: a run state, not a checkpoint; names the one beside it
    if arch is not None and has_kdtool_meta(path):  # its metadata would be ignored
        raise KdtoolError(f"--arch describes a plain state_dict; '{path}' is a kdtool "
                          "checkpoint and records its architecture, input and normalisation",
                          "drop --arch ('kdtool info' shows what it records)")
    if arch is None:
        if path.suffix.lower() in FOREIGN_SUFFIXES:
            raise KdtoolError(f"'{path}' is a plain state_dict and does not name its architecture",
                              "pass --arch (see 'kdtool models'); --image-size unless the "
                              "architecture's, and --mean/--std for "
                              "kdtool's own architectures (tv: and timm: know their weights')")
        if image_size is not None:
            raise KdtoolError(f"--image-size describes a plain state_dict; '{path}' records "
                              "its input size", "drop --image-size: images of other sizes are "
                              "fitted by the checkpoint's --resize rule")
        for option, value, what in (("--num-classes", num_classes, "classes"),
                                    ("--in-chans", in_chans, "input channels")):
            if value is not None:
                raise KdtoolError(f"{option} describes a plain state_dict; '{path}' records "
                                  f"its {what}", f"drop {option}")
        return None
    mean_values, std_values = parse_norm(mean, std)
    return ForeignSpec(arch=arch, num_classes=num_classes, in_chans=in_chans,
                       input_size=parse_image_size(image_size), mean=mean_values, std=std_values)


def parse_class_names(text: str, num_classes: int, option: str = "--class-names") -> list[str]:
    """Class names from 'imagenet', a .txt (one per line) or .json (a list) file, or a, b, c."""
    how = (f"give {num_classes} names: comma-separated, a .txt file with one per line, a .json "
           "list, or 'imagenet' (torchvision's 1,000 ImageNet class names)")
    path = Path(text).expanduser()
    if text == "imagenet":
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        names = list(_IMAGENET_CATEGORIES)
    elif path.suffix.lower() in (".txt", ".json"):
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KdtoolError(f"cannot read {option} file '{path}': {e}", how) from None
        if path.suffix.lower() == ".json":
            import json

            try:
                names = json.loads(raw)
            except ValueError as e:
                raise KdtoolError(f"{option} file '{path}' is not valid JSON: {e}", how) from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise KdtoolError(f"{option} file '{path}' must hold a JSON list of strings", how)
        else:
            names = [line.strip() for line in raw.splitlines() if line.strip()]
    else:
        names = [c.strip() for c in text.split(",")]
    if len(names) != num_classes:
        raise KdtoolError(f"{option} '{text}' gives {len(names)} names for {num_classes} classes",
                          how)
    if any(not n for n in names):
        raise KdtoolError(f"{option} '{text}' has an empty name", how)
    from kdtool.imageprep import repeated_name

    twice = repeated_name(names)
    if twice is not None:  # eval would match a folder of that name to one of them only
        raise KdtoolError(f"{option} '{text}' names class '{twice}' twice",
                          "give each class a name of its own")
    return names


# The optimiser's defaults, one wording for train and distill (kdtool.optim.resolve).
Schedule = Annotated[str | None, typer.Option(
    "--schedule", help="onecycle, cosine or plateau (default: onecycle for sgd, plateau for "
    "adam, the paper's).")]
LearningRate = Annotated[float | None, typer.Option(
    "--lr", help="Peak learning rate (default 0.1 for sgd, 1e-3 for adam).")]
WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", help="L2 penalty on weights (not on BN or biases).")]
Threads = Annotated[int | None, typer.Option(
    "--threads", help="CPU threads for PyTorch and ONNX Runtime (unset or 0: theirs, one per "
    "core).")]
