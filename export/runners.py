"""Inference runners: one small interface over PyTorch, ONNX Runtime and TensorRT.

A runner loads a model once and then answers batches (Polygraphy's idea). The
contract, which ``kdtool export`` (parity), ``kdtool bench`` and ``kdtool serve`` use:

``runner.infer(x) -> np.ndarray``
    ``x``: a float32 NCHW batch already normalised with the model's mean/std (see
    ``OnnxInfo``); returns float32 logits of shape (batch, num_classes), a new array.
    Runners of reduced-precision graphs still take and return float32.
``runner.describe() -> dict``
    JSON-able facts: backend, model path, device or providers, input/output names,
    precision, fixed batch.
``runner.backend``, ``runner.input_name``, ``runner.output_name``, ``runner.fixed_batch``
    (the only batch size a static graph takes; None when the batch is dynamic),
    ``runner.batch_range`` ((min, max) sizes accepted; max None = unbounded).
``runner.close()``; runners are context managers.

A runner never falls back silently: an ONNX Runtime provider that was asked for but
is not active, or a missing TensorRT/CUDA, raises ``KdtoolError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdtool.errors import KdtoolError
from kdtool.export.formats import GPU_EXTRA_HINT
from kdtool.io import require_file


class Runner:
    """Base class: see the module docstring for the contract."""

    backend = ""
    input_name = "input"
    output_name = "logits"
    fixed_batch: int | None = None
    batch_range: tuple[int, int | None] = (1, None)

    def infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "input": self.input_name,
            "output": self.output_name,
            "fixed_batch": self.fixed_batch,
        }

    def check_batch(self, n: int) -> None:
        lo, hi = self.batch_range
        if n < lo or (hi is not None and n > hi):
            allowed = f"exactly {lo}" if lo == hi else f"{lo}..{hi if hi is not None else ''}"
            raise KdtoolError(
                f"{self.backend} model takes batches of {allowed}, got {n}",
                "split the batch, or export with a larger --batch",
            )

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TorchRunner(Runner):
    """PyTorch eager: the reference every export is compared against.

    ``channels_last``: run the model and its inputs in NHWC, PyTorch's faster layout for
    convolutions on CUDA and on x86 CPUs (1.11-1.38x for CIFAR ResNets and a MobileNetV2
    at batch 64 on 2 cores, level at batch 1: bench/cpu_step_layout.py). It converts the
    model in place, so only a runner that owns its model (``from_checkpoint``, the
    benchmark's) turns it on.
    """

    backend = "torch"

    def __init__(self, model, device: str = "cpu", precision: str = "fp32",
                 channels_last: bool = False):
        import torch

        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else None
        self.model = model.eval().to(self.device, memory_format=self.memory_format
                                     or torch.preserve_format)
        self.precision = precision

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> TorchRunner:
        from kdtool.checkpoint import load_checkpoint

        model, _ = load_checkpoint(path)
        runner = cls(model, device, channels_last=True)
        runner.path = str(path)
        return runner

    def infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            if self.memory_format is not None and t.ndim == 4:
                t = t.contiguous(memory_format=self.memory_format)
            return self.model(t).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            **super().describe(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "precision": self.precision,
            "memory_format": "channels_last" if self.memory_format is not None else "contiguous",
        }


class OrtRunner(Runner):
    """ONNX Runtime on the providers asked for (``cpu``, ``cuda``, ``tensorrt`` or full names).

    Opened with ``kdtool.export.ort_session.open_session``: on the CPU provider a symmetric
    INT8 graph runs with uint8 activations (same values) unless ``uint8_on_cpu=False``.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        providers: tuple[str, ...] | list[str] = ("cpu",),
        threads: int | None = None,
        uint8_on_cpu: bool = True,
        memory_arena: bool = True,
    ):
        from kdtool.export.ort_session import open_session

        self.path = Path(path)
        self._opened = open_session(
            self.path, providers, threads=threads, uint8_on_cpu=uint8_on_cpu,
            memory_arena=memory_arena,
        )
        self.session = self._opened.session
        self.providers = self._opened.providers
        self.threads = threads
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self._dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        batch = inp.shape[0] if inp.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        if self.fixed_batch is not None:
            self.batch_range = (self.fixed_batch, self.fixed_batch)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def info(self):
        """The file's kdtool metadata (``OnnxInfo``); KdtoolError when it has none."""
        from kdtool.export.metadata import info_from_props

        return info_from_props(self.metadata, str(self.path))

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.check_batch(len(x))
        x = np.ascontiguousarray(x, dtype=self._dtype)
        y = self.session.run([self.output_name], {self.input_name: x})[0]
        return y.astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "model": str(self.path), **self._opened.describe()}
        if self.threads:
            d["threads"] = self.threads
        if "kdtool" in self.metadata:
            d["precision"] = self.info.precision
        return d


class TrtRunner(Runner):
    """A serialized TensorRT engine (10.x or 11.x), run by tensor name on one CUDA device.

    Buffers are torch CUDA tensors; the output is sized from the execution context's shape
    after ``set_input_shape``, never from the engine's maximum shape.
    """

    backend = "tensorrt"

    def __init__(self, engine: str | Path | bytes, device: int | str = 0):
        import torch

        from kdtool.export.engine import import_tensorrt, torch_dtype

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise KdtoolError(
                "a TensorRT engine needs a CUDA GPU and none is visible", GPU_EXTRA_HINT
            )
        self.device = (
            torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        )
        self.path = None if isinstance(engine, bytes) else Path(engine)
        data = engine if isinstance(engine, bytes) else self._read(self.path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise KdtoolError(
                    f"TensorRT {trt.__version__} cannot load engine '{self.path}'",
                    "an engine runs only on the TensorRT version and GPU model that built it: "
                    "rebuild it with kdtool export --trt on this machine",
                )
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        if len(ins) != 1 or len(outs) != 1:
            raise KdtoolError(
                f"engine '{self.path}' has inputs {ins} and outputs {outs}",
                "kdtool runs classifiers with one input and one output",
            )
        self.input_name, self.output_name = ins[0], outs[0]
        self._in_dtype = torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        self._out_dtype = torch_dtype(self.engine.get_tensor_dtype(self.output_name))
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if shape[0] >= 0:
            self.fixed_batch = shape[0]
            self.batch_range = (shape[0], shape[0])
        else:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.batch_range = (lo[0], hi[0])
        self.trt_version = trt.__version__

    @staticmethod
    def _read(path: Path) -> bytes:
        return require_file(path, "TensorRT engine").read_bytes()

    def infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        self.check_batch(len(x))
        with torch.cuda.device(self.device):
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            xt = xt.to(self.device).to(self._in_dtype).contiguous()
            if not self.context.set_input_shape(self.input_name, tuple(xt.shape)):
                raise KdtoolError(f"TensorRT refused input shape {tuple(xt.shape)}")
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = torch.empty(out_shape, dtype=self._out_dtype, device=self.device)
            self.context.set_tensor_address(self.input_name, xt.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            # The input copy ran on the current stream; the engine runs on its own.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise KdtoolError("TensorRT failed to run the engine (see its log above)")
            self.stream.synchronize()
            return out.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            **super().describe(),
            "model": str(self.path) if self.path else None,
            "device": torch.cuda.get_device_name(self.device),
            "tensorrt": self.trt_version,
            "batch_range": list(self.batch_range),
        }

    def close(self) -> None:
        # Release in dependency order: context before engine before runtime.
        for name in ("context", "engine", "_runtime"):
            if hasattr(self, name):
                delattr(self, name)


def load_runner(
    path: str | Path, *, providers=("cpu",), threads: int | None = None, device: str = "cpu"
) -> Runner:
    """The runner for a file by its suffix: .onnx, .engine/.plan, or a kdtool checkpoint."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OrtRunner(path, providers=providers, threads=threads)
    if suffix in (".engine", ".plan", ".trt"):
        return TrtRunner(path, device=0 if device in ("cpu", "cuda") else device)
    if suffix == ".safetensors":
        return TorchRunner.from_checkpoint(path, device)
    raise KdtoolError(
        f"cannot tell how to run '{path}'",
        "give an .onnx file, a TensorRT .engine/.plan or a .safetensors checkpoint",
    )
