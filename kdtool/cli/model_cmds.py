"""``kdtool models``, ``kdtool info`` and ``kdtool convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import (
    Arch,
    Force,
    ImageSize,
    InChans,
    Interpolation,
    Json,
    Mean,
    NumClasses,
    Resize,
    Std,
    foreign_spec,
    parse_class_names,
)
from kdtool.io import file_sha256, require_file


@app.command("models")
def models_cmd(
    torchvision: Annotated[bool, typer.Option(
        "--torchvision", help="Also list torchvision classifiers (use them as tv:NAME).")] = False,
    timm: Annotated[str | None, typer.Option(
        "--timm", metavar="PATTERN", help="Also list the timm classifiers whose names match "
        "this pattern, e.g. 'resnet*' or '*' (use them as timm:NAME; needs timm).")] = None,
    as_json: Json = False,
) -> None:
    """List the registered architectures with parameter counts and input size.

    Example: [bold]kdtool models --timm 'mobilenetv3*'[/bold]
    """
    from kdtool import console
    from kdtool.errors import KdtoolError
    from kdtool.models import TIMM_PREFIX, architecture_params, list_models, model_spec

    rows = []
    names = list_models()
    registered = set(names)
    if torchvision:
        from kdtool.models.torchvision_models import list_names

        names += ["tv:" + n for n in list_names()]
    if timm is not None:
        from kdtool.models import timm_models

        if not timm.strip():  # '' listed every model, for minutes
            raise KdtoolError("--timm needs a pattern", "e.g. --timm 'resnet*', or '*' for all")

        matched = timm_models.list_names(timm)
        if not matched:
            raise KdtoolError(f"no timm model matches '{timm}'",
                              "patterns use * and ?, e.g. --timm 'resnet*'")
        names += [TIMM_PREFIX + n for n in matched]
    # Each model is built on the meta device, uninitialised: ~0.07 s a torchvision model.
    with console.progress_task("count parameters", len(names), unit="model",
                               transient=True) as advance:
        for name in names:
            spec = model_spec(name)
            params = architecture_params(name, num_classes=10 if name in registered else 1000)
            rows.append({"name": name, "family": spec.family, "params": params,
                         "input_size": list(spec.input_size), "description": spec.description})
            advance()

    def render(result):
        console.out.print(console.table(
            "kdtool architectures (parameters for 10 classes; 1000 for tv: and timm:)",
            ["name", "family", "params", "input", "description"],
            [[r["name"], r["family"], console.params_text(r["params"]),
              "x".join(map(str, r["input_size"])), r["description"]]
             for r in result["models"]]))

    console.emit({"models": rows}, as_json, render)


@app.command("info")
def info_cmd(
    checkpoint: Annotated[Path, typer.Argument(
        help="A kdtool .safetensors checkpoint, an .onnx file written by kdtool export, or "
        "a TensorRT engine (its metadata is in the sidecar kdtool export writes).")],
    as_json: Json = False,
) -> None:
    """Print a checkpoint's metadata: architecture, classes, input, normalisation, provenance.

    An ONNX file shows the metadata kdtool export wrote into it (what bench and serve read);
    a TensorRT engine, the metadata of the ONNX it was built from.

    Example: [bold]kdtool info teacher.safetensors[/bold]
    """
    from dataclasses import asdict

    from kdtool.deploy.backends import TRT_SUFFIXES

    if checkpoint.suffix.lower() in (".onnx", *TRT_SUFFIXES):
        _onnx_info(checkpoint, as_json)  # without torch: 0.7 s instead of 3
        return
    from safetensors import safe_open

    from kdtool import console
    from kdtool.checkpoint import read_meta
    from kdtool.imageprep import Fit

    meta = read_meta(checkpoint)
    with safe_open(str(checkpoint), framework="pt") as f:
        keys = list(f.keys())
        n_values = sum(_numel(f.get_slice(k).get_shape()) for k in keys)
    result = {"file": str(checkpoint), "bytes": checkpoint.stat().st_size,
              "sha256": file_sha256(checkpoint), "tensors": len(keys), "values": n_values,
              **asdict(meta)}

    def render(r):
        prov = r["provenance"]
        fit = Fit.of(meta)
        rows = [["architecture", r["arch"] + (f" {r['arch_args']}" if r["arch_args"] else "")],
                ["classes", _classes(r["num_classes"], r["class_names"])],
                ["input", f"{r['in_chans']}x{r['input_size'][0]}x{r['input_size'][1]} "
                          f"({fit.explain(r['input_size'])}; {fit.interpolation})"],
                ["mean / std", f"{_fmt_list(r['mean'])} / {_fmt_list(r['std'])}"],
                ["tensors", f"{r['tensors']} ({r['values']:,} values)"],
                ["file", f"{r['bytes']:,} bytes, sha256 {r['sha256'][:16]}..."]]
        rows += [[k, _machine_line(v) if k == "machine" else str(v)]
                 for k, v in prov.items() if k != "metrics" and v is not None]
        rows += [[f"metric {k}", f"{v:.4g}" if isinstance(v, float) else str(v)]
                 for k, v in prov.get("metrics", {}).items()]
        rows += [[f"stage {k}", _stage_line(k, v, checkpoint)] for k, v in r["stages"].items()]
        console.print_kv(str(r["file"]), rows)

    console.emit(result, as_json, render)


def _machine_line(m: dict) -> str:
    """'cpu, fp32, 2 torch threads; Intel(R) Xeon(R), 2 usable CPUs; Linux-...'."""
    threads = m.get("torch_threads")
    run = [m.get("device"), m.get("precision"),
           f"{threads} torch thread{'s' * (threads != 1)}" if threads else None]
    host = [m.get("cpu"), f"{m['usable_cpus']} usable CPUs" if "usable_cpus" in m else None]
    parts = [", ".join(p for p in run if p), ", ".join(p for p in host if p), m.get("platform")]
    return "; ".join(p for p in parts if p)


def _train_summary(v: dict) -> str:
    c = v.get("config") or {}
    kept = " (the best by validation)" if c.get("val") else ""
    return f"{c.get('arch')} on {c.get('data')}: weights of epoch {v.get('epoch')} of " \
           f"{v.get('epochs')}{kept}"


def _distill_summary(v: dict) -> str:
    c, teacher = v.get("config") or {}, v.get("teacher") or {}
    bn = (v.get("teacher_bn") or {}).get("bn_mode", c.get("teacher_bn"))
    return (f"from {teacher.get('file')} ({teacher.get('arch')}) on "
            f"{(v.get('noise') or {}).get('kind', c.get('noise'))} noise, teacher BN {bn}: "
            f"epoch {v.get('epoch')} of {c.get('epochs')} x {c.get('iters_per_epoch')} batches "
            f"of {c.get('batch_size')}")


# A run's stage in one sentence; other stages list their plain fields.
STAGE_SUMMARIES = {"train": _train_summary, "distill": _distill_summary}


def _resumes(segments: list) -> str:
    """'resumed at epoch 3 (cpu, bf16, 2 threads)': each part of a run after its start."""
    def how(p: dict) -> str:
        return ", ".join(str(v) for v in (p.get("device"), p.get("precision"),
                                          f"{p['torch_threads']} threads"
                                          if "torch_threads" in p else None) if v)

    return "resumed " + ", ".join(f"at epoch {p.get('from_epoch')} ({how(p)})"
                                  for p in segments[1:] if isinstance(p, dict))


def _stage_line(name: str, record: dict, path: Path) -> str:
    fields = ", ".join(f"{a}={b}" for a, b in record.items()
                       if not isinstance(b, list | dict) and a not in ("epoch", "epochs"))
    parts = [STAGE_SUMMARIES[name](record)] if name in STAGE_SUMMARIES else []
    parts += [fields] if fields else []
    parts += [_resumes(record.get("segments"))] if len(record.get("segments") or []) > 1 else []
    if record.get("history"):
        parts.append(f"learning curves: kdtool analyze curves {path}")
    return "; ".join(parts)


def _onnx_info(path: Path, as_json: bool) -> None:
    from dataclasses import asdict

    from kdtool import console
    from kdtool.deploy.backends import engine_info
    from kdtool.export.metadata import read_info
    from kdtool.imageprep import Fit

    engine = path.suffix.lower() != ".onnx"
    require_file(path, "TensorRT engine" if engine else "ONNX model")
    info = engine_info(path) if engine else read_info(path)
    uncalibrated = info.noise_bn_warning(str(path))
    if uncalibrated:
        console.warn(uncalibrated)
    result = {"file": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
              "format": "tensorrt" if engine else "onnx", **asdict(info)}

    def render(r):
        h, w = r["input_size"]
        batch = f"fixed {r['batch']}" if r["batch"] else "dynamic" + (
            f" (profiled up to {r['max_batch']})" if r["max_batch"] else "")
        kind = "TensorRT engine built from ONNX" if engine else "ONNX"
        rows = [["format", f"{kind}, {r['precision']}, opset {r['opset']}, batch {batch}"],
                ["architecture", r["arch"] + (" (BN folded)" if r["folded"] else "")],
                ["classes", _classes(r["num_classes"], r["class_names"])],
                ["input", f"'{r['input_name']}' {r['layout']} {r['in_chans']}x{h}x{w} "
                          f"{r['input_dtype']} (other sizes: {Fit.of(info).describe()})"],
                ["output", f"'{r['output_name']}'"],
                ["mean / std", f"{_fmt_list(r['mean'])} / {_fmt_list(r['std'])}"],
                ["exported from", f"{r['source']} (sha256 {r['source_sha256'][:16]}...)"],
                *([["exported with", ", ".join(f"{k} {v}" for k, v in
                                               r["exported_with"].items())]]
                  if r["exported_with"] else []),
                *([["BN running stats", "noise statistics: never calibrated"]]
                  if r["bn_running_stats"] == "noise" else []),
                ["file", f"{r['bytes']:,} bytes, sha256 {r['sha256'][:16]}..."]]
        rows += [[f"int8 {k}", str(v)] for k, v in r["quantization"].items()
                 if not isinstance(v, list | dict)]
        console.print_kv(str(r["file"]), rows)

    console.emit(result, as_json, render)


def _classes(n: int, names: list[str]) -> str:
    if not names:
        return f"{n} (no names recorded: labels print as indices)"
    return f"{n}: " + ", ".join(names[:20]) + (" ..." if n > 20 else "")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fmt_list(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@app.command("convert")
def convert_cmd(
    state_dict: Annotated[Path, typer.Argument(help="A plain state_dict: .pt, .pth, .bin, "
                                               "Lightning's .ckpt, or .safetensors without "
                                               "kdtool metadata.")],
    arch: Arch = None,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    resize: Resize = None,
    interpolation: Interpolation = None,
    class_names: Annotated[str | None, typer.Option(
        "--class-names", help="Class names in label order: comma-separated, a .txt file (one "
        "per line), a .json list, or 'imagenet' (torchvision's ImageNet names).")] = None,
    out: Annotated[Path, typer.Option("--out", help="The kdtool checkpoint to write.")] = Path(
        "model.safetensors"),
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Turn a plain PyTorch state_dict into a self-describing kdtool checkpoint.

    The file is read with torch.load(weights_only=True): it is never unpickled.

    The number of classes and input channels are read from the tensors' shapes unless
    --num-classes and --in-chans say otherwise.

    Example: [bold]kdtool convert resnet18.pth --arch tv:resnet18 --class-names imagenet
    --out teacher.safetensors[/bold]
    """
    from kdtool import console
    from kdtool.checkpoint import (
        CHECKPOINT_SUFFIX,
        IMPORT_NOTES,
        has_kdtool_meta,
        load_checkpoint,
        save_checkpoint,
    )
    from kdtool.errors import KdtoolError
    from kdtool.imageprep import Fit, describe_resize
    from kdtool.io import check_output
    from kdtool.runinfo import provenance

    if state_dict.suffix.lower() == CHECKPOINT_SUFFIX and has_kdtool_meta(state_dict):
        raise KdtoolError(f"'{state_dict}' is already a kdtool checkpoint: nothing to convert",
                          f"use it as it is; 'kdtool info {state_dict}' shows what it records")
    if arch is None:
        raise KdtoolError(f"converting '{state_dict}' needs its architecture",
                          "pass --arch (see 'kdtool models')")
    # The flags first (a --mean without --std is the mistake to fix, not an existing --out),
    # then the output, before any work.
    spec = foreign_spec(state_dict, arch, num_classes, in_chans, mean, std, image_size)
    check_output(out, force, "checkpoint", (CHECKPOINT_SUFFIX,),
                 sources={"the state_dict to convert": state_dict})
    # None: the architecture's default (torchvision's: its weights' evaluation transform)
    spec.resize, spec.interpolation = resize, interpolation
    model, meta = load_checkpoint(state_dict, foreign=spec)
    if class_names is not None:  # counted against the classes the file's shapes say
        meta.class_names = parse_class_names(class_names, meta.num_classes)
    shapes_read = meta.provenance.get("shapes_read", {})
    meta.provenance = provenance(imported_from=str(state_dict),
                                 imported_sha256=file_sha256(state_dict),
                                 **{k: meta.provenance[k] for k in IMPORT_NOTES
                                    if k in meta.provenance})
    path = save_checkpoint(out, model, meta, force=force)
    h, w = meta.input_size
    fit = Fit.of(meta)
    def read(dim: str, what: str = "") -> str:  # where a value the flags left unsaid came from
        return f" ({what}from '{shapes_read[dim]}')" if dim in shapes_read else ""

    console.emit({"out": str(path), "arch": meta.arch, "num_classes": meta.num_classes,
                  "input": [meta.in_chans, h, w], "mean": meta.mean, "std": meta.std,
                  "shapes_read": shapes_read,
                  "resize": describe_resize(fit.crop_fraction),
                  "interpolation": fit.interpolation},
                 as_json, lambda r: console.info(
                     f"wrote {r['out']} ({r['arch']}, {r['num_classes']} classes"
                     f"{read('num_classes')}, input {meta.in_chans}x{h}x{w}"
                     f"{read('in_chans', 'channels ')}, mean {_fmt_list(meta.mean)}, std "
                     f"{_fmt_list(meta.std)}; {fit.explain((h, w))}): check these are what "
                     "the model was trained on"))
