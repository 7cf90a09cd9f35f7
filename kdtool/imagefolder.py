"""Folders and zips of images: their listing, labels from class folders, and the parallel
decode into uint8 N x C x H x W tensors (``kdtool.data`` turns them into datasets and caches
them)."""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import sys
import unicodedata
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdtool import console
from kdtool.errors import InternalError, KdtoolError
from kdtool.imagefiles import DECODE_ERRORS, IMAGE_EXTS, decode_error_text, is_hidden, list_dir
from kdtool.imageprep import Fit, to_array
from kdtool.runinfo import usable_cores

# Top folders that name splits, not classes: a parent of train/ and val/ given as --data.
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "dev"}
PARALLEL_MIN_IMAGES = 2000  # below this, starting worker processes costs more than it saves
ZIP_UTF8_FLAG = 0x800  # a zip entry's name is UTF-8


def zip_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The zip's files by their names as written. Info-ZIP (Linux's ``zip``) and older tools
    store UTF-8 names without the flag that says so, and zipfile then reads them as cp437
    ("ñu" as "├▒u"): such a name is read as UTF-8 when it is valid UTF-8."""
    members = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        name = info.filename
        if not info.flag_bits & ZIP_UTF8_FLAG and not name.isascii():
            with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
                name = name.encode("cp437").decode("utf-8")
        members[name] = info
    return members


def list_zip(path: Path) -> tuple[list[str], int]:
    """Names of the images in the zip (``zip_members``), and how many leading folders to
    strip (0 or 1)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = list(zip_members(zf))
    except (OSError, zipfile.BadZipFile) as e:
        raise KdtoolError(f"cannot read zip file {path}: {e}",
                          "re-create or re-download it") from None
    odd = next((n for n in names if n.startswith("/") or ".." in n.split("/")), None)
    if odd is not None:  # "/x/a.png" made a class named "", "../a.png" was dropped as hidden
        raise KdtoolError(f"zip file {path} holds '{odd}', a path that is absolute or climbs "
                          "out of the archive", "re-create the zip from inside its folder, "
                          "with relative names (cd data && zip -r ../data.zip .)")
    names = sorted(n for n in names
                   if n.lower().endswith(IMAGE_EXTS) and not is_hidden(n.split("/")))
    tops = {n.split("/")[0] for n in names}
    strip = int(len(tops) == 1 and all("/" in n for n in names))
    return names, strip


def relative(names: list[str], strip: int) -> list[str]:
    """A listing's names without the ``strip`` leading folders a zip's wrapper adds."""
    return ["/".join(n.split("/")[strip:]) for n in names]


def classes_of(rels: list[str]) -> list[str]:
    """The class names of ``<class>/...`` relative paths, sorted: from a listing alone (no
    decode, no warnings; what class_labels finds wrong with them it says when loading)."""
    return sorted({class_of(r) for r in rels if "/" in r})


def class_labels(path: Path, rels: list[str], is_dir: bool) -> tuple[list[int], list[str]]:
    """Labels from ``<class>/...`` relative paths; unlabeled when all images are at the top."""
    nested = [r for r in rels if "/" in r]
    if not nested:
        return [-1] * len(rels), []
    classes = classes_of(nested)
    tops = {r.split("/")[0] for r in nested}
    if len(tops) > len(classes):  # macOS (NFD) and other systems (NFC) spell "é" differently
        twins = sorted(t for t in tops if sum(class_of(u) == class_of(t) for u in tops) > 1)
        raise KdtoolError(
            f"{path}: class folders {' and '.join(repr(t) for t in twins[:2])} are one name in "
            "two Unicode forms (composed and decomposed), which would make one class",
            "move the images into one of them and remove the other")
    if all(r.count("/") >= 2 for r in nested):  # no image directly in a class folder
        if {c.lower() for c in classes} <= SPLIT_NAMES:
            raise KdtoolError(
                f"{path} holds splits ({', '.join(classes)}), not classes: its images sit in "
                f"{classes[0]}/<class>/...",
                f"give one split: --data {path / classes[0]}" if is_dir else
                f"zip one split's folder, e.g. {classes[0]}/")
        console.warn(f"{path}: every image sits in a subfolder of its class folder; the "
                     f"classes are the {len(classes)} top folders ({', '.join(classes[:5])}"
                     f"{' ...' if len(classes) > 5 else ''})")
    if is_dir:  # torchvision-style: every subfolder is a class, so an empty one is a mistake
        empty = sorted(d.name for d in path.iterdir()
                       if d.is_dir() and not is_hidden([d.name])
                       and unicodedata.normalize("NFC", d.name) not in classes)
        if empty:
            raise KdtoolError(f"class folder {path / empty[0]} has no images",
                              "add images or remove the folder (it would shift the labels)")
    if len(nested) < len(rels):
        console.warn(f"{path}: ignoring {len(rels) - len(nested)} images outside class folders")
    index = {c: i for i, c in enumerate(classes)}
    return [index[class_of(r)] for r in nested], classes


def why_unlabeled(spec: str) -> str:
    """Why ``spec`` loaded without labels (only called on that error path)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz":
        return "its y is -1 for every image"
    if path.is_file():
        names, strip = list_zip(path)
        if strip:  # one top folder holding images directly is read as a wrapper folder
            top = names[0].split("/")[0]
            return (f"its images all sit in one top folder '{top}/', which is read as a "
                    "folder around unlabeled images (a labeled zip has one folder per class, "
                    f"at least two; for images of class '{top}' alone, zip the folder around "
                    f"'{top}/')")
        return "its images sit at the top of the zip, not in class folders"
    return "its images sit directly in it, not in class subfolders"


def class_of(rel: str) -> str:
    """The class folder of a relative image path, in NFC: macOS writes folder names
    decomposed (NFD), so "ü" would otherwise differ from the model's "ü"."""
    return unicodedata.normalize("NFC", rel.split("/")[0])


class Decoder:
    """Decodes lists of image names from one directory or zip (one per process)."""

    def __init__(self, path: str, is_zip: bool, channels: int | None, size, fit: Fit):
        self.path, self.channels, self.size, self.fit = path, channels, size, fit
        # Opened in each process: a zip handle inherited by fork would share its file offset.
        self.zip = zipfile.ZipFile(path) if is_zip else None
        self.members = zip_members(self.zip) if is_zip else {}

    def close(self) -> None:
        if self.zip:
            self.zip.close()

    def read(self, name: str) -> np.ndarray:
        return self._open(name, lambda im: to_array(im, self.channels, self.size, self.fit))

    def mode(self, name: str) -> str:
        """The image's PIL mode, from its header: no pixels are decoded."""
        return self._open(name, lambda im: im.mode)

    def _open(self, name: str, use):
        where = f"{self.path}:{name}" if self.zip else os.path.join(self.path, name)
        try:
            src = io.BytesIO(self.zip.read(self.members[name])) if self.zip else where
            with Image.open(src) as im:
                return use(im)
        except DECODE_ERRORS as e:
            raise KdtoolError(f"cannot read image {where}: {decode_error_text(e)}",
                              "delete or replace the file, then load again") from None

    def __call__(self, names: list[str]) -> tuple[np.ndarray | None, tuple | None]:
        """Stacked N x H x W x C images, or (None, two names + sizes) when sizes differ."""
        images = [self.read(n) for n in names]
        for n, im in zip(names, images, strict=True):
            if im.shape[:2] != images[0].shape[:2]:
                return None, (names[0], images[0].shape[:2], n, im.shape[:2])
        c = max(im.shape[2] for im in images)
        return np.stack([_promote(im, c) for im in images]), None


def _promote(x: np.ndarray, c: int) -> np.ndarray:
    return np.repeat(x, c, axis=-1) if x.shape[-1] < c else x


_worker: Decoder | None = None


def _init_worker(*args) -> None:
    global _worker
    _worker = Decoder(*args)


def _decode_in_worker(names: list[str]):
    return _worker(names)  # type: ignore[misc]


def decode_images(path: Path, names: list[str], is_zip: bool, channels, size,
                   fit: Fit, progress: bool = True,
                   parallel_from: int | None = None) -> torch.Tensor:
    """Decode ``names`` (files under a dir or members of a zip) into N x C x H x W uint8,
    with a progress bar unless a caller's bar is showing (ImageStream's chunks), in worker
    processes from ``parallel_from`` images (default PARALLEL_MIN_IMAGES)."""
    workers = min(usable_cores(), 8)
    step = max(200, min(2000, len(names) // (workers * 8) + 1))
    chunks = [names[i:i + step] for i in range(0, len(names), step)]
    args = (str(path), is_zip, channels, size, fit)
    # Daemonic processes (e.g. DataLoader workers) cannot start children.
    if parallel_from is None:
        parallel_from = PARALLEL_MIN_IMAGES
    if len(names) < parallel_from or workers == 1 or mp.current_process().daemon:
        with contextlib.closing(Decoder(*args)) as decoder:
            return _gather(path, chunks, map(decoder, chunks), channels, progress)
    # fork skips re-importing torch in each worker; other platforms cannot fork safely.
    ctx = mp.get_context("fork" if sys.platform == "linux" else None)
    with ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=args) as pool:
        try:
            return _gather(path, chunks, pool.map(_decode_in_worker, chunks), channels,
                           progress)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a bad file: don't wait for the rest to decode
            raise


def _gather(path: Path, chunks: list[list[str]], results, channels,
            progress: bool = True) -> torch.Tensor:
    """Copy decoded chunks as they arrive (with progress) into one N x C x H x W tensor,
    checking that sizes agree. Filled in place: a decode peaks at the dataset's size plus a
    chunk, not twice the dataset (chunks kept, then joined, then laid out channels-first)."""
    total = sum(map(len, chunks))
    out: torch.Tensor | None = None
    first, done = None, 0
    bar = (console.progress_task(f"decode {path.name}", total, unit="img") if progress
           else contextlib.nullcontext(lambda n=1, info=None: None))
    with bar as advance:
        for chunk, (x, mismatch) in zip(chunks, results, strict=True):
            if mismatch is None and first is not None and x.shape[1:3] != first[1]:
                mismatch = (first[0], first[1], chunk[0], x.shape[1:3])
            if mismatch is not None:
                a, sa, b, sb = mismatch
                raise KdtoolError(f"images in {path} differ in size: {a} is {sa[1]} wide x "
                                  f"{sa[0]} high, {b} {sb[1]} wide x {sb[0]} high",
                                  "pass --image-size to resize them")
            if out is None:
                first = (chunk[0], x.shape[1:3])
                out = torch.empty((total, channels or x.shape[3], *x.shape[1:3]),
                                  dtype=torch.uint8)
            elif x.shape[3] > out.shape[1]:  # colour after grey, images read as they are
                out = out.expand(-1, x.shape[3], -1, -1).contiguous()
            rows = torch.from_numpy(_promote(x, out.shape[1])).permute(0, 3, 1, 2)
            out[done:done + len(x)] = rows
            done += len(x)
            advance(len(chunk))
    if out is None:
        raise InternalError("no images to decode")
    return out


def labelled(path: Path, names: list[str], strip: int,
             is_zip: bool) -> tuple[list[str], list[int], list[str]]:
    """A listing's images with their labels and the class names; images outside class
    folders are dropped when there are classes."""
    rels = relative(names, strip)
    labels, classes = class_labels(path, rels, not is_zip)
    if classes and len(labels) < len(names):
        names = [n for n, r in zip(names, rels, strict=True) if "/" in r]
    return names, labels, classes


def list_images(path: Path) -> tuple[bool, list[str], int, object]:
    """A folder's or zip's images: (is a zip, their names, the leading path parts a zip's
    common top folder adds, a stamp that changes when the files do)."""
    if path.is_file():
        names, strip = list_zip(path)
        st = path.stat()
        return True, names, strip, (st.st_size, st.st_mtime_ns)
    names, stamp = list_dir(path)
    return False, names, 0, stamp
