"""Image files on disk: which names are images, how a folder is listed, and what a broken
file raises. No torch here, so that predict and serve list and read images without it."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from kdtool import console
from kdtool.errors import KdtoolError

IMAGE_EXTS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp",
              ".gif")  # a GIF is its first frame, as kdtool serve and predict read it
# What a broken image file can raise from PIL / zipfile while it is decoded.
# RuntimeError: an encrypted zip member; NotImplementedError: a compression method Python's
# zipfile cannot read (Deflate64, as Windows writes for large archives).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error,
                  Image.DecompressionBombError, RuntimeError, NotImplementedError)

def decode_error_text(e: BaseException) -> str:
    """Why an image did not decode, without Pillow's repr of an in-memory stream."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format Pillow recognises, or a damaged file"
    return str(e)


def is_hidden(parts: list[str]) -> bool:
    # __MACOSX holds resource forks that macOS's zip tool adds next to the real files.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def list_dir(root: Path, exts: tuple[str, ...] = IMAGE_EXTS) -> tuple[list[str], list[tuple]]:
    """Image paths relative to ``root`` (posix), and (path, size, mtime_ns) for the cache key."""
    names, stamp = [], []
    top = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames
                       if not is_hidden([d]) and not _links_within(dirpath, d, top)]
        rel = Path(dirpath).relative_to(root).as_posix()
        for f in filenames:
            if f.lower().endswith(exts) and not is_hidden([f]):
                name = f if rel == "." else f"{rel}/{f}"
                try:
                    st = os.stat(os.path.join(dirpath, f))
                except OSError as e:  # a dangling symlink, a file gone since the listing
                    raise KdtoolError(f"cannot read image {root / name}: {e.strerror}",
                                      "delete or replace the file, then load again") from None
                names.append(name)
                stamp.append((name, st.st_size, st.st_mtime_ns))
    return sorted(names), sorted(stamp)


def _links_within(dirpath: str, name: str, top: str) -> bool:
    """Whether subfolder ``name`` is a symlink to a folder of the same tree (``top``, real):
    back up it (``up -> ..``), followed until the path grew too long, or across it
    (``cat/dogs -> ../dog``), which listed the images under two classes. The real folder is
    listed by its own path; links out of the tree (a class folder kept elsewhere) are
    followed."""
    link = os.path.join(dirpath, name)
    if not os.path.islink(link):
        return False
    target = os.path.realpath(link)
    if target != top and not target.startswith(top.rstrip(os.sep) + os.sep):
        return False
    console.warn(f"skipping {Path(link)}: a link to {target}, which this folder lists "
                 "already", once=True)
    return True


def image_files(root: Path, exts: tuple[str, ...] = IMAGE_EXTS) -> list[Path]:
    """The images in ``root`` and its subfolders as the folder loaders find them (hidden
    files and folders skipped), sorted; ``exts``: the file name endings taken."""
    return [root / name for name in list_dir(root, exts)[0]]
