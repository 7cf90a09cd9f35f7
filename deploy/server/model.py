"""The served model: an ONNX Runtime session configured from the file's kdtool metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdtool.deploy.server.protocol import ORT_TO_V2, V2_TO_NP
from kdtool.errors import KdtoolError
from kdtool.export.metadata import OnnxInfo, check_graph, info_from_props
from kdtool.imageprep import Fit, describe_resize

URL_SAFE = re.compile(r"[A-Za-z0-9_.-]+")  # a model name in /v2/models/NAME/...

@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the v2 protocol describes it: -1 marks the (dynamic) batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(V2_TO_NP[self.datatype])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class OnnxModel:
    """One ONNX Runtime session; ``run(x)`` takes a batch in the model's own layout and dtype.

    ``fixed_batch`` is the graph's static batch dimension (None when dynamic): callers pad
    a smaller batch up to it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        provider: str = "cpu",
        threads: int = 0,
        memory_arena: bool = True,
        warmup: bool = True,
    ):
        from kdtool.export.ort_session import ORT_TARGETS, open_session, ort_target
        from kdtool.export.triton import model_name

        self.path = Path(path)
        # The file's stem made URL-safe ('my model.onnx' -> my_model), as Triton's folders;
        # a --name is the user's own choice: refused, not changed, when it does not fit.
        self.name = model_name(self.path.stem) if name is None else name
        if not URL_SAFE.fullmatch(self.name):
            raise KdtoolError(
                f"model name '{self.name}' cannot be part of a URL path",
                "pass --name with letters, digits, '-', '_' or '.'",
            )
        self.opened = open_session(
            self.path,
            ORT_TARGETS[ort_target(provider)],
            threads=max(0, threads),  # 0: ORT's default, one per core
            inter_op_threads=1,  # a plain CNN has no parallel branches worth a pool
            # Idle ORT threads spin by default, taking cores from the event loop that parses
            # the next requests; with batching, an ORT call is long enough that waking is free.
            spinning=False,
            memory_arena=memory_arena,
        )
        self.session = self.opened.session
        self.providers = self.opened.providers
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info: OnnxInfo = info_from_props(meta, str(self.path))
        uncalibrated = self.info.noise_bn_warning(str(self.path))
        if uncalibrated:
            from kdtool import console

            console.warn(uncalibrated)
        self.input, self.output, self.fixed_batch = self._specs()
        if warmup:  # the first call allocates and plans: keep it out of the first request
            self.run(np.zeros((self.fixed_batch or 1, *self.input.shape[1:]), self.input.dtype))

    def _specs(self) -> tuple[TensorSpec, TensorSpec, int | None]:
        info, path = self.info, self.path
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        check_graph(info, {n: list(i.shape) for n, i in inputs.items()},
                    {n: list(o.shape) for n, o in outputs.items()}, str(path))
        inp, out = inputs[info.input_name], outputs[info.output_name]
        for t in (inp, out):
            if t.type not in ORT_TO_V2:
                raise KdtoolError(
                    f"'{path}': tensor '{t.name}' has type {t.type}, which "
                    "kdtool serve does not serve",
                    "export a float model",
                )
        expected = info.input_shape(1)[1:]
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        in_spec = TensorSpec(inp.name, ORT_TO_V2[inp.type], (-1, *expected))
        out_spec = TensorSpec(out.name, ORT_TO_V2[out.type], (-1, info.num_classes))
        return in_spec, out_spec, fixed

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch; called from the batcher's worker thread (ORT releases the GIL)."""
        return self.session.run([self.output.name], {self.input.name: x})[0]

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names or [str(i) for i in range(self.info.num_classes)]

    def describe(self) -> dict[str, Any]:
        """kdtool's own part of the model metadata: what a client needs to preprocess."""
        i = self.info
        fit = Fit.of(i)
        return {
            "arch": i.arch,
            "layout": i.layout,
            "input_size": i.input_size,
            "in_chans": i.in_chans,
            # how /classify brings another size to input_size (kdtool's --resize rule)
            "resize": describe_resize(fit.crop_fraction),
            "interpolation": fit.interpolation,
            "mean": i.mean,
            "std": i.std,
            "class_names": self.class_names,
            "precision": i.precision,
            "providers": self.providers,
            "memory_arena": self.opened.memory_arena,
            "fixed_batch": self.fixed_batch,
        }
