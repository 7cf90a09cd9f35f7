"""``kdtool bench``: latency, throughput, memory and accuracy of a model across backends.

For every model file x backend x batch size (a "cell"): warm-up calls, then timed
calls until both ``min_time`` seconds and ``min_iters`` calls are reached (Python's
garbage collector off while timing, as in ``timeit``).  One call goes from a host
numpy batch in the model's layout to host logits (transfers included), on random
N(0, 1) input in the normalised space.  Outliers: timings above Q3 + 3 x IQR
(Tukey's far-out fence) are dropped, at most 1% of them (at least one), so a
page fault or a scheduler hiccup does not move the mean while a slow tail that
is really there still shows in p99.  Throughput is batch / mean kept latency.

Accuracy (``data``) is measured once per model x backend, at the largest batch
size the backend takes, on the images normalised exactly as ``kdtool eval`` does.
A row's status: ok, unavailable (reason), failed (load or run error), export
failed, or accuracy failed (``min_accuracy``, or a drop beyond ``max_drop``
points from the reference: the first row with an accuracy, normally the PyTorch
checkpoint given first).
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdtool.deploy.backends import (
    BACKENDS,
    PROGRAMMING_ERRORS,
    BackendUnavailable,
    BenchModel,
    backend_problem,
    check_backend,
    first_line,
    load_model,
    make_runner,
)
from kdtool.deploy.memory import MemoryProbe
from kdtool.errors import KdtoolError

OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"
EXPORT_FAILED, ACCURACY_FAILED = "export failed", "accuracy failed"
MAX_ITERS = 200_000  # bounds the memory of the timings of a microsecond-scale model
CLIP_FENCE_IQR = 3.0
CLIP_MAX_SHARE = 0.01


@dataclass
class BenchConfig:
    models: list[str]
    backends: list[str] | None = None  # None: every backend that runs here and fits the file
    batches: tuple[int, ...] = (1,)
    warmup: int = 10
    min_time: float = 1.0
    min_iters: int = 10
    threads: int | None = None
    memory_arena: bool = True  # ONNX Runtime's CPU arena (its default)
    data: str | None = None
    limit: int | None = None
    formats: list[str] | None = None  # export each checkpoint on the fly (bench_export)
    export_dir: str | None = None
    calib_data: str | None = None
    force: bool = False  # overwrite exports in export_dir
    min_accuracy: float | None = None
    max_drop: float | None = None
    seed: int = 0

    def check(self) -> None:
        if not self.models:
            raise KdtoolError("no model given", "pass one or more model files")
        self.models = _unique_files(self.models)
        if not self.batches or any(b < 1 for b in self.batches):
            raise KdtoolError(
                f"batch sizes must be positive, not {list(self.batches)}", "e.g. --batch 1,8,64"
            )
        for name, value, low in (
            ("--warmup", self.warmup, 0),
            ("--min-iters", self.min_iters, 1),
            ("--threads", self.threads, 0),  # 0: the library's default, as predict and serve
            ("--limit", self.limit, 1),
        ):
            if value is not None and value < low:
                raise KdtoolError(f"{name} must be at least {low}, not {value}")
        if self.limit is not None and self.data is None:
            raise KdtoolError(f"--limit {self.limit} picks images of --data, and there is none",
                              "add --data DIR to measure accuracy too, or drop --limit")
        if self.min_time <= 0:
            raise KdtoolError(f"--min-time must be positive, not {self.min_time}")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 100:
            raise KdtoolError(f"--min-accuracy is a top-1 percentage, 0 to 100, not "
                              f"{self.min_accuracy:g}", "e.g. --min-accuracy 90")
        if self.max_drop is not None and self.max_drop < 0:
            raise KdtoolError(f"--max-drop must be >= 0 points, not {self.max_drop}")
        if (self.min_accuracy is not None or self.max_drop is not None) and self.data is None:
            raise KdtoolError(
                "--min-accuracy and --max-drop check accuracy and need --data",
                "e.g. --data val/ (labelled images)",
            )
        if self.backends is not None:
            # a name given twice would be measured twice (as --batch, repeats are dropped)
            self.backends = list(dict.fromkeys(check_backend(b) for b in self.backends))
        if self.formats is not None:
            from kdtool.deploy.bench_export import check_formats, needs_calib

            self.formats = list(dict.fromkeys(check_formats(self.formats)))
            int8 = [f for f in self.formats if needs_calib([f])]
            if int8 and not self.calib_data:
                raise KdtoolError(
                    f"--formats {','.join(int8)} needs calibration images for its INT8 "
                    "activation ranges", "add --calib-data DIR (a few hundred representative "
                    f"images; labels not needed), or drop {','.join(int8)}")
            if self.calib_data and not needs_calib(self.formats):
                raise KdtoolError(
                    f"--calib-data calibrates INT8 exports, and --formats "
                    f"{','.join(self.formats)} has none", "add onnx-int8 to --formats, or "
                    "drop --calib-data")
            if self.export_dir and Path(self.export_dir).exists() and \
                    not Path(self.export_dir).is_dir():
                raise KdtoolError(f"--export-dir '{self.export_dir}' is a file",
                                  "pass a folder to keep the exports in")
        elif self.export_dir or self.calib_data:
            raise KdtoolError(
                "--export-dir and --calib-data go with --formats",
                "e.g. --formats torch,onnx,onnx-int8 --calib-data train/",
            )


def clip_outliers(times: np.ndarray) -> tuple[np.ndarray, int]:
    """``times`` without its high outliers (see the module docstring), and how many went."""
    n = len(times)
    if n < 8:  # too few for quartiles to mean anything
        return times, 0
    q1, q3 = np.percentile(times, [25, 75])
    fence = q3 + CLIP_FENCE_IQR * (q3 - q1)
    worst = np.argsort(times)[::-1][: max(1, int(n * CLIP_MAX_SHARE))]
    drop = worst[times[worst] > fence]
    keep = np.ones(n, dtype=bool)
    keep[drop] = False
    return times[keep], len(drop)


def cell_stats(times_s: np.ndarray, batch: int) -> dict[str, Any]:
    kept, clipped = clip_outliers(np.asarray(times_s, dtype=np.float64))
    ms = kept * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return {
        "latency_ms": {
            "p50": float(p50),
            "p90": float(p90),
            "p99": float(p99),
            "mean": mean,
            "min": float(ms.min()),
            "max": float(ms.max()),
            "std": float(ms.std()),
        },
        "throughput": batch * 1e3 / mean,
        "iters": len(times_s),
        "clipped": clipped,
    }


def time_calls(fn, x, warmup: int, min_time: float, min_iters: int
               ) -> tuple[np.ndarray, int]:
    """Seconds per call of ``fn(x)`` and the warm-up calls made before them (up to
    ``warmup``, stopped after min_time / 2)."""
    warm_end = time.perf_counter() + min_time / 2
    warmed = 0
    while warmed < warmup:
        fn(x)
        warmed += 1
        if time.perf_counter() > warm_end:
            break
    times = []
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter_ns()
            fn(x)
            times.append(time.perf_counter_ns() - t0)
            n = len(times)
            if n >= MAX_ITERS or (n >= min_iters and time.perf_counter() - start >= min_time):
                break
    finally:
        if gc_was_on:
            gc.enable()
    return np.asarray(times, dtype=np.float64) * 1e-9, warmed


def plan_pairs(models: list, backends: list[str] | None):
    """(entry, backend, problem) in model order: problem says why it cannot run here.

    ``models`` holds BenchModels and failed exports (``Exported`` with an error), whose
    rows say so under the backend the format would have run on.
    """
    pairs = []
    kinds = set()
    for model in models:
        if not isinstance(model, BenchModel):  # an export that failed or was not made
            kinds.add(BACKENDS[model.backend][0])
            pairs.append((model, model.backend, model.error or model.unavailable))
            continue
        kinds.add(model.kind)
        fitting = [b for b, (kind, _) in BACKENDS.items() if kind == model.kind]
        if backends is None:
            # auto: the fitting backends that run here; when none does, rows that say why
            problems = {b: backend_problem(b) for b in fitting}
            runnable = [b for b in fitting if problems[b] is None]
            pairs += [(model, b, problems[b]) for b in runnable or fitting]
        else:
            pairs += [(model, b, backend_problem(b)) for b in backends if b in fitting]
    for b in backends or []:
        kind = BACKENDS[b][0]
        if kind not in kinds:
            what = {
                "checkpoint": "kdtool checkpoints (.safetensors)",
                "onnx": ".onnx files",
                "trt": "TensorRT .plan engines",
            }[kind]
            raise KdtoolError(
                f"backend '{b}' runs {what} and none was given",
                "add one to the models (or export one with --formats) or leave "
                f"'{b}' out of --backends",
            )
    return pairs


class Bench:
    """One ``kdtool bench`` run: ``Bench(cfg).run()`` -> the result dictionary."""

    def __init__(self, cfg: BenchConfig):
        cfg.check()
        self.cfg = cfg
        self.mem = MemoryProbe()
        self._data: dict[tuple, Any] = {}
        self._started: set[str] = set()  # backends whose runtime has been loaded

    def run(self) -> dict[str, Any]:
        from kdtool import console
        from kdtool.runinfo import provenance

        cfg = self.cfg
        with contextlib.ExitStack() as stack:
            models, exports = self._models(stack)
            pairs = plan_pairs(models, cfg.backends)
            if cfg.data is not None:  # before the progress bar: decoding shows its own
                for model, _, problem in pairs:
                    if isinstance(model, BenchModel) and not problem:
                        self._dataset(model)
            rows: list[dict] = []
            total = len(pairs) * len(cfg.batches)
            with console.progress_task("bench", total, unit="cell") as adv:
                for model, backend, problem in pairs:
                    rows += self._pair(model, backend, problem, adv)
        for row, label in zip(rows, distinct_labels([Path(r["path"]) for r in rows]),
                              strict=True):
            row["model"] = label  # files of one name in two folders: the rows tell them apart
        reference = check_accuracy(rows, cfg.min_accuracy, cfg.max_drop)
        prov = provenance(seed=cfg.seed)
        settings = {k: v for k, v in asdict(cfg).items() if k != "models"}
        settings["batches"] = list(cfg.batches)
        settings["clip"] = (
            f"drop timings above Q3 + {CLIP_FENCE_IQR:g} x IQR, at most "
            f"{CLIP_MAX_SHARE:.0%} of a cell (at least 1)"
        )
        return {
            "command": prov["command"],
            "created": prov["created"],
            "kdtool_version": prov["kdtool_version"],
            "machine": machine_info(),
            "settings": settings,
            "models": [m.summary() for m in models if isinstance(m, BenchModel)],
            **({"exports": [e.summary() for e in exports]} if cfg.formats else {}),
            "reference": reference,
            "rows": rows,
            "ok": any(r["status"] == OK for r in rows)
            and not any(r["status"] in (FAILED, EXPORT_FAILED, ACCURACY_FAILED) for r in rows),
        }

    def _models(self, stack: contextlib.ExitStack) -> tuple[list, list]:
        """The models to run, in order: with --formats each checkpoint becomes its exports
        (written to --export-dir, else to a temporary folder removed after the run)."""
        from kdtool.deploy.bench_export import export_all

        cfg = self.cfg
        given = [load_model(p) for p in cfg.models]  # every file checked before any export
        if not cfg.formats:
            return given, []
        if not any(m.kind == "checkpoint" for m in given):
            raise KdtoolError(
                f"--formats {','.join(cfg.formats)} exports kdtool checkpoints, and none of "
                "the models is one", "pass the .safetensors checkpoint, or drop --formats to "
                "bench the files as they are")
        if cfg.export_dir:
            out_dir = Path(cfg.export_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdtool-")))
        models, exports = [], []
        # Checkpoints of one name from several folders export into subfolders named after
        # theirs, or the second export would replace the first (c1/s.safetensors -> c1/s.onnx).
        labels = distinct_labels([m.path for m in given])
        for model, label in zip(given, labels, strict=True):
            if model.kind != "checkpoint":
                models.append(model)
                continue
            folder = out_dir / Path(label).parent
            folder.mkdir(parents=True, exist_ok=True)
            for ex in export_all(
                model.path, cfg.formats, folder, cfg.calib_data, cfg.force, cfg.threads
            ):
                exports.append(ex)
                models.append(ex if ex.error or ex.unavailable else load_model(ex.path))
        return models, exports

    def _pair(self, model, backend: str, problem: str | None, advance) -> list[dict]:
        cfg = self.cfg
        if not isinstance(model, BenchModel):  # an export failed or not made: rows say why
            status = UNAVAILABLE if model.unavailable else EXPORT_FAILED
            advance(len(cfg.batches), info=f"{model.path.name}: {status}")
            base = {
                "model": model.path.name,
                "path": str(model.path),
                "backend": backend,
                "precision": None,
                "file_bytes": None,
                "providers": [],
                "device": None,
                "runtime": None,
                "accuracy": None,
            }
            return [empty_row(base, b, status, problem or "") for b in cfg.batches]
        base = {
            "model": model.label,
            "path": str(model.path),
            "backend": backend,
            "precision": model.precision,
            "file_bytes": model.file_bytes,
            "providers": [],
            "device": None,
            "runtime": None,
            "accuracy": None,
        }

        def rows_with(status: str, reason: str) -> list[dict]:
            advance(len(cfg.batches), info=f"{model.label} {backend}: {status}")
            return [empty_row(base, b, status, reason) for b in cfg.batches]

        if problem:
            return rows_with(UNAVAILABLE, problem)
        self._start_runtime(model, backend)
        self.mem.start_backend(backend)
        try:
            runner = make_runner(model, backend, cfg.threads, cfg.memory_arena)
        except BackendUnavailable as e:
            return rows_with(UNAVAILABLE, str(e))
        except PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # the runtime refused this model: this row failed
            return rows_with(FAILED, f"load failed: {first_line(e)}")
        try:
            desc = runner.describe()
            base.update(
                providers=desc.pop("providers"),
                device=desc.pop("device"),
                runtime=desc.pop("runtime"),
                details=desc,
            )
            # Smallest batch first, accuracy last: ONNX Runtime's arena keeps the memory of
            # its largest call, which a later, smaller cell would otherwise report as its own.
            cells = {b: self._cell(model, runner, base, b, advance)
                     for b in sorted(set(cfg.batches))}
            if cfg.data is not None:
                try:
                    accuracy = self._accuracy(model, runner, advance)
                except (KdtoolError, *PROGRAMMING_ERRORS):
                    raise
                except Exception as e:
                    return [empty_row(base, b, FAILED, f"accuracy run failed: {first_line(e)}")
                            for b in cfg.batches]
                for row in cells.values():
                    row["accuracy"] = accuracy
            return [cells[b] for b in cfg.batches]
        finally:
            runner.close()

    def _start_runtime(self, model: BenchModel, backend: str) -> None:
        """Load ``backend``'s runtime once per run with a throwaway session of the first
        model it runs, so that its one-time start (about 15 MB of RSS for ONNX Runtime's
        libraries) is not charged to whichever model happens to come first."""
        if backend in self._started:
            return
        self._started.add(backend)
        batch = model.fixed_batch or 1
        try:
            runner = make_runner(model, backend, self.cfg.threads, self.cfg.memory_arena)
        except PROGRAMMING_ERRORS:
            raise
        except Exception:  # the measured load reports it, as a row
            return
        try:
            if runner.batch_problem(batch) is None:
                runner.infer(model.prepare(np.zeros((batch, model.in_chans, *model.input_size),
                                                    dtype=np.float32)))
        except PROGRAMMING_ERRORS:
            raise
        except Exception:  # the measured cells report it, as rows
            pass
        finally:
            runner.close()

    def _cell(self, model, runner, base: dict, batch: int, advance) -> dict:
        cfg = self.cfg
        advance(0, info=f"{model.label} {base['backend']} batch {batch}")
        why = runner.batch_problem(batch)
        if why:
            advance(1)
            return empty_row(base, batch, UNAVAILABLE, why)
        rng = np.random.default_rng(cfg.seed)
        x = model.prepare(
            rng.standard_normal((batch, model.in_chans, *model.input_size), dtype=np.float32)
        )
        self.mem.start_cell()
        try:
            times, warmed = time_calls(runner.infer, x, cfg.warmup, cfg.min_time,
                                       cfg.min_iters)
        except PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # the backend failed at this batch size
            advance(1)
            return empty_row(base, batch, FAILED, f"run failed: {first_line(e)}")
        advance(1)
        return {
            **base,
            "batch": batch,
            "status": OK,
            "reason": "",
            **cell_stats(times, batch),
            "warmup_calls": warmed,
            **self.mem.cell_peak(),
        }

    def _accuracy(self, model: BenchModel, runner, advance) -> dict[str, Any]:
        from kdtool.deploy.accuracy import runner_accuracy

        ok = [b for b in self.cfg.batches if runner.batch_problem(b) is None]
        batch = max(ok) if ok else (model.fixed_batch or max(self.cfg.batches))
        return runner_accuracy(runner, model, self._dataset(model), batch, advance)

    def _dataset(self, model: BenchModel):
        from kdtool.deploy.accuracy import load_eval_data

        key = (model.in_chans, tuple(model.input_size), model.num_classes)
        if key not in self._data:
            self._data[key] = load_eval_data(self.cfg.data, model, self.cfg.limit, self.cfg.seed)
        return self._data[key]


def _unique_files(models: list[str]) -> list[str]:
    """``models`` without a file given twice (``a.onnx ./a.onnx``), which would be measured
    twice under one name; the first spelling stays."""
    from kdtool import console

    seen: dict[Path, str] = {}
    for m in models:
        key = Path(m).expanduser().resolve()
        if key in seen:
            also = "" if m == seen[key] else f" (as {seen[key]})"
            console.info(f"bench: {m} is given twice{also}: measured once")
        else:
            seen[key] = m
    return list(seen.values())


def empty_row(base: dict, batch: int, status: str, reason: str) -> dict:
    return {
        **base,
        "batch": batch,
        "status": status,
        "reason": reason,
        "latency_ms": None,
        "throughput": None,
        "iters": 0,
        "clipped": 0,
        "warmup_calls": 0,
        "peak_rss_mb": None,
        "gpu_mem_mb": None,
        "gpu_mem_kind": None,
    }


def distinct_labels(paths: list[Path]) -> list[str]:
    """Each path's name, or where two different files share it, the fewest trailing folders
    that tell them apart (``c1/s.onnx`` and ``c4/s.onnx``)."""
    full = [p.resolve() for p in paths]
    labels = []
    for p in full:
        rivals = {q for q in full if q.name == p.name and q != p}
        depth = 1
        while rivals and depth < len(p.parts):
            depth += 1
            rivals = {q for q in rivals if q.parts[-depth:] == p.parts[-depth:]}
        labels.append("/".join(p.parts[-depth:]).lstrip("/"))
    return labels


def check_accuracy(rows: list[dict], min_accuracy: float | None, max_drop: float | None):
    """Set each row's accuracy drop from the reference and fail rows below the bars."""
    ref = next((r for r in rows if r["accuracy"] is not None and r["status"] == OK), None)
    if ref is None:
        return None
    ref_top1 = ref["accuracy"]["top1"]
    for r in rows:
        acc = r["accuracy"]
        if acc is None:
            continue
        acc["drop"] = ref_top1 - acc["top1"]
        if r["status"] != OK:
            continue
        if min_accuracy is not None and acc["top1"] < min_accuracy:
            r["status"] = ACCURACY_FAILED
            r["reason"] = f"top-1 {acc['top1']:.2f}% < --min-accuracy {min_accuracy:g}%"
        elif max_drop is not None and acc["drop"] > max_drop:
            r["status"] = ACCURACY_FAILED
            r["reason"] = (
                f"top-1 {acc['top1']:.2f}% is {acc['drop']:.2f} points below the "
                f"reference ({ref_top1:.2f}%) > --max-drop {max_drop:g}"
            )
    return {"model": ref["model"], "backend": ref["backend"], "top1": ref_top1}


def machine_info() -> dict[str, Any]:
    import os
    import platform

    from kdtool.runinfo import cpu_name, package_versions, usable_cores

    cpu, usable = cpu_name(), usable_cores()
    versions = package_versions("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt")
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _gpu_name() -> str | None:
    """The first GPU's name: from torch when a row already loaded it, else from nvidia-smi,
    so that a bench of ONNX files on the CPU does not import torch (2 s) for one field."""
    import shutil
    import subprocess
    import sys

    if "torch" in sys.modules:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None
