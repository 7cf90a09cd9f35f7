"""Self-describing checkpoints: safetensors weights + kdtool's JSON metadata in one file.

The metadata (architecture and its arguments, classes, input, normalisation,
provenance) lives in the safetensors header under the key ``kdtool``, so a
checkpoint is loaded from the file alone.  Foreign checkpoints (a plain
state_dict in ``.pt``/``.pth``/``.bin``/``.safetensors``) load with
``torch.load(weights_only=True)`` or safetensors plus a ``ForeignSpec``;
nothing a user hands in is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kdtool import console
from kdtool.errors import KdtoolError, message_line, require_fields
from kdtool.imageprep import Fit, parse_resize, record_problems
from kdtool.io import atomic_write_bytes, check_output, require_file
from kdtool.models import check_input_size, create_model, model_spec

FORMAT = "kdtool.checkpoint"
FORMAT_VERSION = 1
META_KEY = "kdtool"
CHECKPOINT_SUFFIX = ".safetensors"  # kdtool writes these; a .pt is read as a plain state_dict
FOREIGN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # .ckpt: PyTorch Lightning
# What loading a plain state_dict records of how it read the file (provenance keys)
IMPORT_NOTES = ("shapes_read", "state_dict_key", "stripped_prefix")


@dataclass
class ModelMeta:
    """Everything needed to rebuild and feed a model, and where it came from."""

    arch: str
    num_classes: int
    in_chans: int
    input_size: list[int]  # [height, width]
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)
    arch_args: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    # How images of another size are fitted to input_size: None stretches, F in (0, 1]
    # centre-crops after an aspect-preserving resize to input_size / F (kdtool.imageprep).
    crop_fraction: float | None = None
    interpolation: str = "bilinear"  # of those resizes: bilinear or bicubic
    # Stage-specific records ("train", "distill", "calibrate", ...), each a JSON object.
    stages: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelMeta:
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.pop("format", None) != FORMAT:
                raise ValueError("format tag missing")
            version = d.pop("format_version", None)
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"format_version {version!r} is not a version number")
            if version > FORMAT_VERSION:
                raise KdtoolError(
                    f"'{source}' was written by a newer kdtool (format {version})",
                    "upgrade kdtool: pip install -U kdtool",
                )
            require_fields(cls, d)
            unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"it has unknown fields {', '.join(map(repr, unknown))}")
            meta = cls(**d)
        except KdtoolError:
            raise
        except (ValueError, TypeError, RecursionError) as e:  # RecursionError: deep nesting
            why = f"its JSON is broken ({e})" if isinstance(e, json.JSONDecodeError) else str(e)
            raise KdtoolError(f"'{source}' has malformed kdtool metadata: {why}",
                              "re-create it with the kdtool command that wrote it (its "
                              "weights may be fine: 'kdtool convert' with --arch makes a new "
                              "checkpoint of them)") from e
        meta.validate(source)
        return meta

    def validate(self, source: str) -> None:
        problems = [f"{name} must be {kind.__name__}" for name, kind in _FIELD_TYPES.items()
                    if not isinstance(getattr(self, name), kind)]
        if not problems and not all(isinstance(v, dict) for v in self.stages.values()):
            problems.append("every stage record must be an object")
        problems = problems or record_problems(self)
        if problems:
            raise KdtoolError(f"'{source}' has inconsistent metadata: " + "; ".join(problems))

    @property
    def noise_bn_uncalibrated(self) -> bool:
        """A distilled student whose BN running statistics are still the noise's."""
        noise = (self.stages.get("distill") or {}).get("bn_running_stats") == "noise"
        return noise and "calibrate" not in self.stages

    def noise_bn_warning(self, source: str) -> str | None:
        """What to tell a user about to run a distilled student that was never calibrated:
        its BN running statistics are the noise's, which can cost it much of its accuracy
        (tens of points on CIFAR-10; on digits sometimes nothing: a warning, not a verdict)."""
        if not self.noise_bn_uncalibrated:
            return None
        return (f"'{source}' is a distilled student whose BN running statistics are noise "
                "statistics, not yet calibrated: accuracy on them can be far below what it "
                f"learnt; calibrate it first: kdtool calibrate {source} --data REAL_IMAGES")

    def build(self) -> nn.Module:
        try:
            model = create_model(
                self.arch, num_classes=self.num_classes, in_chans=self.in_chans,
                **self.arch_args)
        except TypeError as e:
            if not self.arch_args:  # a bug of the builder: keep its traceback
                raise
            raise KdtoolError(f"the recorded arch_args {self.arch_args} do not fit "
                              f"{self.arch}: {e}",
                              "the checkpoint's metadata was edited or damaged") from e
        calibrate = self.stages.get("calibrate") or {}
        if calibrate.get("folded"):
            # BatchNorm was folded away: replay the recorded plan so the state_dict fits.
            from kdtool.calibrate.fold import apply_plan

            apply_plan(model, calibrate.get("fold_plan") or {})
        return model


# The JSON types of ModelMeta's fields that record_problems does not check
_FIELD_TYPES = {"arch": str, "arch_args": dict, "provenance": dict, "stages": dict,
                "interpolation": str}


def per_channel_norm(mean: list[float], std: list[float], channels: int,
                     what: str) -> tuple[list[float], list[float]]:
    """Normalisation with one value per channel: one value serves every channel; any other
    count than ``channels`` is refused (it was meant for other data)."""
    out = []
    for option, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            raise KdtoolError(f"{option} has {len(values)} values for {what} with {channels} "
                              "channel(s)", "give one value" if channels == 1 else
                              f"give {channels} values, or one for all channels")
        out.append([float(v) for v in values] * (channels if len(values) == 1 else 1))
    if not all(math.isfinite(v) for v in (*out[0], *out[1])):
        raise KdtoolError("--mean and --std must be finite numbers")
    if any(v <= 0 for v in out[1]):
        raise KdtoolError("--std must be positive, got " + ",".join(f"{v:g}" for v in out[1]))
    return out[0], out[1]


@dataclass
class ForeignSpec:
    """What a plain state_dict does not say about itself (the CLI's --arch and friends)."""

    arch: str
    num_classes: int | None = None  # None: read from the file's tensors, else 10
    in_chans: int | None = None  # None: read from the file's tensors, else 3
    input_size: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    class_names: list[str] = field(default_factory=list)
    resize: str | None = None  # the --resize text (kdtool.imageprep); None: the arch's default
    interpolation: str | None = None  # None: the arch's default
    read_from: dict[str, str] = field(default_factory=dict)  # set by resolved()

    def resolved(self, state: dict[str, torch.Tensor]) -> ForeignSpec:
        """A copy with the classes and channels left unsaid read from ``state``'s shapes
        (kdtool.state_dims), or the defaults where the shapes cannot tell; ``read_from``
        names the tensor each came from."""
        from kdtool.state_dims import read_dims

        found = read_dims(self.arch, state, {"num_classes": self.num_classes,
                                             "in_chans": self.in_chans})
        spec = replace(self, read_from={k: name for k, (_, name) in found.items()})
        for dim, default in (("num_classes", 10), ("in_chans", 3)):
            if getattr(spec, dim) is None:
                setattr(spec, dim, found[dim][0] if dim in found else default)
        return spec

    def normalisation(self, mean=None, std=None, source: str = "") -> tuple[list, list]:
        """``mean`` and ``std`` (default: the flags') checked and spread over the channels."""
        return per_channel_norm(self.mean if mean is None else mean,
                                self.std if std is None else std, self.in_chans,
                                f"'{source}' (--in-chans {self.in_chans})")

    def to_meta(self, source: str) -> ModelMeta:
        from kdtool.models import model_spec

        spec = model_spec(self.arch)
        mean, std = self.mean, self.std
        if mean is None or std is None:
            if spec.mean is None or spec.std is None:
                raise KdtoolError(
                    f"'{source}' is a plain state_dict and its normalisation is unknown",
                    "pass --mean and --std (the values the model was trained with)",
                )
            # The published weights' normalisation (torchvision's, timm's); another channel
            # count gets its first channel's
            mean, std = (spec.mean, spec.std) if self.in_chans == len(spec.mean) else \
                (spec.mean[:1], spec.std[:1])
        mean, std = self.normalisation(mean, std, source)
        size = list(self.input_size or spec.input_size)
        # The architecture's crop is its published weights' evaluation at their own size; a
        # model trained at another size (CIFAR's 32) saw its images whole, as kdtool train
        # does. The flags override either (Fit checks them: "did you mean").
        default_crop = spec.crop_fraction if size == list(spec.input_size) else None
        fit = Fit(default_crop if self.resize is None else parse_resize(self.resize),
                  self.interpolation or spec.interpolation)
        meta = ModelMeta(
            arch=self.arch,
            num_classes=self.num_classes,
            in_chans=self.in_chans,
            input_size=size,
            mean=list(mean),
            std=list(std),
            class_names=list(self.class_names),
            provenance={"imported_from": str(source),
                        **({"shapes_read": self.read_from} if self.read_from else {})},
            crop_fraction=fit.crop_fraction,
            interpolation=fit.interpolation,
        )
        meta.validate(source)
        return meta


def save_checkpoint(path: str | Path, model: nn.Module, meta: ModelMeta, force: bool) -> Path:
    """Write ``model``'s state_dict and ``meta`` atomically; refuse to overwrite without force."""
    path = check_output(path, force, "checkpoint", (CHECKPOINT_SUFFIX,))
    meta.validate(str(path))
    write_checkpoint(path, checkpoint_tensors(model), meta.to_json())
    return path


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict as CPU copies that later training steps cannot change."""
    # A copy each: safetensors refuses tensors that share storage (tied weights, views).
    return {k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in model.state_dict().items()}


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta_json: str) -> None:
    """The file of ``save_checkpoint``, from its parts (a run writes it off the main thread)."""
    atomic_write_bytes(path, st_save(tensors, metadata={META_KEY: meta_json}))


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise KdtoolError(f"checkpoint '{path}' is a directory", "pass a .safetensors file")
    require_file(path, "checkpoint")


# Leading bytes of files that users hand to a checkpoint option by mistake.
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"GIF8", "a GIF image"), (b"BM", "a BMP image"), (b"\x1f\x8b", "a gzip archive"),
          (b"\x80", "a Python pickle (a torch.save file of the old format)"),
          (b"\x93NUMPY", "a NumPy .npy array"))


def file_kind(path: Path) -> str | None:
    """What a file that is not the expected checkpoint is, by its content; None: unknown."""
    try:
        with path.open("rb") as f:
            head = f.read(512)  # enough for the magic numbers and to tell text
    except OSError:
        return None
    if not head:
        return "an empty file (0 bytes)"
    if path.suffix.lower() == ".onnx":  # protobuf has no magic number; the name says it
        return "an ONNX model"
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        # a safetensors layout (header length, then its JSON), whatever its length's first
        # byte looks like (0x80: a pickle's, "BM": a bitmap's): damaged, not another kind
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "a torch.save file"
        return "an .npz array file" if names and all(n.endswith(".npy") for n in names) \
            else "a zip archive"
    kind = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if kind is None and _is_text(head):  # a CSV, JSON or log beside the checkpoints
        kind = f"a text file{f' ({path.suffix})' if path.suffix else ''}"
    return kind


def _is_text(head: bytes) -> bool:
    """Whether a file's first bytes read as UTF-8 text: a safetensors header length (8
    little-endian bytes) always holds a NUL or a control byte."""
    if not head or any(b < 32 and b not in b"\t\n\r" for b in head):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a character cut at the end of the read
    return True


def _not_a_checkpoint(path: Path, kind: str) -> KdtoolError:
    if "torch.save" in kind:  # only reached under another suffix than .pt/.pth/.bin
        pt = path.with_suffix(".pt").name
        return KdtoolError(
            f"'{path}' is {kind}, not a safetensors file",
            f"rename it to {pt}; then kdtool reads it as a state_dict (kdtool convert {pt} "
            "--arch ARCH ... makes a kdtool checkpoint of it)")
    if kind == "an ONNX model":
        return KdtoolError(f"'{path}' is {kind}, not a model checkpoint",
                           "run it as it is (kdtool eval, bench, predict, serve), or pass the "
                           "checkpoint it was exported from")
    return KdtoolError(f"'{path}' is {kind}, not a model checkpoint",
                       "pass a kdtool checkpoint (.safetensors), or a PyTorch state_dict "
                       "(.pt/.pth) with --arch")


def _safetensors_header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        kind = file_kind(path)
        if kind is not None:
            raise _not_a_checkpoint(path, kind) from e
        raise KdtoolError(
            f"'{path}' is not a readable safetensors file ({e})",
            "the file is corrupt or truncated: copy it again or re-create it",
        ) from e


def has_kdtool_meta(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file with kdtool metadata (False when unreadable)."""
    try:
        return META_KEY in _safetensors_header(Path(path))
    except KdtoolError:
        return False


# What else a plain state_dict needs, in a hint: tv: and timm: know their own weights'.
_CONVERT_FLAGS = "(plus --mean M --std S for kdtool's own architectures)"


def read_meta(path: str | Path) -> ModelMeta:
    """Read a kdtool checkpoint's metadata without loading its weights."""
    path = Path(path)
    _require_file(path)
    if path.name.endswith(".state.pt"):  # kdtool's own resumable run state
        out = path.name.removesuffix(".state.pt")
        raise KdtoolError(
            f"'{path}' is the run state that kdtool train and distill keep beside '{out}' "
            "for --resume, not a checkpoint", f"use '{out}' itself",
        )
    if path.suffix.lower() in FOREIGN_SUFFIXES:
        raise KdtoolError(
            f"'{path}' is a plain PyTorch file, not a kdtool checkpoint",
            f"make it one: kdtool convert {path} --arch ARCH --out "
            f"{path.with_suffix('.safetensors').name} {_CONVERT_FLAGS}",
        )
    if path.suffix.lower() == ".onnx":
        raise KdtoolError(
            f"'{path}' is an ONNX model, not a kdtool checkpoint",
            "this stage takes the .safetensors it was exported from; 'kdtool eval FILE.onnx "
            "--data DATA' and 'kdtool bench' measure an ONNX model",
        )
    header = _safetensors_header(path)
    if META_KEY not in header:
        raise KdtoolError(
            f"'{path}' is a safetensors file without kdtool metadata (a plain state_dict)",
            f"make it a kdtool checkpoint: kdtool convert {path} --arch ARCH "
            f"--out {path.with_name(path.stem + '.kdtool.safetensors').name} {_CONVERT_FLAGS}"
            " ('kdtool eval' also takes it with --arch)",
        )
    return ModelMeta.from_json(header[META_KEY], str(path))


def _read_state_dict(path: Path, notes: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; ``notes`` (when given) gets how a torch file's weights were
    found in it (provenance)."""
    if path.suffix.lower() in FOREIGN_SUFFIXES:
        _check_torch_file(path)
        obj = load_tensors_only(
            path, f"cannot read '{path}' as a PyTorch state_dict",
            "where the model is trusted, save its weights alone: "
            "torch.save(model.state_dict(), path)")
        return _unwrap_state_dict(obj, path, {} if notes is None else notes)
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError) as e:
        kind = file_kind(path)
        if kind is not None:
            raise _not_a_checkpoint(path, kind) from e
        raise KdtoolError(
            f"'{path}' is corrupt or truncated ({e})", "copy it again or re-create it"
        ) from e


# torch's weights-only loader names what it refuses in two ways ("Unsupported global:
# GLOBAL argparse.Namespace", "unsupported GLOBAL posix.system whose module posix is
# blocked"), inside a paragraph that suggests weights_only=False: never passed on.
_REFUSED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)
_UNPICKLER_DETAIL = re.compile(r"(Unsupported operand \d+|WeightsUnpickler error: \S.*)")


def load_tensors_only(path: Path, cannot: str, hint: str) -> Any:
    """``torch.load(path, weights_only=True)``; anything else in the file is a KdtoolError
    that says what was refused (``cannot``: the message's start for other failures)."""
    try:
        with warnings.catch_warnings():  # its note on pickle protocols is not for users
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:  # not the file's fault: main says what to shrink
        raise
    except Exception as e:  # torch raises many types for bad pickles and refused globals
        text = str(e)
        refused = _REFUSED_GLOBAL.search(text)
        if refused:
            raise KdtoolError(
                f"'{path}' holds a pickled Python object ({refused.group(1)}), not just "
                "tensors: kdtool never unpickles a file (it could run any code)", hint) from e
        if isinstance(e, pickle.UnpicklingError):
            detail = _UNPICKLER_DETAIL.search(text)
            raise KdtoolError(
                f"'{path}' is a pickle that torch's tensors-only loader cannot read"
                + (f" ({detail.group(1).strip()})" if detail else "")
                + ": kdtool never unpickles a file (it could run any code)", hint) from e
        raise KdtoolError(f"{cannot}: {message_line(e) or type(e).__name__}",
                          hint) from e


def _check_torch_file(path: Path) -> None:
    """torch.load's own errors for a damaged file are a bare ``KeyError: 101`` or a
    paragraph on miniz: name the damage instead."""
    # file_kind reads a zip's central directory, which truncation loses: None then
    kind = file_kind(path)
    if kind is None:
        raise KdtoolError(
            f"'{path}' is corrupt or truncated: it is neither a whole torch.save archive "
            "nor a pickle",
            "copy it again, or re-create it with torch.save(model.state_dict(), path)")
    if "torch.save" not in kind and kind != "a zip archive":  # a pickle is the legacy format
        raise _not_a_checkpoint(path, kind)


def _unwrap_state_dict(obj: Any, path: Path, notes: dict) -> dict[str, torch.Tensor]:
    # Training scripts often wrap the weights: {"state_dict": ...}, {"model": ...}.
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            others = sorted(str(k) for k in obj if k != key)
            console.info(f"'{path}': reading the weights under '{key}'"
                         + (f" (it also holds {', '.join(others)})" if others else ""))
            notes["state_dict_key"] = key
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KdtoolError(
            f"'{path}' does not hold a state_dict (a mapping of names to tensors)",
            "save it with torch.save(model.state_dict(), path)",
        )
    # DataParallel / DDP / torch.compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
            _note_prefix(notes, prefix)
    return obj


def _note_prefix(notes: dict, prefix: str) -> None:
    """Record a removed name prefix in the provenance notes, after any removed before."""
    notes["stripped_prefix"] = notes.get("stripped_prefix", "") + prefix


def _match_foreign(state: dict[str, torch.Tensor], foreign: ForeignSpec, source: str,
                   notes: dict) -> tuple[dict[str, torch.Tensor], ForeignSpec]:
    """``state`` and ``foreign`` resolved against each other, checked on the meta device
    before anything else is asked of the user: a wrapper's prefix comes off (notes), and a
    mismatch names the sibling architecture the tensors match (kdtool.state_match)."""
    from kdtool.state_match import (
        expected_shapes,
        matching_sibling,
        mismatch,
        strip_common_prefix,
    )

    if None not in (foreign.mean, foreign.std, foreign.in_chans):  # the flags' own mistakes
        foreign.normalisation(source=source)
    names = expected_shapes(foreign.arch)
    if names is not None:
        state, prefix = strip_common_prefix(state, set(names))
        if prefix:
            console.info(f"'{source}': every tensor name starts with '{prefix}' (a training "
                         f"wrapper's attribute): read without it")
            _note_prefix(notes, prefix)
    spec = foreign.resolved(state)
    shapes = expected_shapes(spec.arch, num_classes=spec.num_classes, in_chans=spec.in_chans)
    problem = mismatch(shapes, state, source) if shapes is not None else None
    if problem:
        def dims(arch: str) -> dict:
            other = replace(foreign, arch=arch).resolved(state)
            return {"num_classes": other.num_classes, "in_chans": other.in_chans}

        message, hint = problem
        sibling = matching_sibling(spec.arch, state, dims)
        if sibling is not None:
            hint = (f"its tensors are those of --arch {sibling}, not {spec.arch}: "
                    f"pass --arch {sibling}")
        raise KdtoolError(message, hint)
    return state, spec


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, naming the first mismatching tensor on failure."""
    from kdtool.state_match import mismatch

    problem = mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, state,
                       source)
    if problem:
        raise KdtoolError(*problem)
    model.load_state_dict(state, strict=True)


def unfinished_run(meta: ModelMeta) -> str | None:
    """What a checkpoint that a train or distill run wrote before its last epoch says of it
    (None for a finished run, or one whose last stage is another: calibrate, ...)."""
    if not meta.stages:
        return None
    stage, record = list(meta.stages.items())[-1]
    if stage not in ("train", "distill") or not isinstance(record, dict):
        return None
    if stage == "train" and (record.get("config") or {}).get("val"):
        return None  # written at its best validated epoch: its history ends there
    done = record.get("history")
    total = record.get("epochs") or (record.get("config") or {}).get("epochs")
    if not isinstance(done, list) or not isinstance(total, int) or len(done) >= total:
        return None
    return f"holds a 'kdtool {stage}' run stopped after epoch {len(done)} of {total}"


def load_checkpoint(
    path: str | Path, foreign: ForeignSpec | None = None
) -> tuple[nn.Module, ModelMeta]:
    """Load a kdtool checkpoint (or a plain state_dict described by ``foreign``), in eval mode."""
    path = Path(path)
    _require_file(path)
    if foreign is None:
        meta = read_meta(path)
        state = _read_state_dict(path)
        unfinished = unfinished_run(meta)
        if unfinished:
            console.warn(f"'{path}' {unfinished}: if it was not stopped on purpose, continue "
                         "it with its command and --resume", once=True)
    else:  # a corrupt file, then a wrong --arch, are named before what the flags leave unsaid
        notes: dict = {}
        state, spec = _match_foreign(_read_state_dict(path, notes), foreign, str(path), notes)
        meta = spec.to_meta(str(path))
        meta.provenance.update(notes)
    model = meta.build()
    load_into(model, state, str(path))
    if foreign is not None:  # the user's --image-size: one the architecture takes?
        default = "x".join(map(str, model_spec(meta.arch).input_size))
        check_input_size(model, meta.arch, meta.in_chans, tuple(meta.input_size),
                         f"pass --image-size with the size '{path}' was trained at "
                         f"(default: {default})")
    return model.eval(), meta
