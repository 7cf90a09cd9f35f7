"""``/classify``: image bytes -> the model's own preprocessing -> top-k labels.

The pixels come from ``kdtool.imageprep``, the code that training, evaluation and
calibration load images with (convert to L/RGB, fit to the input size by the model's
--resize rule); then pixels / 255 and (x - mean) / std.  imageprep does not import
torch, and neither does the server.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings

import numpy as np
from PIL import Image

from kdtool.deploy.server.protocol import RequestError
from kdtool.errors import message_line
from kdtool.imagefiles import decode_error_text
from kdtool.imageprep import Fit, to_array

FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM"]  # what the dataset loaders read
_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
MAX_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)
MAX_REQUEST_PIXELS = 256_000_000  # all of one request's images: bounds its decoding time
# catch_warnings swaps the process's filters and is not thread-safe, and images are opened
# on worker threads: one at a time (opening reads the header alone: microseconds).
_QUIET_OPEN = threading.Lock()


def decode(data: bytes, what: str = "the request body") -> Image.Image:
    return load(open_image(data, what), what)


def open_image(data: bytes, what: str = "the request body") -> Image.Image:
    """The image's header read (its size checked), its pixels not yet decoded."""
    if not data:
        raise RequestError(f"{what} is empty: no image bytes")
    with _decode_errors(what):
        with _QUIET_OPEN, warnings.catch_warnings():
            # kdtool's limit, below PIL's, is checked next: PIL's warning on stderr for
            # each such upload would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        if im.width * im.height > MAX_PIXELS:
            raise RequestError(
                f"{what} is {im.width}x{im.height}, over the "
                f"{MAX_PIXELS // 1_000_000} megapixel limit"
            )
    return im


def load(im: Image.Image, what: str = "the request body") -> Image.Image:
    with _decode_errors(what):
        im.load()
    return im


def check_request_pixels(opened: list[Image.Image]) -> None:
    """Refuse, before decoding any, images whose decoding would hold the server for
    seconds: each is under MAX_PIXELS, but a request may send many."""
    total = sum(im.width * im.height for im in opened)
    if total > MAX_REQUEST_PIXELS:
        raise RequestError(
            f"the request's {len(opened)} images hold {total / 1e6:.0f} megapixels, over "
            f"the {MAX_REQUEST_PIXELS // 1_000_000} megapixel limit of one request: send "
            "fewer images a request, or downscale them (the model sees them at its input "
            "size)", 413)


@contextlib.contextmanager
def _decode_errors(what: str):
    try:
        yield
    except (RequestError, MemoryError):  # a full server is not a bad image
        raise
    except Image.DecompressionBombError:  # over twice PIL's limit: refused before its size
        raise RequestError(f"{what} is over the {MAX_PIXELS // 1_000_000} megapixel limit"
                           ) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        reason = message_line(e, 200) or type(e).__name__
        reason = _BUFFER_REPR.sub("", reason)  # PIL names the in-memory buffer, not the data
        raise RequestError(
            f"{what} is not a decodable image ({', '.join(FORMATS)}): {reason}"
        ) from None


def preprocess(im: Image.Image, info, dtype: np.dtype,
               what: str = "the request body") -> np.ndarray:
    """One image as the model's input row: (C, H, W) or (H, W, C), normalised, in ``dtype``."""
    try:
        pixels = to_array(im, info.in_chans, tuple(info.input_size), Fit.of(info))
    except (ValueError, OSError) as e:  # decoded, but not convertible (float, LAB, ...)
        raise RequestError(f"{what} decodes but cannot be converted to the model's input: "
                           f"{decode_error_text(e)}") from None
    x = pixels.astype(np.float32) / 255.0
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
