"""``/classify``: image bytes -> the model's own preprocessing -> top-k labels.

The preprocessing mirrors ``kdtool.data._prepare`` (the one used in training and
evaluation: convert to L/RGB, bilinear resize to the input size, pixels / 255, then
(x - mean) / std); it is repeated here so that the server does not import torch, and
tests/deploy check that both give the same pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kdtool.deploy.server.protocol import RequestError

FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]
MAX_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}


def decode(data: bytes, what: str = "the request body") -> Image.Image:
    if not data:
        raise RequestError(f"{what} is empty; send JPEG or PNG bytes")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        if im.width * im.height > MAX_PIXELS:
            raise RequestError(
                f"{what} is {im.width}x{im.height}, over the "
                f"{MAX_PIXELS // 1_000_000} megapixel limit"
            )
        im.load()
    except RequestError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RequestError(
            f"{what} is not a decodable image ({', '.join(FORMATS)}): {reason}"
        ) from None
    return im


def preprocess(im: Image.Image, info, dtype: np.dtype) -> np.ndarray:
    """One image as the model's input row: (C, H, W) or (H, W, C), normalised, in ``dtype``."""
    h, w = info.input_size
    if im.mode.startswith("I"):  # 16/32-bit grayscale: scale to 8 bits (PIL's convert clips)
        im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    mode = "L" if info.in_chans == 1 else "RGB"
    if im.mode != mode:
        im = im.convert(mode)
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)  # PIL antialiases when shrinking
    x = np.asarray(im, dtype=np.float32) / 255.0
    if x.ndim == 2:
        x = x[..., None]
    x = (x - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    if info.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=dtype)


def top_k(logits: np.ndarray, k: int, names: list[str]) -> list[dict]:
    """Softmax probabilities of the k most likely classes, most likely first."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    return [{"label": names[i], "index": int(i), "probability": float(p[i])} for i in order]


def multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """The (filename, bytes) of each file part of a multipart/form-data body, in order."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise RequestError("multipart body without a boundary in its Content-Type")
    files = []
    for i, part in enumerate(body.split(b"--" + boundary.encode())[1:]):
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(f"multipart part {i + 1} has no header/body separator")
        headers = head.decode("latin-1").lower()
        if "filename=" not in headers and "content-type: image/" not in headers:
            continue  # a plain form field, not an image
        files.append(
            (_filename(head.decode("latin-1")) or f"part{i + 1}", content.removesuffix(b"\r\n"))
        )
    if not files:
        raise RequestError(
            "the multipart body has no file part; send the image as -F file=@image.jpg"
        )
    return files


def _filename(head: str) -> str | None:
    for line in head.split("\r\n"):
        if line.lower().startswith("content-disposition:"):
            for param in line.split(";")[1:]:
                key, _, value = param.strip().partition("=")
                if key.lower() == "filename":
                    return value.strip('"')
    return None
