"""The batch sizes an export serves: ``--batch MIN:OPT:MAX`` (dynamic) or ``--batch N`` (static).

One profile drives the ONNX batch dimension (symbolic, or fixed at N), the TensorRT
optimisation profile (min/opt/max input shapes) and Triton's ``max_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdtool.errors import KdtoolError

DEFAULT_BATCH = "1:32:256"
_HINT = "give --batch MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX (e.g. 1:32:256), or --batch N"


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int
    static: bool = False  # a fixed batch: the ONNX graph's batch dimension is the number N

    def __post_init__(self):
        if not all(isinstance(v, int) and v >= 1 for v in (self.min, self.opt, self.max)):
            raise KdtoolError(f"batch sizes must be positive integers, got {self.spec}", _HINT)
        if not self.min <= self.opt <= self.max:
            raise KdtoolError(f"batch profile {self.spec} needs MIN <= OPT <= MAX", _HINT)
        if self.static and not self.min == self.opt == self.max:
            raise KdtoolError(f"a static batch needs one size, got {self.spec}", _HINT)

    @property
    def spec(self) -> str:
        return str(self.min) if self.static else f"{self.min}:{self.opt}:{self.max}"

    def shapes(self, sample_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """TensorRT's min/opt/max input shapes for one sample of shape ``sample_shape``."""
        return {k: (getattr(self, k), *sample_shape) for k in ("min", "opt", "max")}

    def clamp(self, batch: int) -> int:
        """The batch size nearest ``batch`` that this profile accepts."""
        return min(max(batch, self.min), self.max)

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max, "static": self.static}


def parse_batch(text: str) -> BatchProfile:
    """``"N"`` -> static batch N; ``"MIN:OPT:MAX"`` -> dynamic batch with that profile."""
    parts = str(text).replace(" ", "").split(":")
    if len(parts) not in (1, 3):
        raise KdtoolError(f"bad --batch '{text}'", _HINT)
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise KdtoolError(f"bad --batch '{text}': not integers", _HINT) from None
    if len(values) == 1:
        return BatchProfile(values[0], values[0], values[0], static=True)
    return BatchProfile(*values)
