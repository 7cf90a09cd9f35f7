"""How one image file becomes a model's input pixels: mode, then size.

Shared by data loading (training, evaluation, calibration, export) and the
inference server, so that a served model sees exactly the pixels it was
evaluated on.  Torch-free on purpose: the server does not import torch.

Two ways to fit an image to a model's H x W input (a checkpoint records which,
as ``crop_fraction``, and the ``interpolation`` of its resizes, bilinear or bicubic):

* **stretch** (``crop_fraction`` None): a resize to H x W.  For data
  already at the model's size (CIFAR, digits) it changes nothing.
* **crop** (``crop_fraction`` F in (0, 1]): resize, keeping the aspect ratio,
  until the image covers floor(H / F) x floor(W / F), then take the centre
  H x W.  For a square input this is torchvision's ImageNet evaluation
  ``Resize(floor(S / F))`` + ``CenterCrop(S)`` pixel for pixel (F = 0.875:
  resize the shorter side to 256, crop 224), timm's ``crop_pct``.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from kdtool.errors import KdtoolError, check_choice, suggest

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}
RESIZE_MODES = ("stretch", "crop")
EXIF_ORIENTATION = 0x0112  # 1: upright; 2-8: mirrored and/or rotated, as cameras save photos


def parse_resize(text: str) -> float | None:
    """``stretch`` -> None, ``crop`` -> 1.0, ``crop:F`` -> F (0 < F <= 1)."""
    mode, sep, value = text.strip().partition(":")
    if mode not in RESIZE_MODES or (mode == "stretch" and sep):
        guess = suggest(mode, RESIZE_MODES)
        raise KdtoolError(f"unknown --resize value '{text}'",
                          f"did you mean '{guess}'?" if guess else
                          "use stretch, crop or crop:F with 0 < F <= 1, e.g. crop:0.875")
    if mode == "stretch":
        return None
    if not sep:
        return 1.0
    try:
        fraction = float(value)
    except ValueError:
        fraction = math.nan
    check_crop_fraction(fraction, f"--resize {text}")
    return fraction


def check_crop_fraction(fraction: float | None, what: str) -> None:
    if fraction is not None and not 0 < fraction <= 1:  # also refuses NaN
        raise KdtoolError(f"{what}: the crop fraction must be in (0, 1], got {fraction}",
                          "e.g. crop:0.875 (resize 256, crop 224) or crop (crop:1)")


def record_problems(model) -> list[str]:
    """What is wrong with a model record's input and class fields: a checkpoint's ModelMeta
    or an ONNX file's OnnxInfo (here, as the ONNX side must not import torch)."""
    problems = []
    for name, top in (("num_classes", MAX_CLASSES), ("in_chans", MAX_CHANNELS)):
        value = getattr(model, name)
        if not _is_int(value) or not 1 <= value <= top:
            problems.append(f"{name} must be a whole number from 1 to {top:,}, got {value!r}")
    if problems:  # the checks below count with them
        return problems
    if not all(isinstance(v, (list, tuple)) for v in (model.mean, model.std,
                                                       model.class_names, model.input_size)):
        return ["mean, std, class_names and input_size must be lists"]
    if not all(isinstance(n, str) for n in model.class_names):
        problems.append("class names must be strings")
    if len(model.mean) != model.in_chans or len(model.std) != model.in_chans:
        problems.append(f"mean/std need {model.in_chans} values")
    if not all(isinstance(v, (int, float)) and math.isfinite(v)
               for v in (*model.mean, *model.std)):
        problems.append("mean/std must be finite numbers")
    elif any(s <= 0 for s in model.std):  # std 0 turns every pixel into inf or NaN
        problems.append("std must be positive")
    if model.class_names and len(model.class_names) != model.num_classes:
        problems.append(f"{len(model.class_names)} class names for {model.num_classes} classes")
    twice = repeated_name(model.class_names)
    if twice is not None:
        problems.append(f"class name '{twice}' appears twice")
    if len(model.input_size) != 2 or not all(_is_int(s) and 0 < s <= MAX_SIDE
                                             for s in model.input_size):
        problems.append(f"input_size must be [height, width], each from 1 to {MAX_SIDE:,}")
    try:
        Fit.of(model)
    except KdtoolError as e:
        problems.append(str(e))
    return problems


# Bounds on a model record's sizes: a crafted file asking for 10**9 classes made the
# loader try to allocate 512 GB before any tensor was compared.
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 1024
MAX_SIDE = 16384


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def repeated_name(names: list[str]) -> str | None:
    """The first class name that appears twice (as Unicode NFC, how folders are matched):
    data matched to the classes by name would score one class's images against the other."""
    seen = set()
    for name in names:
        key = unicodedata.normalize("NFC", name) if isinstance(name, str) else name
        if key in seen:
            return key
        seen.add(key)
    return None


def describe_resize(crop_fraction: float | None) -> str:
    if crop_fraction is None:
        return "stretch"
    return "crop" if crop_fraction == 1 else f"crop:{crop_fraction:g}"


@dataclass(frozen=True)
class Fit:
    """How images of another size are fitted to a model's input (module docstring)."""

    crop_fraction: float | None = None  # None: stretch
    interpolation: str = "bilinear"

    def __post_init__(self):
        check_crop_fraction(self.crop_fraction, "crop_fraction")
        check_choice(self.interpolation, INTERPOLATIONS, "interpolation")

    @classmethod
    def of(cls, model) -> Fit:
        """The rule a model records (a ModelMeta, an ONNX file's OnnxInfo, ...)."""
        return cls(model.crop_fraction, model.interpolation)

    def cache_key(self) -> list:
        return [] if self == STRETCH else [self.crop_fraction, self.interpolation]

    def describe(self) -> str:
        """As the options that give this rule, e.g. '--resize crop:0.875'."""
        text = f"--resize {describe_resize(self.crop_fraction)}"
        return text if self.interpolation == "bilinear" else \
            f"{text} --interpolation {self.interpolation}"

    def explain(self, size: tuple[int, int] | list[int]) -> str:
        """What the rule does to images for a ``size`` (height, width) input, in words."""
        h, w = size
        if self.crop_fraction is None:
            return f"{self.describe()}: images resized to {h}x{w}; images already {h}x{w} " \
                   "are used as they are"
        cover = "x".join(str(math.floor(s / self.crop_fraction + 1e-9)) for s in (h, w))
        return f"{self.describe()}: every image, even one already {h}x{w}, is resized to " \
               f"cover {cover} and centre-cropped to {h}x{w}"

    def apply(self, im: Image.Image, size: tuple[int, int]) -> Image.Image:
        """``im`` fitted to ``size`` (height, width) by stretching or by a centre crop."""
        h, w = size
        how = INTERPOLATIONS[self.interpolation]  # PIL antialiases when shrinking
        if self.crop_fraction is None:
            return im if im.size == (w, h) else im.resize((w, h), how)
        src_w, src_h = im.size
        cover_h, cover_w = (math.floor(s / self.crop_fraction + 1e-9) for s in (h, w))
        # The side that needs the larger scale sets it; the other keeps the aspect ratio:
        # truncated for a square input, as torchvision's Resize(int) (timm's too), rounded
        # for a non-square one, as timm's ResizeKeepRatio (torchvision has no such case).
        keep = int if h == w else round
        if cover_h * src_w >= cover_w * src_h:
            new_h, new_w = cover_h, keep(cover_h * src_w / src_h)
        else:
            new_h, new_w = keep(cover_w * src_h / src_w), cover_w
        if (new_w, new_h) != im.size:
            im = im.resize((new_w, new_h), how)
        top, left = round((new_h - h) / 2.0), round((new_w - w) / 2.0)  # as torchvision rounds
        return im.crop((left, top, left + w, top + h))


STRETCH = Fit()


def upright(im: Image.Image) -> Image.Image:
    """``im`` as it is displayed: turned by its EXIF orientation tag, if it has one.

    Phones store photos as the sensor read them plus a tag saying how to turn them; every
    viewer honours it, so a model must too, or it classifies photos lying on their side.
    """
    if im.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
        return im  # no copy: most images (CIFAR, scans, PNGs) carry no turn
    return ImageOps.exif_transpose(im)


def to_array(im: Image.Image, channels: int | None, size: tuple[int, int] | None,
             fit: Fit = STRETCH) -> np.ndarray:
    """A PIL image as H x W x C uint8, upright (EXIF orientation): grayscale (C=1) unless it
    has colour or channels=3, fitted to ``size`` when one is given."""
    im = upright(im)
    target = channels or (1 if im.mode in GRAY_MODES else 3)
    if im.mode == "F":  # PIL's convert would clip 0..1 floats to black
        raise ValueError("a 32-bit float image has no standard pixel scale; save it as 8- or "
                         "16-bit")
    if im.mode.startswith("I"):  # 16/32-bit grayscale: scale to 8 bits (PIL's convert clips)
        a = np.asarray(im).astype(np.int64)
        # A 32-bit "I" image has no declared range: one holding 0..255 is 8-bit data (what
        # Image.fromarray makes of an int array), not a near-black 16-bit image.
        eight_bit = im.mode == "I" and a.min(initial=0) >= 0 and a.max(initial=0) <= 255
        im = Image.fromarray((a if eight_bit else a.clip(0, 65535) >> 8).astype(np.uint8))
    mode = "L" if target == 1 else "RGB"
    if im.mode != mode:
        im = im.convert(mode)
    if size is not None:
        im = fit.apply(im, size)
    arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr
