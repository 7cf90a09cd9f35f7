"""kdtool serve: /classify takes image bytes and applies the model's own preprocessing."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from kdtool.data import load_for_model
from kdtool.deploy.server import images
from kdtool.export.metadata import read_info
from kdtool.imageprep import STRETCH, Fit, to_array

URL = "/v2/models/rgb/classify"


@pytest.fixture(scope="module")
def rgb_server(serve_model, rgb_nhwc_onnx):
    with serve_model(rgb_nhwc_onnx, name="rgb") as srv:
        yield srv


def _image(mode: str = "RGB", size=(20, 24), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


def _bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _expected(path, im: Image.Image, offline) -> np.ndarray:
    """Training-time preprocessing (kdtool.data), offline ORT, softmax."""
    info = read_info(path)
    hwc = to_array(im, info.in_chans, tuple(info.input_size)).astype(np.float32) / 255
    x = (hwc - np.asarray(info.mean)) / np.asarray(info.std)
    x = x[None] if info.layout == "NHWC" else x.transpose(2, 0, 1)[None]
    z = offline(path, x.astype(np.float32))[0].astype(np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("onnx_fixture", ["tiny_onnx", "rgb_nhwc_onnx"])
@pytest.mark.parametrize("fit", [STRETCH, Fit(0.875), Fit(None, "bicubic")])
@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
def test_preprocess_matches_kdtool_data(mode, onnx_fixture, fit, request, tmp_path):
    """The server's pixels are those 'kdtool eval' loads from the same file."""
    info = read_info(request.getfixturevalue(onnx_fixture))
    info.crop_fraction, info.interpolation = fit.crop_fraction, fit.interpolation
    im = _image(mode, size=(13, 9))
    (tmp_path / "images").mkdir()
    im.save(tmp_path / "images" / "one.png")
    got = images.preprocess(im, info, np.dtype(np.float32))
    loaded = load_for_model(str(tmp_path / "images"), info).x[0].numpy().transpose(1, 2, 0)
    hwc = loaded.astype(np.float32) / 255
    want = (hwc - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    want = want if info.layout == "NHWC" else want.transpose(2, 0, 1)
    np.testing.assert_array_equal(got, want)


def test_classify_png_jpeg_multipart(rgb_server, rgb_nhwc_onnx, offline):
    png, jpeg = _image("RGB", seed=1), _image("L", size=(40, 30), seed=2)
    jpeg_bytes = _bytes(jpeg, "JPEG")
    with httpx.Client(base_url=rgb_server.url) as c:
        r = c.post(URL, content=_bytes(png), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        preds = result["predictions"]
        assert len(preds) == 5  # default top_k 5, capped at the model's 5 classes
        p = _expected(rgb_nhwc_onnx, png, offline)
        assert [d["index"] for d in preds] == list(np.argsort(-p, kind="stable"))
        assert preds[0]["label"] == ["cat", "dog", "fox", "owl", "yak"][int(np.argmax(p))]
        np.testing.assert_allclose(
            [d["probability"] for d in preds], np.sort(p)[::-1], rtol=1e-5, atol=1e-6
        )

        r = c.post(
            URL + "?top_k=2",
            files=[
                ("file", ("a.png", _bytes(png), "image/png")),
                ("note", (None, "not a file")),
                ("file", ("b.jpg", jpeg_bytes, "image/jpeg")),
            ],
        )
        assert r.status_code == 200, r.text
        a, b = r.json()["results"]
        assert (a["filename"], b["filename"]) == ("a.png", "b.jpg")
        assert len(a["predictions"]) == 2 and a["predictions"] == preds[:2]
        pj = _expected(rgb_nhwc_onnx, Image.open(io.BytesIO(jpeg_bytes)), offline)
        assert b["predictions"][0]["index"] == int(np.argmax(pj))
        assert b["predictions"][0]["probability"] == pytest.approx(pj.max(), abs=1e-5)


@pytest.mark.parametrize(
    ("query", "body", "headers", "message"),
    [
        ("", b"definitely not an image", {}, "not a decodable image"),
        ("", b"", {}, "is empty"),
        ("", _bytes(_image())[:60], {}, "not a decodable image"),  # truncated PNG
        ("?top_k=0", _bytes(_image()), {}, "top_k '0' must be a whole number from 1 to 5"),
        ("?top_k=six", _bytes(_image()), {}, "top_k 'six'"),
        (
            "",
            b"--xx\r\nContent-Disposition: form-data; name=a\r\n\r\nhi\r\n--xx--\r\n",
            {"Content-Type": "multipart/form-data; boundary=xx"},
            "no file part",
        ),
        (
            "",
            b"--xx\r\nbroken",
            {"Content-Type": "multipart/form-data; boundary=xx"},
            "no header/body separator",
        ),
        ("", b"abc", {"Content-Type": "multipart/form-data"}, "without a boundary"),
        (
            "",
            b'--xx\r\nContent-Disposition: form-data; name=f; filename="x.png"\r\n\r\nGIF89'
            b"\r\n--xx--\r\n",
            {"Content-Type": "multipart/form-data; boundary=xx"},
            "image 'x.png' is not a decodable image",
        ),
        # decodes, but has no conversion to the model's input: was a 500
        ("", _bytes(Image.fromarray(np.zeros((8, 8), np.float32)), "TIFF"), {},
         "decodes but cannot be converted to the model's input: a 32-bit float image"),
    ],
)
def test_classify_errors_are_400(rgb_server, query, body, headers, message):
    with httpx.Client(base_url=rgb_server.url) as c:
        r = c.post(URL + query, content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]
        assert "BytesIO" not in r.json()["error"]  # PIL's name for the buffer means nothing


def test_serve_decodes_every_format_the_dataset_loaders_read(tmp_path):
    """A model evaluated on a folder of .ppm (or .gif) files is served those files too."""
    from kdtool.imagefiles import IMAGE_EXTS

    im = _image("RGB", size=(5, 4))
    for ext in IMAGE_EXTS:
        path = tmp_path / f"x{ext}"
        (im.convert("L") if ext == ".pgm" else im).save(path)
        assert images.decode(path.read_bytes(), path.name).size == (5, 4), ext


def test_classify_takes_compressed_uploads(rgb_server):
    """Content-Encoding applies to /classify as to /infer: raw and multipart bodies alike."""
    import gzip
    import zlib

    png = _bytes(_image("RGB", seed=3))
    multipart = (
        b'--xx\r\nContent-Disposition: form-data; name=file; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--xx--\r\n"
    )
    form = {"Content-Type": "multipart/form-data; boundary=xx"}
    with httpx.Client(base_url=rgb_server.url) as c:
        plain = c.post(URL, content=png, headers={"Content-Type": "image/png"})
        assert plain.status_code == 200, plain.text
        want = plain.json()["results"][0]["predictions"]
        for encoding, packed in [
            ("gzip", gzip.compress(png)),
            ("GZIP", gzip.compress(png)),
            ("deflate", zlib.compress(png)),
            ("identity", png),
        ]:
            r = c.post(URL, content=packed, headers={"Content-Encoding": encoding})
            assert r.status_code == 200, (encoding, r.text)
            assert r.json()["results"][0]["predictions"] == want, encoding

        gzipped_form = form | {"Content-Encoding": "gzip"}
        r = c.post(URL, content=gzip.compress(multipart), headers=gzipped_form)
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result == {"filename": "a.png", "predictions": want}

        for body, headers in [(png, {}), (multipart, form)]:  # not gzip, though it says so
            r = c.post(URL, content=body, headers=headers | {"Content-Encoding": "gzip"})
            assert r.status_code == 400, r.text
            assert "the gzip request body does not decompress" in r.json()["error"]
        r = c.post(URL, content=gzip.compress(png)[:-20], headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and "truncated" in r.json()["error"]
        r = c.post(URL, content=png, headers={"Content-Encoding": "br"})  # as /infer: 415
        assert r.status_code == 415, r.text
        assert r.json()["error"] == "Content-Encoding 'br' is not supported; use gzip or deflate"


def test_compressed_bodies_inflate_off_the_event_loop(rgb_server, monkeypatch):
    """A 16 MB inflate on the loop would stall every other request for tens of ms."""
    import asyncio
    import gzip

    from kdtool.deploy.server import protocol

    on_loop = []
    real = protocol.decompress

    def spy(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop here: an executor thread
            on_loop.append(False)
        return real(*args)

    monkeypatch.setattr(protocol, "decompress", spy)
    png = _bytes(_image("RGB", seed=3))
    with httpx.Client(base_url=rgb_server.url) as c:
        r = c.post(URL, content=gzip.compress(png), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert on_loop == [False]


def _png_header(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header says it is ``width`` x ``height``: what a
    decompression bomb sends."""
    import struct
    import zlib

    png = bytearray(_bytes(Image.new("L", (1, 1))))
    png[16:24] = struct.pack(">II", width, height)  # IHDR's data starts at byte 16
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.mark.parametrize("size", [(8001, 8001), (10800, 10000), (20000, 20000)])
def test_images_over_the_megapixel_limit_are_refused_quietly_before_decoding(size):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)  # after the filters in force
        with pytest.raises(images.RequestError, match="over the 64 megapixel limit"):
            images.decode(_png_header(*size), "image 'big.png'")
    # PIL warns above its own limit (89 MP) and refuses above twice it: neither reaches stderr
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decoding_on_many_threads_leaves_the_warning_filters_as_they_were():
    """serve decodes on worker threads, and catch_warnings is not thread-safe: opening is
    serialised, so the process's filters end as they began."""
    import sys
    import threading
    import warnings

    png = _bytes(_image())
    before = list(warnings.filters)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=lambda: [images.decode(png) for _ in range(300)])
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert warnings.filters == before
