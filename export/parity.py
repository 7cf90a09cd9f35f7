"""Parity: does an exported model compute what the PyTorch model computes?

Two runners answer the same batches; we report the largest absolute difference of the
logits, the same relative to the logits' scale (max|diff| / max(1, max|reference|)), and
top-1 agreement. Tolerances depend on precision: FP32 must match to rounding; FP16 and
INT8 legitimately move logits, so they are judged by top-1 agreement (plus finite
outputs). ``kdtool export`` fails (exit 1, nothing written) when a check fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from kdtool.data import ImageData
from kdtool.export.batch import BatchProfile


@dataclass(frozen=True)
class Tolerance:
    max_rel_diff: float | None = None  # max|a-b| / max(1, max|reference|)
    min_agreement: float | None = None  # top-1 agreement, percent


# Against PyTorch (fp32 reference) in ONNX Runtime.
TOLERANCES = {
    "fp32": Tolerance(max_rel_diff=1e-3),
    "fp16": Tolerance(min_agreement=95.0),
    "int8": Tolerance(min_agreement=90.0),
}
# TensorRT against ONNX Runtime on the same graph: fp32 engines use TF32 tensor cores.
TRT_TOLERANCES = {
    "fp32": Tolerance(max_rel_diff=1e-2, min_agreement=95.0),
    "fp16": Tolerance(min_agreement=95.0),
    "int8": Tolerance(min_agreement=90.0),
}


@dataclass
class ParityReport:
    reference: str
    candidate: str
    batches: list[dict]
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float  # percent, over every image of every batch
    images: int
    tolerance: dict
    passed: bool
    problem: str = ""
    reference_classes: int = 0  # distinct top-1 classes of the reference on these images

    def to_dict(self) -> dict:
        return asdict(self)

    def agreement_caveat(self) -> str:
        """Why the top-1 agreement says little here ('' when it does not): a reference that
        answers one class for every image (an untrained or collapsed model) agrees with any
        candidate that does too, however far apart their logits are."""
        if self.images < 2 or self.reference_classes != 1:
            return ""
        return (f"{self.reference} answers one class for all {self.images} parity images, so "
                f"the top-1 agreement cannot tell a faithful {self.candidate} from a broken "
                f"one; judge it by its logits (relative difference {self.max_rel_diff:.3g})")

    def summary(self) -> str:
        sizes = "+".join(str(b["batch"]) for b in self.batches)
        return (
            f"{self.candidate} vs {self.reference} on {self.images} images (batches "
            f"{sizes}): max|diff| {self.max_abs_diff:.3g} (relative {self.max_rel_diff:.3g}), "
            f"top-1 agreement {self.top1_agreement:.1f}%"
        )


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 NCHW images -> float32 NCHW in the model's normalised input space."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x.float() / 255.0 - m) / s).numpy()


def parity_batches(
    data: ImageData | None,
    mean: list[float],
    std: list[float],
    sample_shape: tuple[int, int, int],
    profile: BatchProfile,
    large: int,
    seed: int = 0,
    drawn: bool = False,
) -> tuple[list[np.ndarray], str]:
    """The batches parity runs on: 1 image and ``large`` images (or the static batch).

    Real images (a seeded random choice, repeated if there are too few) when ``data`` is
    given, else seeded N(0, 1) noise in the normalised space. Returns (batches, source).
    ``drawn``: ``data`` is a draw with this ``seed`` already (``kdtool.data.Draw``), taken
    in its order: the same images as this seed's choice from all of the data.
    """
    sizes = [profile.max] if profile.static else sorted({profile.clamp(1), profile.clamp(large)})
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    if data is not None and len(data):
        idx = torch.arange(len(data)) if drawn else torch.randperm(len(data), generator=gen)
        idx = idx.repeat(-(-total // len(idx)))[:total]
        x = normalise(data.x[idx], mean, std)
        source = f"{data.source} ({len(data)} images{f', drawn with seed {seed}' * drawn})"
    else:
        x = torch.randn(total, *sample_shape, generator=gen).numpy()
        source = f"seeded N(0,1) noise (seed {seed})"
    out, start = [], 0
    for n in sizes:
        out.append(np.ascontiguousarray(x[start : start + n]))
        start += n
    return out, source


def compare(reference, candidate, batches: list[np.ndarray], tolerance: Tolerance) -> ParityReport:
    """Run both runners on ``batches`` and judge the candidate against ``tolerance``."""
    rows, refs, cands = [], [], []
    for x in batches:
        a, b = reference.infer(x), candidate.infer(x)
        refs.append(a)
        cands.append(b)
        rows.append({"batch": len(x), **_stats(a, b)})
    ref, cand = np.concatenate(refs), np.concatenate(cands)
    stats = _stats(ref, cand)
    problem = ""
    if not np.isfinite(cand).all():
        problem = "non-finite outputs"
    elif tolerance.max_rel_diff is not None and stats["max_rel_diff"] > tolerance.max_rel_diff:
        problem = f"relative difference {stats['max_rel_diff']:.3g} > {tolerance.max_rel_diff:g}"
    elif tolerance.min_agreement is not None and stats["top1_agreement"] < tolerance.min_agreement:
        problem = f"top-1 agreement {stats['top1_agreement']:.1f}% < {tolerance.min_agreement:g}%"
    return ParityReport(
        reference=_name(reference),
        candidate=_name(candidate),
        batches=rows,
        max_abs_diff=stats["max_abs_diff"],
        max_rel_diff=stats["max_rel_diff"],
        top1_agreement=stats["top1_agreement"],
        images=len(ref),
        tolerance={k: v for k, v in asdict(tolerance).items() if v is not None},
        passed=not problem,
        problem=problem,
        reference_classes=len(np.unique(ref.argmax(1))) if len(ref) else 0,
    )


def _stats(a: np.ndarray, b: np.ndarray) -> dict:
    diff = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
    scale = max(1.0, float(np.abs(a).max())) if a.size else 1.0
    agree = 100.0 * float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else 100.0
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "top1_agreement": agree}


def _name(runner) -> str:
    d = runner.describe()
    return f"{d['backend']} {d.get('precision', '')}".strip()
