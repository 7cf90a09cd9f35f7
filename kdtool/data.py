"""Image data sets: load a dataset spec into uint8 tensors.

``load_data(spec)`` accepts:

* ``digits`` (= ``digits:train``) and ``digits:test``: scikit-learn's 8x8 handwritten
  digits (shipped with scikit-learn, no download), values 0..16 mapped to
  ``round(v * 255 / 16)``, classes "0".."9".  The split is fixed (``kdtool.digits``
  stores it): ``train_test_split(test_size=0.2, stratify=y, random_state=0)`` gave 1437
  train and 360 test images, each kept in the original dataset order.
* a directory in ImageFolder layout ``<class>/<image>`` (classes = sorted subfolder
  names, label = index, images sorted by relative path, hidden files ignored); a
  directory with images directly inside and no class subfolders is unlabeled
  (y = -1, no class names).  Class names are NFC; a parent of split folders (train/,
  val/) is refused; a symlink to a folder of the same tree is not followed.
* a ``.zip`` with the same layout, optionally under one common top folder (so a
  zip holding only ``<folder>/<image>`` is unlabeled), read without extracting.
* an ``.npz`` with ``x`` (uint8, NHWC or NHW) and ``y`` (int; all -1 = unlabeled) and
  an optional ``class_names`` str array; never unpickled.

A zip or directory is decoded once (in parallel) and cached as safetensors under
``cache_dir``, ``$KDTOOL_CACHE`` or ``~/.cache/kdtool/datasets``, keyed by the
absolute path, the file sizes and mtimes, image_size, channels and the fit rule. A new
entry replaces the one for the same path and conversion whose files have since changed.
An evaluation of a folder or zip too large to hold (``open_for_model``) gets an ImageStream,
decoded a chunk at a time and never cached.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import unicodedata
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdtool import console, imagefolder
from kdtool.errors import InternalError, KdtoolError, check_choice, message_line, suggest
from kdtool.heap import release_freed
from kdtool.imagefiles import (
    IMAGE_EXTS,
)
from kdtool.imageprep import GRAY_MODES, STRETCH, Fit, to_array
from kdtool.io import atomic_path

BUILTIN_DATASETS = ("digits", "digits:train", "digits:test")
MAX_NPZ_CLASSES = 100_000  # more is a sentinel label (255, 10**9), not a class count
CACHE_FORMAT = 3  # 2: images turned upright by their EXIF orientation; 3: Info-ZIP UTF-8 names
# An evaluation whose pixels would take more memory than this decodes them a chunk at a time
# (ImageStream): ImageNet's 50,000 validation images at 224x224 are 7.5 GB.
STREAM_ABOVE_BYTES = 2 << 30
CHUNK_BYTES = 256 << 20  # a streamed chunk's pixels, rounded to whole batches
_FORMS_HINT = ("give a directory of <class>/<image> folders, a .zip or .npz file, or one of: "
               + ", ".join(BUILTIN_DATASETS))


@dataclass(frozen=True)
class Draw:
    """Some images of a dataset: the first ``count`` (all when it has fewer) of one seeded
    random order, ``torch.randperm(n)`` under ``seed``, in that order. A folder or zip then
    decodes just those files: a calibration's 512 images of a folder of 100,000 cost 512
    decodes, not 100,000 (and no cache entry; a cached full decode is read instead)."""

    count: int
    seed: int

    def indices(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:self.count]


class _Labels:
    """What a dataset in memory (ImageData) and one decoded a chunk at a time (ImageStream)
    share: labels ``y``, ``class_names`` and the ``source`` spec."""

    y: torch.Tensor
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labeled(self) -> bool:
        return bool(self.class_names)

    def require_labels(self, what: str) -> None:
        """Refuse unlabeled data for ``what`` (e.g. "--val"), saying why it read as unlabeled."""
        if not self.labeled:
            raise KdtoolError(f"{what} '{self.source}' has no labels: "
                              f"{imagefolder.why_unlabeled(self.source)}",
                              "give a folder of <class>/<image> subfolders, a zip of one, or "
                              "an npz with y")


@dataclass
class ImageData(_Labels):
    x: torch.Tensor  # uint8, N x C x H x W, contiguous, CPU
    y: torch.Tensor  # int64, N; -1 for every image when unlabeled
    class_names: list[str] = field(default_factory=list)  # [] when unlabeled
    source: str = ""  # the spec as the user gave it

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.ndim != 4 or self.y.dtype != torch.int64 \
                or self.y.shape != (self.x.shape[0],):
            raise InternalError(f"bad ImageData tensors: x {self.x.dtype} {tuple(self.x.shape)},"
                                f" y {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.x.shape[2], self.x.shape[3])

    def chunks(self, order: torch.Tensor, rows: int) -> Iterator[tuple[ImageData, torch.Tensor]]:
        """The images at positions ``order``, ``rows`` at a time, each chunk with its
        positions (ImageStream's interface: a loop over either is one loop)."""
        for start in range(0, len(order), rows):
            pos = order[start:start + rows]
            yield self.subset(pos), pos
            release_freed()  # the caller is done with the chunk (kdtool.heap says why)

    def checksum(self) -> str:
        """CRC-32 of the pixels, labels and class names, as hex (0.1 s for CIFAR-10's 45k)."""
        names = zlib.crc32("\n".join(self.class_names).encode())
        return f"{_crc32(self.x, self.y, names):08x}"

    def subset(self, index: torch.Tensor | slice) -> ImageData:
        return ImageData(self.x[index].contiguous(), self.y[index].contiguous(),
                         list(self.class_names), self.source)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) std of ``x / 255``."""
        # A 256-bin histogram per channel is exact and avoids a float copy of the data.
        counts = torch.zeros(self.channels, 256, dtype=torch.int64)
        for start in range(0, len(self), 4096):
            chunk = self.x[start:start + 4096]
            for c in range(self.channels):
                counts[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
        values = torch.arange(256, dtype=torch.float64) / 255
        n = counts.sum(1).to(torch.float64)
        mean = (counts * values).sum(1) / n
        var = (counts * (values - mean[:, None]) ** 2).sum(1) / n
        return mean.tolist(), var.sqrt().tolist()


def load_data(spec: str, *, image_size: int | tuple[int, int] | None = None,
              channels: int | None = None, cache_dir: str | Path | None = None,
              fit: Fit = STRETCH, draw: Draw | None = None) -> ImageData:
    """Load a dataset spec (see the module docstring) as uint8 N x C x H x W tensors.

    With ``image_size``, images are fitted to it by ``fit``: stretching (the default)
    or a centre crop (kdtool.imageprep). With ``draw``, only the images it picks, in its
    order: ``load_data(spec, channels=c, draw=d)`` equals ``load_data(spec, channels=c)
    .subset(d.indices(n))``. Read as they are (``channels`` None), a draw has the channels of
    its own images: a folder of colour and grey images whose draw holds only grey ones reads
    as grey (load_calibration decides on the whole folder then).
    """
    spec = str(spec)  # a Path works too
    if not spec.strip():  # '' read as the current folder, whatever it holds
        raise KdtoolError("a dataset was given as an empty string",
                          "pass a folder, a .zip, an .npz, or digits / digits:test")
    size = _check_size(image_size)
    if size is None:
        fit = STRETCH  # nothing to fit to
    if channels not in (None, 1, 3):
        raise KdtoolError(f"channels must be 1 or 3, not {channels!r}",
                          "pass 1 (grayscale) or 3 (RGB)")
    path = Path(spec).expanduser()
    if spec in BUILTIN_DATASETS:
        x, y, names = _load_digits(spec)
    elif _is_image_tree(spec):
        return _load_images_cached(spec, path.resolve(), size, channels, fit, cache_dir, draw)
    elif path.is_file() and path.suffix.lower() == ".npz":
        x, y, names = _load_npz(path)
    elif path.exists():
        raise KdtoolError(f"unsupported dataset file {path}", _FORMS_HINT)
    elif spec.startswith("digits:"):
        check_choice(spec, BUILTIN_DATASETS, "built-in dataset")
        raise InternalError("check_choice accepted an unknown split")
    else:
        # Suggest a built-in only for what looks like a name, not like a path.
        looks_like_name = not ("/" in spec or os.sep in spec or path.suffix)
        guess = suggest(spec, BUILTIN_DATASETS) if looks_like_name else None
        raise KdtoolError(f"dataset '{spec}' not found: no such file or directory",
                          f"did you mean '{guess}'?" if guess else _FORMS_HINT)
    if draw is not None:  # before fitting: only the drawn images are resized
        index = draw.indices(len(x)).numpy()
        x, y = x[index], y[index]
    if channels == 3 and x.shape[3] == 1:  # a whole grey dataset for a colour model
        console.warn(f"{spec}: grey images for a model of 3 channels; each grey value is "
                     "copied to R, G and B (is this the data the model was trained on?)",
                     once=True)
    x = _conform(x, channels, size, fit)
    return _to_data(x, y, names, spec)


def same_dataset(a: str, b: str) -> bool:
    """Whether two dataset specs name the same images (``digits`` is ``digits:train``)."""
    def canonical(spec: str) -> str:
        if spec in BUILTIN_DATASETS:
            return "digits:train" if spec == "digits" else spec
        return str(Path(spec).expanduser().resolve())
    return canonical(str(a)) == canonical(str(b))


def load_for_model(spec: str, model, draw: Draw | None = None,
                   labels: bool = True) -> ImageData:
    """``spec`` fitted to a model's input: its channels, size and --resize rule, labelled
    in the model's class order (``labels=False``: images whose labels nothing reads, as
    they are).

    ``model`` is anything that describes one (a ModelMeta, an ONNX file's OnnxInfo, a
    benchmark's BenchModel): ``in_chans``, ``input_size``, ``crop_fraction`` and
    ``interpolation``.
    """
    if labels:
        refuse_unknown_classes(spec, model.class_names)
    return _fitted(spec, model, draw, labels)


def _fitted(spec: str, model, draw: Draw | None, labels: bool = True) -> ImageData:
    data = load_data(spec, image_size=tuple(model.input_size), channels=model.in_chans,
                     fit=Fit.of(model), draw=draw)
    return match_classes(data, model.class_names) if labels else data


def refuse_unknown_classes(spec: str, names: list[str], whose: str = "the model's") -> None:
    """Refuse a folder or zip with class folders among which some are not in ``names`` (as
    match_classes would), from its listing: before minutes of decoding and a cache entry of
    data that cannot be used."""
    if names and _is_image_tree(spec):
        _, listed, strip, _ = imagefolder.list_images(Path(str(spec)).expanduser().resolve())
        _refuse_strangers(imagefolder.classes_of(imagefolder.relative(listed, strip)), names,
                          str(spec), whose)


@dataclass
class ImageStream(_Labels):
    """The labelled images of a folder or zip fitted to a model's input, decoded a chunk at a
    time when asked for and never cached (``open_for_model``): an evaluation then holds one
    chunk's pixels, not the whole dataset's, in memory and on disk."""

    path: Path
    is_zip: bool
    names: list[str]  # as Decoder reads them, in dataset order
    y: torch.Tensor
    class_names: list[str]
    source: str
    channels: int
    image_size: tuple[int, int]
    fit: Fit

    def __len__(self) -> int:
        return len(self.names)

    def chunks(self, order: torch.Tensor, rows: int) -> Iterator[tuple[ImageData, torch.Tensor]]:
        """As ImageData.chunks: the images at positions ``order``, decoded ``rows`` at a time."""
        for start in range(0, len(order), rows):
            pos = order[start:start + rows]
            names = [self.names[i] for i in pos.tolist()]
            # a chunk is 256 MiB of pixels: in parallel whatever its image count
            x = imagefolder.decode_images(self.path, names, self.is_zip, self.channels,
                                          self.image_size, self.fit, progress=False,
                                          parallel_from=0)
            yield ImageData(x, self.y[pos], list(self.class_names), self.source), pos
            del x  # the caller is done with this chunk: free it before the next decodes
            release_freed()  # kdtool.heap says why


def chunk_rows(data: ImageData | ImageStream, batch_size: int) -> int:
    """Images per chunk when iterating ``data`` in batches: whole batches, CHUNK_BYTES of
    pixels or one batch."""
    h, w = data.image_size
    return max(1, CHUNK_BYTES // (data.channels * h * w * batch_size)) * batch_size


def open_for_model(spec: str, model, draw: Draw | None = None) -> ImageData | ImageStream:
    """As load_for_model, but a folder or zip whose pixels at the model's input would take
    more than STREAM_ABOVE_BYTES comes back as an ImageStream (for evaluation: scores in
    the same batches, whose images are decoded a chunk at a time)."""
    if draw is not None or not _is_image_tree(spec):
        return load_for_model(spec, model, draw)
    path = Path(str(spec)).expanduser().resolve()
    is_zip, names, strip, _ = imagefolder.list_images(path)
    h, w = model.input_size
    pixels = len(names) * model.in_chans * h * w
    if pixels <= STREAM_ABOVE_BYTES:  # load_for_model's class check, from this listing
        _refuse_strangers(imagefolder.classes_of(imagefolder.relative(names, strip)),
                          model.class_names, str(spec), "the model's")
        return _fitted(spec, model, None)
    names, labels, classes = imagefolder.labelled(path, names, strip, is_zip)
    stream = ImageStream(path, is_zip, names, torch.tensor(labels, dtype=torch.int64),
                         list(classes), str(spec), model.in_chans, (h, w), Fit.of(model))
    console.info(f"{spec}: {len(names)} images take {pixels / 1e9:.1f} GB at {h}x{w}; "
                 "decoding them a chunk at a time, uncached")
    return match_classes(stream, model.class_names)  # refuses from the names: no decode


def load_calibration(spec: str, model, what: str, stats: str,
                     image_size: tuple[int, int] | None = None,
                     draw: Draw | None = None) -> ImageData:
    """Images a model's ``stats`` (BN's, INT8 ranges) are taken from, fitted to its input.

    Colour images for a grey model are converted as predict and serve convert them: a
    colour photo served to it becomes those very pixels (said in a warning). Grey images
    for a colour model are refused: copies with three equal channels have none of the
    colour of the images it will be served. (``model`` as for load_for_model; ``draw``
    as for load_data.)
    """
    size = image_size or tuple(model.input_size)
    data = load_data(spec, image_size=size, fit=Fit.of(model), draw=draw)
    if data.channels < model.in_chans and draw is not None and _has_colour(spec):
        # A draw of a folder of colour and grey images may hold grey ones alone: the whole
        # folder has the model's channels, and its grey images are used as copies, as a
        # decode of all of it uses them
        data = load_data(spec, image_size=size, channels=model.in_chans, fit=Fit.of(model),
                         draw=draw)
    if data.channels > model.in_chans:
        console.warn(f"{what} '{data.source}' has {data.channels}-channel images and the model "
                     f"takes {model.in_chans}: they are converted to grey as predict and serve "
                     f"convert what they are sent, and its {stats} are those of the converted "
                     "images")
        data = load_data(spec, image_size=size, channels=model.in_chans, fit=Fit.of(model),
                         draw=draw)
    elif data.channels < model.in_chans:
        raise KdtoolError(
            f"{what} '{data.source}' has {data.channels}-channel images but the model takes "
            f"{model.in_chans}: {stats} of grey copies with equal channels have none of the "
            "colour of the images it will be served",
            f"give {model.in_chans}-channel images, like those it will see in deployment")
    return data


def _has_colour(spec: str) -> bool:
    """Whether a folder or zip of images holds a colour one, from the files' headers alone
    (stopping at the first one): what a decode of all of them as they are says, without
    the decode. Other datasets are one array: a draw of them has their channels."""
    if not _is_image_tree(spec):
        return False
    path = Path(spec).expanduser()
    is_zip, names, _, _ = imagefolder.list_images(path)
    decoder = imagefolder.Decoder(str(path), is_zip, None, None, STRETCH)
    with contextlib.closing(decoder):
        return any(decoder.mode(name) not in GRAY_MODES for name in names)


def match_classes(data: ImageData | ImageStream, names: list[str],
                  whose: str = "the model's") -> ImageData | ImageStream:
    """``data`` labelled in the order of a model's class ``names`` when its own class names
    are all among them (a folder holding some of the classes, or all in another order);
    unchanged when none is (labels then mean class indices); refused when only some are:
    index labels would score those images against other classes. ``whose`` names the
    owner of ``names`` in messages (train's --val: "the training data's")."""
    if data.labeled and not names and _is_image_tree(data.source):
        # a folder's names are its classes' only identity: unmatched, say how they are read
        console.warn(f"{data.source}: {whose} classes have no names, so its class folders "
                     f"({_few(data.class_names)}) are read as classes 0 to "
                     f"{data.num_classes - 1} in sorted order (kdtool convert --class-names "
                     "gives a model its names, and folders are then matched by name)")
    if not data.labeled or not names or data.class_names == names:
        return data
    index = {unicodedata.normalize("NFC", n): i for i, n in enumerate(names)}
    own = [unicodedata.normalize("NFC", n) for n in data.class_names]
    if not any(n in index for n in own):
        # Say so, as every stage that scores or calibrates with labels gets here: digits
        # (0..9) scored against a CIFAR teacher would otherwise pass for a 10% model.
        console.warn(f"{data.source}: none of its class names ({_few(own)}) is one of "
                     f"{whose} ({_few(names)}); its labels are read as class indices")
        return data
    _refuse_strangers(own, names, data.source, whose)
    remap = torch.tensor([index[n] for n in own])
    return replace(data, y=remap[data.y], class_names=list(names))


def _refuse_strangers(own: list[str], names: list[str], source: str, whose: str) -> None:
    """Refuse class names ``own`` of which some, not all, are not among ``names``."""
    known = [unicodedata.normalize("NFC", n) for n in names]
    strangers = [n for n in (unicodedata.normalize("NFC", o) for o in own) if n not in known]
    if not strangers or len(strangers) == len(own):
        return
    npz = str(source).lower().endswith(".npz")
    # a label of 10 is no typo of '1': guesses are for names
    guess = None if strangers[0].isdigit() else suggest(strangers[0], known)
    raise KdtoolError(
        f"{source}: {'class' if npz else 'class folder'} '{strangers[0]}' is not one of "
        f"{whose} classes" + (f" (did you mean '{guess}'?)" if guess else "")
        + (f", nor are {len(strangers) - 1} more" if len(strangers) > 1 else ""),
        f"keep the labels {whose} classes have ({_few(names)}), leaving the others out of x "
        "and y" if npz else
        f"name class folders as {whose} classes ({_few(names)}) or leave the others out")


def _is_image_tree(spec: str) -> bool:
    """Whether load_data reads ``spec`` as a folder or zip of images (a built-in name wins
    over a folder of that name; '' is no folder)."""
    spec = str(spec)
    if not spec.strip() or spec in BUILTIN_DATASETS:
        return False
    path = Path(spec).expanduser()
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def check_fits(data: ImageData | ImageStream, *, num_classes: int, in_chans: int, what: str,
               class_names: list[str] | None = None) -> None:
    """Raise if ``data`` cannot feed the model ``what``: channels, class count.

    Sizes are not checked: data for a model is loaded fitted to it (``load_for_model``).
    """
    if data.channels != in_chans:
        raise KdtoolError(
            f"{data.source} has {data.channels}-channel images but {what} expects {in_chans}",
            f"convert the images to {in_chans} channel(s)")
    if data.labeled and data.num_classes != num_classes:
        unnamed = class_names is not None and not class_names
        raise KdtoolError(
            f"{data.source} has {data.num_classes} classes but {what} has {num_classes}",
            f"the model records no class names, so class folders are its classes 0 to "
            f"{num_classes - 1} in sorted order: give {num_classes} of them" if unnamed else
            "use data labelled with the model's classes (class folders named as the model's "
            "classes may hold a subset of them; 'kdtool info' lists them)")


def _check_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise KdtoolError(f"bad image size {image_size!r}",
                          "give a positive int or (height, width)")
    return size  # type: ignore[return-value]


def _to_data(x: np.ndarray, y: np.ndarray, names: list[str], source: str) -> ImageData:
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return ImageData(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)), list(names), source)


# ----------------------------------------------------------------------------- arrays


def _load_digits(spec: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from kdtool.digits import load_split

    pixels, y = load_split("test" if spec == "digits:test" else "train")
    x = np.rint(pixels * (255 / 16)).astype(np.uint8)[..., None]
    return x, y, [str(d) for d in range(10)]


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    how = "save it with np.savez(path, x=uint8 NHWC images, y=int labels (-1 = unlabeled))"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise KdtoolError(f"cannot read {path}: {e.strerror}", how) from None
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        # numpy takes any other bytes for a pickle, and its message offers to unpickle it
        raise KdtoolError(f"{path} is not an .npz archive (not a zip file)", how)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # np.save's .npy under an .npz name
            raise KdtoolError(f"{path} is one array ({loaded.dtype}, shape {loaded.shape}), "
                              "not an .npz archive of x and y", how)
        with loaded as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise KdtoolError(f"{path} has no array {' or '.join(map(repr, missing))}", how)
            x, y = f["x"], f["y"]
            names = f["class_names"] if "class_names" in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if "pickle" in str(e):  # object arrays: numpy's text suggests loading them unsafely
            raise KdtoolError(f"{path} holds Python objects (pickled), which kdtool never "
                              "loads", how) from None
        raise KdtoolError(f"cannot read {path} as .npz: {e}", how) from None
    if x.dtype != np.uint8:
        raise KdtoolError(f"{path}: x has dtype {x.dtype}, expected uint8 (0..255)", how)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise KdtoolError(f"{path}: x has shape {x.shape}, expected N x H x W (x 1 or 3)", how)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise KdtoolError(f"{path}: y has dtype {y.dtype} and shape {y.shape}, expected 1-d int",
                          how)
    if len(x) != len(y):
        raise KdtoolError(f"{path}: x has {len(x)} images but y has {len(y)} labels", how)
    if len(x) == 0:
        raise KdtoolError(f"{path} holds no images", how)
    if (y == -1).all():
        return x, y, []
    if names is not None and (names.ndim != 1 or names.dtype.kind != "U"):
        raise KdtoolError(f"{path}: class_names must be a 1-d str array, not {names.dtype}", how)
    twice = sorted(n for n, k in Counter(names.tolist()).items() if k > 1) if names is not None \
        else []
    if twice:
        raise KdtoolError(f"{path}: class name '{twice[0]}' is given more than once",
                          "give each class a name of its own")
    if y.min() < 0:
        raise KdtoolError(f"{path}: y holds the label {y.min()}",
                          "labels are class indices 0..N-1, or -1 for every image (unlabeled)")
    if names is None and y.max() >= MAX_NPZ_CLASSES:
        raise KdtoolError(f"{path}: y holds the label {y.max()}, which would make "
                          f"{int(y.max()) + 1:,} classes", "labels are class indices 0..N-1: "
                          "renumber them, or add class_names")
    n_names = len(names) if names is not None else int(y.max()) + 1
    if y.max() >= n_names:
        raise KdtoolError(f"{path}: labels span {y.min()}..{y.max()} but there are {n_names}"
                          " class names", "labels must be 0..len(class_names)-1, or all -1")
    if names is None:
        empty = np.flatnonzero(np.bincount(y, minlength=n_names) == 0)
        if len(empty):
            shown = ", ".join(map(str, empty[:8])) + (" ..." if len(empty) > 8 else "")
            console.warn(f"{path}: labels {shown} have no images; the labels are class "
                         f"indices, so this is {n_names}-class data")
    return x, y, [str(s) for s in names] if names is not None else [str(i) for i in range(n_names)]


def _conform(x: np.ndarray, channels: int | None, size: tuple[int, int] | None,
             fit: Fit) -> np.ndarray:
    """Convert N x H x W x C arrays to ``channels`` / ``size`` (same conversions as for files)."""
    same_size = size in (None, x.shape[1:3]) and fit.crop_fraction in (None, 1.0)
    if same_size and channels in (None, x.shape[3]):
        return x
    if same_size and x.shape[3] == 1:
        return np.repeat(x, 3, axis=3)  # gray -> RGB replicates, exactly as PIL does
    out = [to_array(Image.fromarray(img[..., 0] if img.shape[2] == 1 else img), channels, size,
                    fit)
           for img in x]
    return np.stack(out)


# ----------------------------------------------------------------------------- cache


def _load_images_cached(spec: str, path: Path, size, channels, fit: Fit,
                        cache_dir, draw: Draw | None = None) -> ImageData:
    is_zip, names, strip, stamp = imagefolder.list_images(path)
    if not names:
        raise KdtoolError(f"no images found in {path}",
                          f"looked for {' '.join(IMAGE_EXTS)} files (any case) in class folders"
                          " or directly inside")
    root = Path(cache_dir or os.environ.get("KDTOOL_CACHE") or "~/.cache/kdtool/datasets")

    def entry(channels) -> tuple[Path, list]:
        variant = [CACHE_FORMAT, str(path), size, channels, *fit.cache_key()]
        key = json.dumps([*variant[:2], stamp, *variant[2:]])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.name)[:40]  # readable, safe file name
        return root.expanduser() / f"{stem}-{digest}.safetensors", variant

    cache, variant = entry(channels)
    cached = _read_cache(cache, str(path))
    if cached is None and channels is not None and entry(None)[0].is_file():
        # The images as they are (train's --data, calibrate's) already hold this many
        # channels: the same pixels as converting each image, so no second decode.
        cached = _read_cache(entry(None)[0], str(path))
        cached = cached if cached is not None and cached[0].shape[1] == channels else None
    if cached is not None:
        data = ImageData(*cached, spec)
        return data if draw is None else data.subset(draw.indices(len(data)))
    names, labels, classes = imagefolder.labelled(path, names, strip, is_zip)
    if draw is not None:  # decode the drawn files alone, and cache nothing
        index = draw.indices(len(names)).tolist()
        names, labels = [names[i] for i in index], [labels[i] for i in index]
    data = ImageData(imagefolder.decode_images(path, names, is_zip, channels, size, fit),
                     torch.tensor(labels, dtype=torch.int64), list(classes), spec)
    if draw is None and _write_cache(cache, data, str(path), json.dumps(variant)):
        _drop_superseded(cache, json.dumps(variant))
    return data


def _read_cache(cache: Path, source: str) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    if not cache.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = json.loads(f.metadata()["kdtool"])
            x, y = f.get_tensor("x"), f.get_tensor("y")
        names = meta["class_names"]
        ImageData(x, y, names)  # validates dtypes and shapes
        if meta["format"] != CACHE_FORMAT or meta["source"] != source:
            raise ValueError("stale entry")
        if "crc32" not in meta:  # entries before the checksum (non-square crops differed too)
            raise ValueError("written by an older kdtool")
        if meta["crc32"] != _crc32(x, y):  # flipped bytes would train on wrong pixels
            raise ValueError("checksum mismatch")
        return x, y, [str(n) for n in names]
    # Any damage to the file (unreadable, not safetensors, metadata or tensors not as
    # written): rebuild instead of failing the run. Anything else is a bug, and says so.
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, InternalError) as e:
        why = message_line(e, 120) if isinstance(e, ValueError) else ""
        # Removed: a rebuild may write another entry (other channels) and leave this one
        # to be warned of on every run.
        with contextlib.suppress(OSError):
            cache.unlink()
        console.warn(f"ignoring cache file {cache} ({type(e).__name__}{': ' * bool(why)}"
                     f"{why}); removed it, rebuilding")
        return None


def _crc32(x: torch.Tensor, y: torch.Tensor, start: int = 0) -> int:
    """Checksum of a cache entry's tensors (0.08 s for CIFAR-10's 45k images), continuing
    from ``start``."""
    return zlib.crc32(y.numpy(), zlib.crc32(x.numpy(), start))


def _write_cache(cache: Path, data: ImageData, source: str, variant: str) -> bool:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    meta = {"format": CACHE_FORMAT, "source": source, "variant": variant,
            "class_names": data.class_names, "crc32": _crc32(data.x, data.y)}
    try:
        # Temp file + rename: a crash or a concurrent load never sees a half-written entry.
        with atomic_path(cache) as tmp:
            save_file({"x": data.x, "y": data.y}, str(tmp), metadata={"kdtool": json.dumps(meta)})
    # A read-only or full disk costs speed next time, not this run; safetensors' own writer
    # reports a full disk as SafetensorError, not OSError.
    except (OSError, SafetensorError) as e:
        console.warn(f"could not write dataset cache {cache}: {e}")
        return False
    return True


def _drop_superseded(cache: Path, variant: str) -> None:
    """Delete entries for the same source and conversion as ``cache`` but older contents
    (the folder or zip changed since): nothing would read them again, and a CIFAR-sized
    entry is 100+ MB. Entries at other sizes or channels are kept."""
    from safetensors import safe_open

    stem = cache.name[: cache.name.rindex("-")]
    for other in cache.parent.glob(f"{glob.escape(stem)}-*.safetensors"):
        if other == cache:
            continue
        try:
            with safe_open(str(other), framework="pt") as f:  # reads the header only
                same = json.loads(f.metadata()["kdtool"]).get("variant") == variant
            if same:
                other.unlink()
        except Exception:  # unreadable or another process's: leave it
            continue
