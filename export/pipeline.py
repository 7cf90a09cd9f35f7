"""``kdtool export``: checkpoint -> verified ONNX (FP32/FP16/INT8) -> TensorRT -> Triton.

Every artefact is built in a private folder beside the output and moved into place
only after its parity check passed, so a failed export leaves no file that looks
valid (a previous output kept with --force stays as it was). Order of work:

1. validate every option and output path (before any slow step);
2. export FP32 ONNX (checker, onnxslim, kdtool metadata) and check it against PyTorch;
3. FP16 conversion or INT8 QDQ quantisation, checked against PyTorch;
4. accuracy on --val (PyTorch vs the export) and file sizes; the ONNX is moved in place;
5. ``--trt``: a TensorRT engine checked against ONNX Runtime, with a JSON sidecar; without
   TensorRT or a GPU the command stops here with exit 1, the ONNX already written;
6. ``--triton-repo``: the model repository.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kdtool import console
from kdtool.errors import KdtoolError, check_choice
from kdtool.export.batch import DEFAULT_BATCH, BatchProfile, parse_batch
from kdtool.export.formats import FORMATS, check_precision, onnx_format
from kdtool.export.metadata import OnnxInfo, exporting_software, write_info
from kdtool.export.onnx_export import (
    DEFAULT_OPSET,
    EXPORTERS,
    INPUT_NAME,
    OUTPUT_NAME,
    check_opset,
    export_onnx,
)
from kdtool.export.parity import TOLERANCES, TRT_TOLERANCES, Tolerance, compare, normalise
from kdtool.export.parity import parity_batches as make_parity_batches
from kdtool.export.precision import ACTIVATION_MODES, CALIB_METHODS
from kdtool.io import atomic_path, check_output, file_sha256, remove_left_behind, temp_prefix

EXPORT_WORK = "kdtool-export"  # the folder an export works in, beside its ONNX


@dataclass
class ExportConfig:
    checkpoint: str
    onnx: str
    precision: str = "fp32"
    batch: str = DEFAULT_BATCH  # "MIN:OPT:MAX" (dynamic) or "N" (static)
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    slim: bool = True
    calib_data: str | None = None
    calib_images: int | None = None  # None: CALIB_IMAGES, or all there are when fewer
    calib_method: str = "minmax"
    int8_activations: str = "symmetric"
    val: str | None = None
    parity_batch: int = 64
    min_agreement: float | None = None  # overrides the precision's default (percent)
    trt: bool = False
    engine: str | None = None  # default: the ONNX path with .engine
    workspace: float = 4.0  # GiB
    timing_cache: str | None = None
    triton_repo: str | None = None
    triton_name: str | None = None
    force: bool = False
    seed: int = 0
    threads: int | None = None  # ONNX Runtime threads for the checks


CALIB_IMAGES = 512  # --calib-images by default


@dataclass
class _Outputs:
    onnx: Path
    engine: Path | None
    sidecar: Path | None
    triton: Path | None
    triton_name: str | None


def run_export(cfg: ExportConfig) -> dict:
    """Run ``kdtool export``; return its JSON result. Raises KdtoolError on any failure."""
    profile, outs = _validate(cfg)
    job = _Job(cfg, profile, outs)
    remove_left_behind(outs.onnx.parent, EXPORT_WORK)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(EXPORT_WORK), suffix=".tmp",
                                     dir=outs.onnx.parent) as work:
        work = Path(work)
        fp32_path, proto = job.fp32(work)  # 2. checked against PyTorch whatever the precision
        reduce = PRECISION_STEPS[onnx_format(cfg.precision).name]  # 3. reduced precision
        final_path, proto = (fp32_path, proto) if reduce is None else \
            reduce(job, proto, fp32_path, work)
        job.check(final_path)
        job.place(final_path, fp32_path)  # 4. accuracy, sizes, then the ONNX goes in place
        if cfg.trt:  # 5.
            job.result["tensorrt"] = _tensorrt(cfg, outs, job.batches, profile, job.info)
        if outs.triton is not None:  # 6.
            job.triton(proto)
    return job.result


class _Job:
    """One export's model, metadata, parity batches and result, shared by its steps."""

    def __init__(self, cfg: ExportConfig, profile: BatchProfile, outs: _Outputs):
        from kdtool.checkpoint import load_checkpoint
        from kdtool.data import Draw
        from kdtool.export.runners import TorchRunner

        self.cfg, self.profile, self.outs = cfg, profile, outs
        self.model, self.meta = load_checkpoint(cfg.checkpoint)
        meta = self.meta
        uncalibrated = meta.noise_bn_warning(cfg.checkpoint)
        if uncalibrated:  # an ONNX file runs on running statistics, whatever its consumer
            console.warn(uncalibrated, once=True)
        # The --calib-images images alone: a folder or zip decodes just those (kdtool.data.Draw)
        self.calib = _load(cfg.calib_data, meta, "--calib-data",
                           draw=Draw(cfg.calib_images or CALIB_IMAGES, cfg.seed)
                           ) if cfg.calib_data else None
        self.val = _load(cfg.val, meta, "--val", labelled=True) if cfg.val else None
        folded = bool((meta.stages.get("calibrate") or {}).get("folded"))
        self.info = OnnxInfo.from_meta(
            meta,
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            precision=cfg.precision,
            batch=profile.max if profile.static else None,
            source=Path(cfg.checkpoint).name,
            source_sha256=file_sha256(cfg.checkpoint),
            folded=folded,
            opset=cfg.opset,
            max_batch=profile.max,
            exported_with=exporting_software(),
        )
        self.reference = TorchRunner(self.model)
        on_calib = self.val is None and self.calib is not None  # a draw of --calib-data
        self.batches, source = make_parity_batches(
            self.calib if on_calib else self.val, meta.mean, meta.std,
            (meta.in_chans, *meta.input_size), profile, cfg.parity_batch, cfg.seed,
            drawn=on_calib,
        )
        self.checks: dict = {}
        self.result: dict = {
            "checkpoint": cfg.checkpoint,
            "arch": meta.arch,
            "folded": folded,
            "precision": cfg.precision,
            "batch": profile.to_dict(),
            "parity_inputs": source,
            **({"warning": uncalibrated} if uncalibrated else {}),
        }

    def fp32(self, work: Path) -> tuple[Path, object]:
        """The FP32 ONNX in ``work``, checked against PyTorch; its path and proto."""
        from kdtool.export.runners import OrtRunner

        cfg, meta = self.cfg, self.meta
        console.info(
            f"exporting {meta.arch} to ONNX ({cfg.exporter} exporter, opset "
            f"{cfg.opset}, batch {self.profile.spec})"
        )
        proto, record = export_onnx(
            self.model,
            (meta.in_chans, *meta.input_size),
            batch=self.profile,
            opset=cfg.opset,
            exporter=cfg.exporter,
            slim=cfg.slim,
        )
        self.result["onnx_export"] = record
        path = work / "fp32.onnx"
        _save(proto, replace(self.info, precision="fp32"), path)
        with OrtRunner(path, threads=cfg.threads) as ort32:
            self.checks["fp32"] = _parity(self.reference, ort32, self.batches,
                                          TOLERANCES["fp32"], "FP32")
        return path, proto

    def check(self, path: Path) -> None:
        """The reduced-precision file against PyTorch (FP32 was checked as it was made)."""
        from kdtool.export.runners import OrtRunner

        cfg = self.cfg
        caveat = None
        if cfg.precision != "fp32":
            tol = _tolerance(TOLERANCES[cfg.precision], cfg.min_agreement)
            with OrtRunner(path, threads=cfg.threads) as ort_final:
                self.checks[cfg.precision] = _parity(
                    self.reference, ort_final, self.batches, tol, cfg.precision.upper(), cfg
                )
                caveat = ort_final.describe().get("int8_weights")
        if caveat:
            # The check stands (same values), but a speed measured here would mislead.
            self.result["cpu_caveat"] = (
                f"the check ran with {caveat}; the file keeps its int8 weights, which VNNI "
                "x86 and ARM CPUs run on their fast int8 kernels: time INT8 on the target"
            )
            console.info(f"note: {self.result['cpu_caveat']}")
        self.result["parity"] = self.checks

    def place(self, path: Path, fp32_path: Path) -> None:
        """Accuracy on --val and file sizes, then the checked file becomes --onnx."""
        if self.val is not None:
            self.result["val"] = _accuracy(self.reference, path, self.val, self.meta,
                                           self.profile, self.cfg)
        self.result["sizes"] = {
            "fp32_bytes": fp32_path.stat().st_size,
            "onnx_bytes": path.stat().st_size,
        }
        os.replace(path, self.outs.onnx)
        self.result["onnx"] = str(self.outs.onnx)
        console.info(f"wrote {self.outs.onnx} ({_mb(self.result['sizes']['onnx_bytes'])})")

    def triton(self, proto) -> None:
        from kdtool.export.triton import write_repo

        outs = self.outs
        model_file, kind = (outs.engine, "plan") if self.cfg.trt else (outs.onnx, "onnx")
        target = write_repo(
            outs.triton.parent,
            outs.triton.name,
            model_file,
            kind,
            proto.graph,
            self.profile,
            list(self.meta.class_names),
            self.cfg.force,
        )
        self.result["triton"] = {
            "repo": str(outs.triton.parent),
            "model": outs.triton.name,
            "path": str(target),
            "platform": kind,
        }
        console.info(f"wrote Triton model {target}")


# ----------------------------------------------------------------------------- validation


def _validate(cfg: ExportConfig) -> tuple[BatchProfile, _Outputs]:
    check_precision(cfg.precision)
    check_choice(cfg.exporter, EXPORTERS, "exporter")
    check_choice(cfg.calib_method, CALIB_METHODS, "calibration method")
    check_choice(cfg.int8_activations, ACTIVATION_MODES, "INT8 activation mode")
    check_opset(cfg.opset)
    profile = parse_batch(cfg.batch)
    from kdtool.checkpoint import read_meta

    read_meta(cfg.checkpoint)  # a clear error for a file that is not a kdtool model
    if onnx_format(cfg.precision).needs_calib and not cfg.calib_data:
        raise KdtoolError(
            f"--precision {cfg.precision} needs calibration images",
            "pass --calib-data with a few hundred representative images (a folder, zip or "
            "npz; labels not needed)",
        )
    if cfg.trt and cfg.precision == "int8" and cfg.int8_activations != "symmetric":
        raise KdtoolError(
            "TensorRT takes only symmetric INT8 activations",
            "drop --int8-activations asymmetric when building with --trt",
        )
    for name, value, low in (
        ("--parity-batch", cfg.parity_batch, 1),
        ("--calib-images", cfg.calib_images, 1),
    ):
        if value is not None and value < low:
            raise KdtoolError(f"{name} must be >= {low}, got {value}")
    if cfg.workspace <= 0:
        raise KdtoolError(f"--workspace must be a positive number of GiB, got {cfg.workspace}")
    if cfg.min_agreement is not None and not 0 <= cfg.min_agreement <= 100:
        raise KdtoolError(f"--min-agreement is a percentage, got {cfg.min_agreement}")
    onnx_path = check_output(cfg.onnx, cfg.force, "ONNX model", (".onnx",))
    engine = sidecar = None
    if cfg.trt:
        from kdtool.export.engine import sidecar_path

        engine = check_output(
            cfg.engine or onnx_path.with_suffix(".engine"), cfg.force, "TensorRT engine",
            (".engine", ".plan", ".trt")
        )
        sidecar = check_output(sidecar_path(engine), cfg.force, "engine sidecar")
    triton = name = None
    if cfg.triton_repo:
        from kdtool.export.triton import check_target, model_name

        name = model_name(cfg.triton_name or onnx_path.stem)
        triton = check_target(Path(cfg.triton_repo), name, cfg.force)
    return profile, _Outputs(onnx_path, engine, sidecar, triton, name)


def _load(spec: str, meta, option: str, labelled: bool = False, draw=None):
    from kdtool.data import check_fits, load_calibration, load_for_model

    # Images are fitted to the model's input; --val is converted to its channels too and
    # must have its classes; calibration images as calibrate takes them.
    if not labelled:
        data = load_calibration(spec, meta, option, "INT8 activation ranges", draw=draw)
    else:
        data = load_for_model(spec, meta)
        check_fits(
            data,
            num_classes=meta.num_classes,
            in_chans=meta.in_chans,
            what=f"the model ({meta.arch})",
        )
        data.require_labels(option)
    if not len(data):
        raise KdtoolError(f"{option} {spec} holds no images")
    return data


# ----------------------------------------------------------------------------- steps


def _save(proto, info: OnnxInfo, path: Path) -> None:
    import onnx

    write_info(proto, info)
    onnx.save(proto, str(path))


def _fp16(job: _Job, proto, fp32_path: Path, work: Path) -> tuple[Path, object]:
    from kdtool.export.precision import to_fp16

    console.info("converting to FP16")
    path = work / "fp16.onnx"
    proto16 = to_fp16(proto)
    _save(proto16, job.info, path)
    return path, proto16


def _int8(job: _Job, proto, fp32_path: Path, work: Path) -> tuple[Path, object]:
    """Static INT8 QDQ from --calib-images seeded images of --calib-data; the quantisation
    record goes into the file's metadata and the result."""
    import onnx

    from kdtool.export.precision import quantize_int8

    cfg, calib, meta, profile = job.cfg, job.calib, job.meta, job.profile
    n = len(calib)  # drawn as it was loaded: --calib-images seeded images, or all there are
    if cfg.calib_images and n < cfg.calib_images:  # asked for more than there are
        console.warn(f"--calib-data '{cfg.calib_data}' has {n} images, fewer than "
                     f"--calib-images {cfg.calib_images}: the INT8 ranges come from all {n}")
    x = normalise(calib.x, meta.mean, meta.std)
    batch = profile.max if profile.static else profile.clamp(32)
    path = work / "int8.onnx"
    with console.progress_task("INT8 calibration", -(-n // batch), unit="batch") as advance:
        record = quantize_int8(
            fp32_path,
            path,
            x,
            input_name=INPUT_NAME,
            batch_size=batch,
            method=cfg.calib_method,
            activations=cfg.int8_activations,
            static=profile.static,
            progress=advance,
        )
    record["calib_data"] = cfg.calib_data
    record["calib_seed"] = cfg.seed  # which --calib-images images of it were drawn
    proto8 = onnx.load(str(path))
    job.info = replace(job.info, quantization=record)
    _save(proto8, job.info, path)
    job.result["quantization"] = record
    return path, proto8


# What turns the checked FP32 ONNX into each ONNX row of the export table (None: nothing).
PRECISION_STEPS = {"onnx": None, "onnx-fp16": _fp16, "onnx-int8": _int8}


def _tolerance(base: Tolerance, min_agreement: float | None) -> Tolerance:
    return base if min_agreement is None else replace(base, min_agreement=min_agreement)


def _parity(reference, candidate, batches, tolerance: Tolerance, what: str,
            cfg: ExportConfig | None = None) -> dict:
    report = compare(reference, candidate, batches, tolerance)
    console.info(f"parity {what}: {report.summary()}")
    if report.passed and tolerance.max_rel_diff is None and report.agreement_caveat():
        console.warn(report.agreement_caveat())  # judged by agreement alone
    if not report.passed:
        raise KdtoolError(
            f"{what} export fails its parity check: {report.problem} ({report.summary()}); "
            "nothing was written",
            _parity_hint(what, report.top1_agreement, cfg),
        )
    return report.to_dict()


# Below this top-1 agreement a reduced-precision file is a different model, not a rounded
# one: the hint stops offering --min-agreement, which would only let it be written.
FAR_AGREEMENT = 80.0


def _parity_hint(what: str, agreement: float, cfg: ExportConfig | None) -> str:
    if what == "FP32" or cfg is None:
        return ("the exported graph computes something else than PyTorch: try --exporter "
                "torchscript (and --no-slim), and report the model if that passes")
    if what == "TensorRT":  # checked against the ONNX it was built from
        fixes = ("try --precision fp32: the engine's reduced precision is TensorRT's own "
                 "kernels and tactics" if cfg.precision != "fp32" else
                 "the ONNX is written and checked: run it on ONNX Runtime, and report the model "
                 "with the TensorRT version")
    elif what == "FP16":
        fixes = "keep --precision fp32 (FP16 overflows or rounds this model's activations)"
    else:
        others = [m for m in CALIB_METHODS if m != cfg.calib_method]
        asym = (", --int8-activations asymmetric (not for TensorRT)"
                if cfg.int8_activations == "symmetric" else "")
        fixes = (f"try --calib-method {' or '.join(others)}{asym}, more --calib-data images "
                 f"(--calib-images), or --precision fp16")
    if agreement < FAR_AGREEMENT:
        return (f"{fixes}; at {agreement:.0f}% agreement a lower --min-agreement would only "
                f"write a model that predicts differently")
    return f"{fixes}; or accept the change with --min-agreement {int(agreement)}"


def _accuracy(reference, path: Path, val, meta, profile: BatchProfile, cfg) -> dict:
    from kdtool.export.runners import OrtRunner

    with OrtRunner(path, threads=cfg.threads) as runner:
        steps = 2 * -(-len(val) // _chunk(profile))
        with console.progress_task("accuracy on --val", steps, unit="batch") as advance:
            torch_pred = _predict(reference, val, meta, profile, advance)
            onnx_pred = _predict(runner, val, meta, profile, advance)
    labels = val.y.numpy()
    torch_top1 = 100.0 * float((torch_pred == labels).mean())
    onnx_top1 = 100.0 * float((onnx_pred == labels).mean())
    return {
        "data": cfg.val,
        "images": len(val),
        "torch_fp32_top1": torch_top1,
        f"onnx_{cfg.precision}_top1": onnx_top1,
        "top1_change": onnx_top1 - torch_top1,
        "agreement": 100.0 * float((torch_pred == onnx_pred).mean()),
    }


def _chunk(profile: BatchProfile) -> int:
    return profile.max if profile.static else profile.clamp(256)


def predict_classes(
    runner, x_uint8: torch.Tensor, mean, std, batch: int, static: bool, advance=None
) -> np.ndarray:
    """Top-1 class of every image through ``runner``, in batches of ``batch``.

    A static graph takes exactly ``batch`` images: the last chunk is padded with zeros
    and the padding's answers dropped.
    """
    out = []
    for start in range(0, len(x_uint8), batch):
        x = normalise(x_uint8[start : start + batch], mean, std)
        n = len(x)
        if static and n < batch:
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        out.append(runner.infer(x)[:n].argmax(1))
        if advance is not None:
            advance(1)
    return np.concatenate(out)


def _predict(runner, val, meta, profile: BatchProfile, advance) -> np.ndarray:
    return predict_classes(
        runner, val.x, meta.mean, meta.std, _chunk(profile), profile.static, advance
    )


def _tensorrt(cfg, outs: _Outputs, batches, profile: BatchProfile, info: OnnxInfo) -> dict:
    from kdtool.export.engine import build_engine, sidecar_text
    from kdtool.export.formats import require
    from kdtool.export.runners import OrtRunner, TrtRunner

    # The ONNX is in place already: say so, and how to get what is missing.
    require(FORMATS["tensorrt"], wrote=str(outs.onnx), what="--trt")
    console.info(f"building a TensorRT {cfg.precision} engine (batch {profile.spec})")
    # Built beside the engine, not in the ONNX's work folder: a rename into place cannot
    # cross filesystems (--engine on another disk). Exits rename the engine, then its sidecar.
    with atomic_path(outs.sidecar) as sidecar_tmp, atomic_path(outs.engine) as engine_tmp:
        record = build_engine(
            outs.onnx,
            engine_tmp,
            precision=cfg.precision,
            profile=profile,
            workspace_gib=cfg.workspace,
            timing_cache=Path(cfg.timing_cache) if cfg.timing_cache else None,
            force=cfg.force,
            log=console.info,
        )
        tol = _tolerance(TRT_TOLERANCES[cfg.precision], cfg.min_agreement)
        with (
            OrtRunner(outs.onnx, threads=cfg.threads) as ort_runner,
            TrtRunner(engine_tmp) as trt_runner,
        ):
            report = compare(ort_runner, trt_runner, batches, tol)
        console.info(f"parity TensorRT: {report.summary()}")
        if not report.passed:
            raise KdtoolError(
                f"the TensorRT engine fails its parity check against ONNX Runtime: "
                f"{report.problem}; the engine was not written (the ONNX was)",
                _parity_hint("TensorRT", report.top1_agreement, cfg),
            )
        record.update(parity=report.to_dict(), kdtool=asdict(info))
        sidecar_tmp.write_text(sidecar_text(record))
    console.info(f"wrote {outs.engine} and {outs.sidecar}")
    return {"engine": str(outs.engine), "sidecar": str(outs.sidecar), **record}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
