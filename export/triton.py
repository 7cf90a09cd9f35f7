"""A Triton Inference Server model repository for an exported model.

Layout (what Triton and KServe's Triton runtime load)::

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx        (platform onnxruntime_onnx)  or
    REPO/<name>/1/model.plan        (platform tensorrt_plan)
    REPO/<name>/labels.txt          (class names, when the model has them)

Input and output names, data types and dims come from the ONNX graph itself. A
dynamic-batch model gets ``max_batch_size`` = the profile's MAX, dims without the batch
and ``dynamic_batching``; a static-batch model gets ``max_batch_size: 0`` and full dims
(Triton cannot batch requests into a fixed-size graph).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from kdtool.errors import KdtoolError
from kdtool.export.batch import BatchProfile
from kdtool.io import remove_left_behind, temp_prefix

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}
_TRITON_TYPES = {
    1: "TYPE_FP32",
    10: "TYPE_FP16",
    16: "TYPE_BF16",
    11: "TYPE_FP64",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
}
QUEUE_DELAY_US = 100


def model_name(stem: str) -> str:
    """A folder-safe Triton model name from a file stem."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "model"
    return name


def tensor_spec(value_info) -> tuple[str, str, list[int]]:
    """(name, Triton data type, dims with -1 for symbolic) of an ONNX graph input/output."""
    t = value_info.type.tensor_type
    if t.elem_type not in _TRITON_TYPES:
        raise KdtoolError(
            f"tensor '{value_info.name}' has ONNX type {t.elem_type}, "
            "which Triton's config has no name for"
        )
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    return value_info.name, _TRITON_TYPES[t.elem_type], dims


def config_text(name: str, kind: str, graph, profile: BatchProfile, labels: bool = False) -> str:
    """config.pbtxt (protobuf text format) for ``graph`` (an ``onnx.GraphProto``)."""
    platform = PLATFORMS[kind][0]
    dynamic = not profile.static
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {profile.max if dynamic else 0}",
    ]
    for section, infos in (("input", graph.input), ("output", graph.output)):
        inits = {t.name for t in graph.initializer}
        entries = []
        for vi in infos:
            if vi.name in inits:  # old exporters list initializers as inputs
                continue
            tname, dtype, dims = tensor_spec(vi)
            if dynamic:
                dims = dims[1:]  # Triton adds the batch dimension itself
            body = [
                f'    name: "{tname}"',
                f"    data_type: {dtype}",
                f"    dims: [ {', '.join(str(d) for d in dims)} ]",
            ]
            if section == "output" and labels:
                body.append('    label_filename: "labels.txt"')
            entries.append("  {\n" + "\n".join(body) + "\n  }")
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    if dynamic:
        lines.append(
            "dynamic_batching {\n"
            f"  preferred_batch_size: [ {profile.opt} ]\n"
            f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}"
        )
    if kind == "plan":
        lines.append("instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]")
    return "\n".join(lines) + "\n"


def check_target(repo: Path, name: str, force: bool) -> Path:
    """``repo/name``, checked before any work: a folder kdtool may write, and replace only
    with ``force`` and only when it holds nothing kdtool did not write (another version
    folder, a user's file), which the replacement would delete."""
    target = repo / name
    if repo.exists() and not repo.is_dir():
        raise KdtoolError(f"--triton-repo '{repo}' is a file, not a folder",
                          "name a folder (it is created if missing)")
    if target.exists() and not target.is_dir():
        raise KdtoolError(f"'{target}' is a file where the Triton model's folder goes",
                          "move it away, or choose another --triton-name")
    if target.exists():
        if not force:
            raise KdtoolError(f"Triton model '{target}' already exists",
                              "pass --force to replace it")
        ours = {"1", "config.pbtxt", "labels.txt"}
        model_files = {f for _, f in PLATFORMS.values()}
        others = sorted(e.name + "/" * e.is_dir() for e in target.iterdir() if e.name not in ours)
        if (target / "1").is_dir():
            others += sorted(f"1/{e.name}" for e in (target / "1").iterdir()
                             if e.name not in model_files)
        if others:
            raise KdtoolError(
                f"Triton model '{target}' holds what kdtool did not write "
                f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): --force "
                "replaces the whole folder and would delete it",
                "move those away, or choose another --triton-name")
    # Writable now, not after the ONNX is written: the repository, or the folder it would
    # be created in (created only when the export has passed its checks).
    existing = next(p for p in (repo, *repo.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise KdtoolError(f"cannot write to --triton-repo '{repo}': '{existing}' is not a "
                          "writable folder", "choose a folder you can write to")
    return target


def write_repo(
    repo: Path,
    name: str,
    model_file: Path,
    kind: str,
    graph,
    profile: BatchProfile,
    class_names: list[str],
    force: bool,
) -> Path:
    """Write ``repo/name`` (atomically: built beside, then renamed into place)."""
    target = repo / name
    if target.exists() and not force:
        raise KdtoolError(f"Triton model '{target}' already exists", "pass --force to replace it")
    repo.mkdir(parents=True, exist_ok=True)
    remove_left_behind(repo, name, (".tmp", ".old"))
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=repo))
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(model_file, tmp / "1" / PLATFORMS[kind][1])
        if class_names:
            (tmp / "labels.txt").write_text("".join(f"{c}\n" for c in class_names))
        (tmp / "config.pbtxt").write_text(
            config_text(name, kind, graph, profile, labels=bool(class_names))
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; Triton may run as another user
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Rename folder ``new`` to ``target``; an old ``target`` is moved aside first and deleted
    only once the new one is in place (a folder cannot be renamed over a non-empty one), and
    put back if that rename fails."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".old",
                                dir=target.parent))
    old.rmdir()  # only the unique name is wanted
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)
