"""kdtool's metadata inside an ONNX file: the contract between export, bench and serve.

``kdtool export`` writes one JSON object under the ``metadata_props`` key
``kdtool``; the server and the benchmark configure themselves from it (input
name and layout, size, normalisation, class names, precision), so an ONNX file
is self-describing like a kdtool checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdtool.errors import KdtoolError, message_line, require_fields
from kdtool.imageprep import record_problems
from kdtool.io import require_file

ONNX_META_KEY = "kdtool"
ONNX_META_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class OnnxInfo:
    """What a consumer of an exported model needs to feed it and read its answer."""

    input_name: str
    output_name: str
    in_chans: int
    input_size: list[int]  # [height, width]
    mean: list[float]  # per channel, applied to pixels scaled to [0, 1]
    std: list[float]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    layout: str = "NCHW"
    input_dtype: str = "float32"  # numpy dtype name the graph's input takes
    precision: str = "fp32"
    batch: int | None = None  # None: dynamic batch dimension
    arch: str = ""
    source: str = ""  # checkpoint file name the model was exported from
    source_sha256: str = ""
    folded: bool = False
    opset: int | None = None
    version: int = ONNX_META_VERSION
    # Optional, added by kdtool export (readers that predate them ignore them):
    max_batch: int | None = None  # largest batch the export was profiled for (--batch MAX)
    quantization: dict = field(default_factory=dict)  # INT8: scheme and calibration
    # How images of another size are fitted to input_size (None: stretch; kdtool.imageprep).
    crop_fraction: float | None = None
    interpolation: str = "bilinear"
    # "noise": exported from a distilled student never calibrated, so the graph normalises
    # with the noise's BN statistics; "" otherwise (and in files that predate the field).
    bn_running_stats: str = ""
    # The software that wrote the graph (kdtool_version, its commit from a checkout, torch,
    # onnx, onnxruntime): no time or command line, so one export run twice is one file.
    exported_with: dict = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta, *, input_name: str, output_name: str, **fields) -> OnnxInfo:
        """The model of a kdtool checkpoint (its ``ModelMeta``) under these tensor names."""
        return cls(
            input_name=input_name,
            output_name=output_name,
            in_chans=meta.in_chans,
            input_size=list(meta.input_size),
            mean=list(meta.mean),
            std=list(meta.std),
            num_classes=meta.num_classes,
            class_names=list(meta.class_names),
            arch=meta.arch,
            crop_fraction=meta.crop_fraction,
            interpolation=meta.interpolation,
            bn_running_stats="noise" if meta.noise_bn_uncalibrated else "",
            **fields,
        )

    def noise_bn_warning(self, path: str) -> str | None:
        """The checkpoint's "not yet calibrated" warning, kept with the exported file."""
        if self.bn_running_stats != "noise":
            return None
        source = self.source or "its checkpoint"
        return (f"'{path}' was exported from a distilled student whose BN running statistics "
                "are noise statistics, never calibrated: its accuracy can be far below what "
                f"the student learnt; calibrate {source} (kdtool calibrate --data "
                "REAL_IMAGES) and export again")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> OnnxInfo:
        try:
            d: dict[str, Any] = json.loads(text)
            version = d.get("version")
            if not isinstance(version, int) or version > ONNX_META_VERSION:
                raise KdtoolError(
                    f"'{source}' was exported by a newer kdtool (metadata version {version})",
                    "upgrade kdtool: pip install -U kdtool",
                )
            known = set(cls.__dataclass_fields__)
            require_fields(cls, d)
            info = cls(**{k: v for k, v in d.items() if k in known})
        except KdtoolError:
            raise
        except (ValueError, TypeError, AttributeError) as e:  # AttributeError: not an object
            raise KdtoolError(f"'{source}' has malformed kdtool ONNX metadata: {e}",
                              "export it again with 'kdtool export'") from e
        info.validate(source)
        return info

    def validate(self, source: str) -> None:
        problems = record_problems(self)
        if self.layout not in ("NCHW", "NHWC"):
            problems.append(f"layout '{self.layout}' is not NCHW or NHWC")
        if self.precision not in PRECISIONS:
            problems.append(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if problems:
            raise KdtoolError(
                f"'{source}' has inconsistent kdtool ONNX metadata: " + "; ".join(problems)
            )

    def input_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.input_size
        if self.layout == "NCHW":
            return (batch, self.in_chans, h, w)
        return (batch, h, w, self.in_chans)


def write_info(model, info: OnnxInfo) -> None:
    """Set (or replace) the kdtool entry of an ``onnx.ModelProto``'s metadata_props."""
    info.validate("the exported model")
    kept = [p for p in model.metadata_props if p.key != ONNX_META_KEY]
    del model.metadata_props[:]
    for p in kept:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=ONNX_META_KEY, value=info.to_json())


def info_from_props(props: dict[str, str], source: str) -> OnnxInfo:
    """Read the kdtool entry from a metadata mapping (``onnx`` or ONNX Runtime's custom map)."""
    if ONNX_META_KEY not in props:
        raise KdtoolError(
            f"'{source}' has no kdtool metadata",
            "export it with: kdtool export CHECKPOINT --onnx FILE.onnx",
        )
    return OnnxInfo.from_json(props[ONNX_META_KEY], source)


def load_proto(path: str | Path):
    """The ``onnx.ModelProto`` at ``path`` (external weights not loaded), or a clear error."""
    import onnx

    path = require_file(path, "ONNX model")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... for foreign files
        reason = message_line(e) or type(e).__name__
        from kdtool.export.ort_session import load_hint

        raise KdtoolError(
            f"'{path}' is not a readable ONNX model ({reason})", load_hint(path)
        ) from e


def read_info(path: str | Path) -> OnnxInfo:
    """Read an ONNX file's kdtool metadata without loading external weights, checked
    against the graph's own inputs and outputs."""
    model = load_proto(path)
    info = info_from_props({p.key: p.value for p in model.metadata_props}, str(path))
    check_graph(info, *proto_io(model), str(path))
    return info


Dims = dict[str, list]  # tensor name -> dims: an int where fixed, anything else where symbolic


def proto_io(model) -> tuple[Dims, Dims]:
    """The graph inputs (not initializers, which old exporters list as inputs) and outputs
    of an ``onnx.ModelProto``, with their dims."""
    weights = {t.name for t in model.graph.initializer}

    def dims(v) -> list:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in v.type.tensor_type.shape.dim]

    return ({v.name: dims(v) for v in model.graph.input if v.name not in weights},
            {v.name: dims(v) for v in model.graph.output})


def check_graph(info: OnnxInfo, inputs: Dims, outputs: Dims, source: str) -> None:
    """Refuse a graph that disagrees with its metadata (an edited file, or metadata copied
    onto another model): fed as the metadata says, it would fail in ONNX Runtime or answer
    with the wrong number of classes."""
    problems = []
    if list(inputs) != [info.input_name] or info.output_name not in outputs:
        problems.append(f"the graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                        f"the metadata names input '{info.input_name}' and output "
                        f"'{info.output_name}'")
    else:
        want = list(info.input_shape(1)[1:])
        got = inputs[info.input_name]
        if len(got) != 4 or any(isinstance(g, int) and g > 0 and g != w
                                for g, w in zip(got[1:], want, strict=True)):
            problems.append(f"the graph's input is {_shape(got)}, the metadata's {info.layout} "
                            f"input is [N, {', '.join(map(str, want))}]")
        out = outputs[info.output_name]
        if len(out) != 2 or (isinstance(out[1], int) and out[1] > 0
                             and out[1] != info.num_classes):
            problems.append(f"the graph's output is {_shape(out)}, the metadata says "
                            f"{info.num_classes} classes")
    if problems:
        raise KdtoolError(f"'{source}' does not match its kdtool metadata: "
                          + "; ".join(problems), "re-export it with kdtool export")


def _shape(dims: list) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if i == 0 else "?"
                           for i, d in enumerate(dims)) + "]"


def exporting_software() -> dict[str, str]:
    """``OnnxInfo.exported_with`` for an export made by this process."""
    import kdtool
    from kdtool.runinfo import code_commit, package_versions

    commit = code_commit()
    return {"kdtool_version": kdtool.__version__, **({"kdtool_commit": commit} if commit else {}),
            **package_versions("torch", "onnx", "onnxruntime", "onnxslim")}
