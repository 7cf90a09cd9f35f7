"""kdtool.data: built-in digits, ImageFolder directories and zips, npz, the decode cache, errors."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdtool import imagefolder
from kdtool.data import BUILTIN_DATASETS, ImageData, check_fits, load_data
from kdtool.errors import KdtoolError
from kdtool.imageprep import to_array

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Every test caches under its own tmp dir, never ~/.cache."""
    monkeypatch.setenv("KDTOOL_CACHE", str(tmp_path / "cache"))


def _save(path: Path, shape=(8, 8, 3), value=None) -> np.ndarray:
    """Write a random (or constant) uint8 image; return its pixels (HWC or HW)."""
    arr = np.full(shape, value, np.uint8) if value is not None else \
        RNG.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _decoded(path: Path, mode: str) -> np.ndarray:
    """What PIL itself decodes from ``path`` in ``mode``, as HWC."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert(mode))
    return arr[..., None] if arr.ndim == 2 else arr


def _rgb_folder(root: Path) -> Path:
    """Two classes, JPEG and PNG, plus files that must be ignored."""
    _save(root / "dog" / "b.PNG")
    _save(root / "dog" / "a.jpg")
    _save(root / "cat" / "x.jpeg")
    _save(root / "cat" / ".hidden.png")
    _save(root / ".git" / "c.png")
    _save(root / "stray.png")  # outside the class folders: ignored, with a warning
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def _zip(src: Path, dest: Path, top: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, top + f.relative_to(src).as_posix())
        zf.writestr("__MACOSX/cat/._x.jpeg", b"resource fork")
    return dest


def _same(a: ImageData, b: ImageData) -> bool:
    return torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.class_names == b.class_names


# ----------------------------------------------------------------------------- digits


def test_digits_split():
    train, test = load_data("digits"), load_data("digits:test")
    assert set(BUILTIN_DATASETS) == {"digits", "digits:train", "digits:test"}
    assert (len(train), len(test)) == (1437, 360)
    for d in (train, test):
        assert d.x.dtype == torch.uint8 and d.y.dtype == torch.int64 and d.x.is_contiguous()
        assert d.x.shape[1:] == (1, 8, 8) and d.image_size == (8, 8) and d.channels == 1
        assert d.class_names == [str(i) for i in range(10)] and d.labeled
    assert int(train.x.max()) == 255 and int(train.x.min()) == 0
    assert sorted(Counter(test.y.tolist()).values())[0] >= 35  # stratified: ~36 per class

    # Together the splits are exactly the whole data set (a partition: disjoint, complete).
    from sklearn.datasets import load_digits

    full = load_digits()
    expected = np.rint(full.images * 255 / 16).astype(np.uint8)
    rows = lambda xs, ys: Counter((x.tobytes(), int(y)) for x, y in zip(xs, ys, strict=True))  # noqa: E731
    assert rows(train.x.numpy(), train.y) + rows(test.x.numpy(), test.y) == \
        rows(expected[:, None], full.target)
    assert _same(load_data("digits:train"), train)  # deterministic, and digits = digits:train


def test_the_stored_digits_split_is_scikit_learns_and_loads_without_it(monkeypatch, tmp_path):
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from kdtool import digits

    y = load_digits().target
    _, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    assert np.array_equal(np.flatnonzero(digits.held_out_mask()), np.sort(test))
    # scikit-learn is not imported (1.2 s of every digits command's start-up)
    code = ("import sys; from kdtool.data import load_data; load_data('digits:test'); "
            "assert 'sklearn' not in sys.modules, 'imported sklearn'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # without the CSV file, scikit-learn's loader gives the same images
    pixels, labels = digits.load_split("test")
    monkeypatch.setattr(digits.Path, "is_file", lambda self: False)
    p2, l2 = digits.load_split("test")
    assert np.array_equal(pixels, p2) and np.array_equal(labels, l2)


def test_other_digits_than_the_split_was_made_for_are_refused(monkeypatch, tmp_path):
    import gzip
    import types

    from kdtool import digits

    package = tmp_path / "sklearn"
    (package / "datasets/data").mkdir(parents=True)
    with gzip.open(package / "datasets/data/digits.csv.gz", "wt") as f:
        f.write("\n".join(",".join(["1"] * 65) for _ in range(1797)))
    spec = types.SimpleNamespace(submodule_search_locations=[str(package)])
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(KdtoolError, match="not the one kdtool's fixed split was made for"):
        digits.load_split("train")
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KdtoolError, match="pip install scikit-learn"):
        digits.load_split("train")


def test_digits_convert():
    d = load_data("digits:test", image_size=16, channels=3)
    assert d.x.shape == (360, 3, 16, 16)
    assert torch.equal(d.x[:, 0], d.x[:, 2])


# ----------------------------------------------------------------------------- files


def test_image_folder_rgb(tmp_path):
    root = _rgb_folder(tmp_path / "ds")
    d = load_data(str(root))
    assert d.source == str(root) and d.class_names == ["cat", "dog"] and d.num_classes == 2
    assert d.y.tolist() == [0, 1, 1]  # sorted by relative path: cat/x, dog/a, dog/b
    assert d.x.shape == (3, 3, 8, 8) and d.x.is_contiguous()
    for i, f in enumerate(["cat/x.jpeg", "dog/a.jpg", "dog/b.PNG"]):
        assert np.array_equal(d.x[i].permute(1, 2, 0).numpy(), _decoded(root / f, "RGB"))
    gray = load_data(str(root), channels=1)
    assert gray.channels == 1
    assert np.array_equal(gray.x[2, 0].numpy(), _decoded(root / "dog/b.PNG", "L")[..., 0])


def test_grayscale_folder(tmp_path):
    src = _save(tmp_path / "g" / "a" / "1.png", (6, 5))
    _save(tmp_path / "g" / "b" / "2.png", (6, 5))
    big = (RNG.integers(0, 65536, (6, 5))).astype(np.uint16)
    Image.fromarray(big).save(tmp_path / "g" / "b" / "3.png")  # 16-bit: opens as "I;16"
    d = load_data(str(tmp_path / "g"))
    assert d.x.shape == (3, 1, 6, 5) and d.image_size == (6, 5)
    assert np.array_equal(d.x[0, 0].numpy(), src)
    assert np.array_equal(d.x[2, 0].numpy(), (big >> 8).astype(np.uint8))
    rgb = load_data(str(tmp_path / "g"), channels=3)
    assert rgb.channels == 3 and torch.equal(rgb.x[:, 0], d.x[:, 0])


def test_gray_and_rgb_mixed_gives_rgb(tmp_path):
    _save(tmp_path / "m" / "a" / "1.png", (4, 4))
    _save(tmp_path / "m" / "a" / "2.png", (4, 4, 3))
    d = load_data(str(tmp_path / "m"))
    assert d.channels == 3 and torch.equal(d.x[0, 0], d.x[0, 1])


@pytest.mark.parametrize("top", ["", "dataset/"])
def test_zip_matches_folder(tmp_path, top):
    root = _rgb_folder(tmp_path / "ds")
    z = _zip(root, tmp_path / "ds.zip", top)
    assert _same(load_data(str(z)), load_data(str(root)))


def test_unlabeled_folder_and_zip(tmp_path):
    for i in range(3):
        _save(tmp_path / "calib" / f"{i}.png")
    d = load_data(str(tmp_path / "calib"))
    assert not d.labeled and d.class_names == [] and d.y.tolist() == [-1, -1, -1]
    assert d.num_classes == 0 and len(d) == 3
    # A zip of one folder of images: the folder is the top folder, not a class.
    z = _zip(tmp_path / "calib", tmp_path / "c.zip", "calib/")
    assert _same(load_data(str(z)), d)
    # Where labels are needed, the error says why the data read as unlabeled: a zip of one
    # class folder is ambiguous with a wrapper folder, and the user would not guess that.
    with pytest.raises(KdtoolError, match="one top folder 'calib/'.*at least two; for "
                                          "images of class 'calib' alone, zip the folder "
                                          "around 'calib/'"):
        load_data(str(z)).require_labels("dataset")
    wrapped = _zip(tmp_path / "calib", tmp_path / "w.zip", "around/calib/")  # as the hint says
    assert load_data(str(wrapped)).class_names == ["calib"]
    with pytest.raises(KdtoolError, match="directly in it, not in class subfolders"):
        d.require_labels("--val")
    np.savez(tmp_path / "u.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.full(2, -1))
    with pytest.raises(KdtoolError, match="y is -1 for every image"):
        load_data(str(tmp_path / "u.npz")).require_labels("dataset")


def test_npz(tmp_path):
    x = RNG.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 2, 1, 2, 0]),
             class_names=np.array(["a", "b", "c"]))
    d = load_data(str(tmp_path / "a.npz"))
    assert np.array_equal(d.x.permute(0, 2, 3, 1).numpy(), x)
    assert d.y.dtype == torch.int64 and d.y.tolist() == [0, 2, 1, 2, 0]
    assert d.class_names == ["a", "b", "c"]

    np.savez(tmp_path / "g.npz", x=x[..., 0], y=np.array([1, 0, 1, 0, 1], np.int32))
    g = load_data(str(tmp_path / "g.npz"))
    assert g.x.shape == (5, 1, 4, 4) and g.class_names == ["0", "1"]
    np.savez(tmp_path / "u.npz", x=x, y=np.full(5, -1))
    assert not load_data(str(tmp_path / "u.npz")).labeled
    assert load_data(str(tmp_path / "a.npz"), image_size=(2, 3)).image_size == (2, 3)


def test_subset_and_stats():
    d = load_data("digits:test")
    s = d.subset(torch.tensor([3, 1]))
    assert torch.equal(s.x, d.x[[3, 1]]) and s.class_names == d.class_names
    assert len(d.subset(slice(0, 360, 2))) == 180 and d.subset(slice(0, 360, 2)).x.is_contiguous()
    x = RNG.integers(0, 256, (50, 3, 5, 5), dtype=np.uint8)
    mean, std = ImageData(torch.from_numpy(x), torch.zeros(50, dtype=torch.int64)).channel_stats()
    xf = x.astype(np.float64) / 255
    assert np.allclose(mean, xf.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(std, xf.std(axis=(0, 2, 3)), atol=1e-12)


# ----------------------------------------------------------------------------- sizes


def test_mixed_sizes(tmp_path):
    _save(tmp_path / "s" / "a" / "1.png", (8, 8, 3))
    _save(tmp_path / "s" / "a" / "2.png", (6, 9, 3))
    with pytest.raises(KdtoolError,
                       match=r"1\.png is 8 wide x 8 high.*2\.png 9 wide x 6 high") as e:
        load_data(str(tmp_path / "s"))
    assert "--image-size" in e.value.hint
    d = load_data(str(tmp_path / "s"), image_size=4)
    assert d.x.shape == (2, 3, 4, 4)
    with Image.open(tmp_path / "s" / "a" / "2.png") as im:
        expected = np.asarray(im.resize((4, 4), Image.BILINEAR))
    assert np.array_equal(d.x[1].permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("parallel", [False, True])
def test_many_chunks(tmp_path, monkeypatch, parallel):
    """Enough images for several decode chunks, in process and in worker processes."""
    if parallel:
        monkeypatch.setattr(imagefolder, "PARALLEL_MIN_IMAGES", 0)
    for i in range(450):
        _save(tmp_path / "d" / f"{i % 2}" / f"{i:03d}.png", (4, 4), value=i % 251)
    _save(tmp_path / "d" / "1" / "999.png", (4, 4, 3), value=7)  # one RGB image, in the last chunk
    d = load_data(str(tmp_path / "d"))
    assert d.x.shape == (451, 3, 4, 4) and d.y.tolist() == [0] * 225 + [1] * 226
    assert d.x[0].unique().tolist() == [0] and d.x[225].unique().tolist() == [1]
    z = _zip(tmp_path / "d", tmp_path / "d.zip")
    assert _same(load_data(z), d)  # a Path works as spec; with workers, each opens the zip
    _save(tmp_path / "d" / "1" / "999.png", (5, 4), value=7)
    with pytest.raises(KdtoolError, match=r"png is 4 wide x 4 high, 1/999\.png 4 wide x 5 high"):
        load_data(str(tmp_path / "d"))
    (tmp_path / "d" / "1" / "999.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(KdtoolError, match=r"cannot read image .*999\.png"):
        load_data(str(tmp_path / "d"))


# ----------------------------------------------------------------------------- cache


def test_cache_reused(tmp_path, monkeypatch):
    z = _zip(_rgb_folder(tmp_path / "ds"), tmp_path / "ds.zip")
    cache = tmp_path / "mycache"
    first = load_data(str(z), cache_dir=cache)
    entries = list(cache.glob("*.safetensors"))
    assert len(entries) == 1 and not list(cache.glob("*.tmp"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(imagefolder, "decode_images", no_decode)
    second = load_data(str(z), cache_dir=cache)
    assert _same(first, second) and second.x.is_contiguous()
    # Asking for the channels the images have is the same entry (train loads --data as it
    # is, eval and export for the model's 3 channels: one decode between them) ...
    assert _same(load_data(str(z), cache_dir=cache, channels=3), first)
    # ... and a conversion is an entry of its own.
    with pytest.raises(AssertionError):
        load_data(str(z), cache_dir=cache, channels=1)


@pytest.mark.parametrize("channels", [1, 3])
def test_images_as_they_are_serve_a_request_for_their_channels(tmp_path, channels):
    """A folder of grey and colour images reads as RGB: the same pixels as converting each
    image to RGB, so that entry serves a request for 3 channels (not one for 1)."""
    _save(tmp_path / "m" / "a" / "1.png", (9, 7))
    _save(tmp_path / "m" / "a" / "2.png", (6, 5, 3))
    _save(tmp_path / "m" / "b" / "3.png", (8, 8), value=200)
    natural = load_data(str(tmp_path / "m"), image_size=6, cache_dir=tmp_path / "c")
    assert natural.channels == 3
    shared = load_data(str(tmp_path / "m"), image_size=6, channels=channels,
                       cache_dir=tmp_path / "c")
    fresh = load_data(str(tmp_path / "m"), image_size=6, channels=channels,
                      cache_dir=tmp_path / "fresh")
    assert _same(shared, fresh) and shared.channels == channels
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == (1 if channels == 3 else 2)


def test_cache_default_dir_and_invalidation(tmp_path, monkeypatch):
    root = _rgb_folder(tmp_path / "ds")
    first = load_data(str(root))  # KDTOOL_CACHE from the autouse fixture
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    (rgb_entry,) = (tmp_path / "cache").glob("*.safetensors")
    load_data(str(root), channels=1)  # another conversion: an entry of its own
    (gray_entry,) = set((tmp_path / "cache").glob("*.safetensors")) - {rgb_entry}
    _save(root / "dog" / "c.png")  # a new file changes the key: decoded again
    assert len(load_data(str(root))) == len(first) + 1
    # ... and the entry of the old contents goes; the grayscale one is not this conversion
    entries = set((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 2 and rgb_entry not in entries and gray_entry in entries


def test_corrupt_cache_rebuilt(tmp_path, capsys):
    root = _rgb_folder(tmp_path / "ds")
    first = load_data(str(root), cache_dir=tmp_path / "c")
    (entry,) = (tmp_path / "c").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    assert _same(load_data(str(root), cache_dir=tmp_path / "c"), first)
    assert entry.stat().st_size > 100  # rewritten
    # A file that still parses but has one pixel byte flipped (bit rot, a bad copy) is
    # caught by its checksum, not trained on.
    raw = bytearray(entry.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    start = 8 + header + json.loads(raw[8:8 + header])["x"]["data_offsets"][0]
    raw[start] ^= 0xFF
    entry.write_bytes(bytes(raw))
    capsys.readouterr()
    assert _same(load_data(str(root), cache_dir=tmp_path / "c"), first)
    assert "checksum mismatch" in capsys.readouterr().err
    # A damaged entry of the images as they are, read for a one-channel load that writes an
    # entry of its own: removed, not warned of on every later run.
    entry.write_bytes(b"garbage")
    grey = load_data(str(root), cache_dir=tmp_path / "c", channels=1)
    assert "removed it, rebuilding" in capsys.readouterr().err and not entry.exists()
    assert _same(load_data(str(root), cache_dir=tmp_path / "c", channels=1), grey)
    assert "ignoring cache file" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors


def _raises(match: str, spec, **kwargs) -> KdtoolError:
    with pytest.raises(KdtoolError, match=match) as e:
        load_data(str(spec), **kwargs)
    assert e.value.hint and "\n" not in str(e.value)
    return e.value


def test_spec_errors(tmp_path):
    missing = tmp_path / "nope"
    _raises(str(missing), missing)
    assert "'digits'" in _raises("digts", "digts").hint
    assert "did you mean 'digits" in _raises("digits:val", "digits:val").hint
    (tmp_path / "a.tar").write_bytes(b"x")
    _raises("a.tar", tmp_path / "a.tar")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "a.txt").write_text("x")
    assert ".png" in _raises("no images found in .*empty", tmp_path / "empty").hint
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    _raises("bad.zip", tmp_path / "bad.zip")
    _raises("channels", "digits", channels=2)
    _raises("image size", "digits", image_size=0)


def test_image_errors(tmp_path):
    _save(tmp_path / "ds" / "a" / "1.png")
    (tmp_path / "ds" / "b").mkdir()
    _raises(r"class folder .*b has no images", tmp_path / "ds")
    (tmp_path / "ds" / "b" / "2.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    why = "not an image format Pillow recognises, or a damaged file"
    _raises(rf"cannot read image .*b/2\.jpg: {why}", tmp_path / "ds")
    z = _zip(tmp_path / "ds", tmp_path / "ds.zip")
    e = _raises(rf"ds\.zip:b/2\.jpg: {why}", z)
    assert "BytesIO" not in str(e)  # Pillow's repr of the in-memory member


def test_npz_errors(tmp_path):
    x = np.zeros((3, 4, 4, 3), np.uint8)
    cases = {
        "nox": dict(y=np.zeros(3, int)),
        "noy": dict(x=x),
        "dtype": dict(x=x.astype(np.float32), y=np.zeros(3, int)),
        "ndim": dict(x=np.zeros((3, 4), np.uint8), y=np.zeros(3, int)),
        "ydtype": dict(x=x, y=np.zeros(3)),
        "length": dict(x=x, y=np.zeros(4, int)),
        "names": dict(x=x, y=np.array([0, 1, 2]), class_names=np.array(["a", "b"])),
        "mixed": dict(x=x, y=np.array([0, -1, 1])),
    }
    match = {"nox": "no array 'x'", "noy": "no array 'y'", "dtype": "float32", "ndim": "shape",
             "ydtype": "y has dtype", "length": "3 images but y has 4",
             "names": "2 class names", "mixed": "y holds the label -1"}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        _raises(f"{name}.npz.*{match[name]}", tmp_path / f"{name}.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([object()]), y=np.zeros(1, int))
    e = _raises("obj.npz holds Python objects", tmp_path / "obj.npz")  # refused, not loaded
    assert "unsafely" not in str(e) + e.hint
    (tmp_path / "text.npz").write_text("hello")  # numpy took it for a pickle, and said so
    e = _raises(r"text\.npz is not an \.npz archive \(not a zip file\)", tmp_path / "text.npz")
    assert "pickle" not in str(e) + e.hint


def test_check_fits():
    d = load_data("digits:test")
    check_fits(d, num_classes=10, in_chans=1, what="tiny")
    with pytest.raises(KdtoolError, match=r"test has 1-channel.*resnet\.ckpt expects 3") as e:
        check_fits(d, num_classes=10, in_chans=3, what="resnet.ckpt")
    assert "3 channel" in e.value.hint
    with pytest.raises(KdtoolError, match=r"10 classes but resnet\.ckpt has 100") as e:
        check_fits(d, num_classes=100, in_chans=1, what="resnet.ckpt")
    # every caller scores with the labels: unlabelled data is no way out
    assert "model's classes" in e.value.hint and "unlabel" not in e.value.hint
    # a model without class names (a plain state_dict): 'kdtool info' would list nothing
    with pytest.raises(KdtoolError) as e:
        check_fits(d, num_classes=5, in_chans=1, what="r18.pth", class_names=[])
    assert "records no class names" in e.value.hint and "classes 0 to 4" in e.value.hint
    assert "kdtool info" not in e.value.hint
    unlabeled = ImageData(d.x, torch.full((len(d),), -1), [], "calib")
    check_fits(unlabeled, num_classes=100, in_chans=1, what="m")


def test_a_dangling_symlink_in_a_folder_is_named(tmp_path):
    root = _rgb_folder(tmp_path / "ds")
    (root / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(KdtoolError, match=r"cannot read image .*gone\.png: No such file"):
        load_data(str(root))


def _patched_zip(tmp_path: Path, flag: int = 0, method: int | None = None) -> Path:
    """A zip whose headers claim encryption (``flag`` 0x1) or another compression method:
    what Python's zipfile meets in archives it cannot read."""
    z = bytearray(_zip(_rgb_folder(tmp_path / "ds"), tmp_path / "ds.zip").read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        i = z.find(sig)
        while i != -1:
            z[i + flag_at] |= flag
            if method is not None:
                z[i + flag_at + 2:i + flag_at + 4] = method.to_bytes(2, "little")
            i = z.find(sig, i + 4)
    out = tmp_path / "patched.zip"
    out.write_bytes(bytes(z))
    return out


@pytest.mark.parametrize(("flag", "method", "said"), [
    (0x1, None, "encrypted"),
    (0, 9, "compression method"),  # Deflate64
])
def test_zips_python_cannot_read_are_a_clear_error(tmp_path, flag, method, said):
    z = _patched_zip(tmp_path, flag, method)
    with pytest.raises(KdtoolError, match=rf"cannot read image .*patched\.zip:.*{said}"):
        load_data(str(z))


# ----------------------------------------------------------------------------- messy data


def test_a_parent_of_splits_is_refused_naming_a_split(tmp_path):
    """splits/train/cat/... once trained as a 2-class "train vs val" model."""
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            _save(tmp_path / "splits" / split / cls / "1.png")
    e = _raises(r"splits holds splits \(train, val\), not classes", tmp_path / "splits")
    assert e.hint == f"give one split: --data {tmp_path / 'splits' / 'train'}"
    _raises("holds splits", _zip(tmp_path / "splits", tmp_path / "s.zip", top="ds/"))
    # Other names two levels down are classes with subfolders: loaded, with a word on it.
    for cls in ("cat", "dog"):
        _save(tmp_path / "nested" / cls / "day1" / "1.png")
    d = load_data(str(tmp_path / "nested"))
    assert d.class_names == ["cat", "dog"]


def test_a_symlink_back_up_the_tree_is_not_followed(tmp_path):
    """cat/up -> .. once listed dog's images again under cat, until ELOOP."""
    for cls in ("cat", "dog"):
        _save(tmp_path / "loop" / cls / "1.png")
    (tmp_path / "loop" / "cat" / "up").symlink_to("..")
    d = load_data(str(tmp_path / "loop"))
    assert len(d) == 2 and d.y.tolist() == [0, 1]


def test_a_link_across_the_tree_is_not_listed_twice_but_one_out_of_it_is_followed(tmp_path,
                                                                                  capsys):
    """cat/dogs -> ../dog trained dog's images as cats too, silently."""
    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        _save(root / cls / "1.png")
    (root / "cat" / "dogs").symlink_to("../dog")
    _save(tmp_path / "elsewhere" / "2.png")
    (root / "bird").symlink_to(tmp_path / "elsewhere")  # a class folder kept elsewhere
    d = load_data(str(root))
    assert d.class_names == ["bird", "cat", "dog"] and d.y.tolist() == [0, 1, 2]
    assert "skipping" in capsys.readouterr().err


def test_messy_npz_labels(tmp_path):
    x = np.zeros((6, 4, 4), np.uint8)
    np.save(tmp_path / "plain.npy", x)
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    _raises(r"plain\.npz is one array \(uint8, shape \(6, 4, 4\)\), not an \.npz",
            tmp_path / "plain.npz")
    np.savez(tmp_path / "sentinel.npz", x=x, y=np.array([0, 1, 0, 1, 0, 10**9]))
    _raises(r"the label 1000000000, which would make 1,000,000,001 classes",
            tmp_path / "sentinel.npz")
    np.savez(tmp_path / "twice.npz", x=x, y=np.arange(6) % 3,
             class_names=np.array(["a", "a", "b"]))
    _raises("class name 'a' is given more than once", tmp_path / "twice.npz")
    np.savez(tmp_path / "gaps.npz", x=x, y=np.array([0, 2, 5, 0, 2, 5]))
    assert load_data(str(tmp_path / "gaps.npz")).num_classes == 6  # indices, as documented


def test_gif_and_jfif_load_as_predict_and_serve_read_them(tmp_path):
    gif = _save(tmp_path / "g" / "bird" / "1.gif", (4, 4), value=90)
    _save(tmp_path / "g" / "cat" / "2.jfif", (4, 4), value=10)
    d = load_data(str(tmp_path / "g"))
    assert d.class_names == ["bird", "cat"] and np.array_equal(d.x[0, 0].numpy(), gif)


def test_32_bit_images(tmp_path):
    """A float image has no pixel scale: refused. An int32 ("I") image of 0..255 values is
    8-bit data, not a near-black 16-bit image."""
    Image.fromarray(np.full((4, 4), 200, np.int32)).save(tmp_path / "i32.tiff")
    with Image.open(tmp_path / "i32.tiff") as im:
        assert im.mode == "I"
        assert (to_array(im, None, None) == 200).all()
    _save(tmp_path / "f" / "a" / "1.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f" / "a" / "2.tiff")
    _raises(r"2\.tiff: a 32-bit float image has no standard pixel scale", tmp_path / "f")


def test_class_folders_are_matched_to_the_model_by_name_or_refused(tmp_path, capsys):
    import unicodedata

    from kdtool.data import match_classes

    names = ["cat", "dog", "über"]
    for cls in ("dog", unicodedata.normalize("NFD", "über")):  # as macOS names folders
        _save(tmp_path / "ok" / cls / "1.png")
    d = match_classes(load_data(str(tmp_path / "ok")), names)
    assert d.class_names == names and d.y.tolist() == [1, 2]
    for cls in ("dog", "dgo"):
        _save(tmp_path / "typo" / cls / "1.png")
    with pytest.raises(KdtoolError, match="class folder 'dgo' is not one of the model's "
                                          "classes \\(did you mean 'dog'\\?\\)"):
        match_classes(load_data(str(tmp_path / "typo")), names)
    # train's --val against the training data: there is no model yet for 'kdtool info'
    with pytest.raises(KdtoolError, match="'dgo' is not one of the training data's classes") \
            as e:
        match_classes(load_data(str(tmp_path / "typo")), names, "the training data's")
    assert "as the training data's classes (cat, dog, über)" in e.value.hint
    for cls in ("x", "y"):  # no name in common: labels are class indices
        _save(tmp_path / "idx" / cls / "1.png")
    capsys.readouterr()
    assert match_classes(load_data(str(tmp_path / "idx")), names).y.tolist() == [0, 1]
    err = " ".join(capsys.readouterr().err.split())
    assert "none of its class names (x, y) is one of the model's (cat, dog, über)" in err
    assert "read as class indices" in err


def test_a_full_disk_under_the_cache_costs_the_cache_not_the_run(tmp_path, monkeypatch, capsys):
    """safetensors reports ENOSPC as its own SafetensorError, which was not caught."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    _save(tmp_path / "f" / "a" / "1.png")
    assert len(load_data(str(tmp_path / "f"))) == 1
    assert "could not write dataset cache" in capsys.readouterr().err


def test_a_zip_from_info_zip_keeps_its_utf8_class_names(tmp_path):
    """Linux's zip writes UTF-8 names without the flag that says so; read as cp437 they
    turned "ñu" into "├▒u", sorted differently and swapped the labels."""
    src = tmp_path / "src"
    for name, value in (("ñu", 10), ("üb", 200)):
        _save(src / name / "a.png", value=value)
    flagged = _zip(src, tmp_path / "flagged.zip")
    # the same archive as Info-ZIP writes it: UTF-8 bytes, flag 0x800 cleared
    infozip = tmp_path / "infozip.zip"
    with zipfile.ZipFile(tmp_path / "ascii.zip", "w") as zf:
        for name in ("N_u", "U_b"):  # placeholders of the UTF-8 names' byte length
            zf.writestr(f"{name}/a.png", (src / {"N_u": "ñu", "U_b": "üb"}[name] / "a.png")
                        .read_bytes())
    data = (tmp_path / "ascii.zip").read_bytes()
    for placeholder, name in ((b"N_u/", "ñu/"), (b"U_b/", "üb/")):
        data = data.replace(placeholder, name.encode())
    infozip.write_bytes(data)
    with zipfile.ZipFile(infozip) as zf:
        assert not any(i.flag_bits & 0x800 for i in zf.infolist())
        assert zf.namelist()[0].startswith("├")  # what zipfile makes of it
    for path in (flagged, infozip):
        d = load_data(str(path), cache_dir=tmp_path / f"cache_{path.stem}")
        assert d.class_names == ["ñu", "üb"], (path.name, d.class_names)
        assert d.y.tolist() == [0, 1] and int(d.x[0].float().mean()) < int(d.x[1].float().mean())


def test_class_folders_in_two_unicode_forms_are_refused_not_merged(tmp_path):
    import unicodedata

    for name in (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"),
                 "thé"):
        _save(tmp_path / "d" / name / "a.png")
    with pytest.raises(KdtoolError, match="one name in two Unicode forms"):
        load_data(str(tmp_path / "d"), cache_dir=tmp_path / "cache")


def test_an_npz_label_the_model_lacks_is_a_class_not_a_folder(tmp_path):
    from kdtool.data import match_classes

    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8, 1), np.uint8), y=np.array([0, 10]))
    d = load_data(str(tmp_path / "d.npz"))
    with pytest.raises(KdtoolError, match=r"d\.npz: class '10' is not one of the model's "
                                          r"classes \(keep the labels") as e:
        match_classes(d, [str(i) for i in range(10)])
    assert "did you mean" not in str(e.value) and "folder" not in e.value.hint


@pytest.mark.parametrize("name", ["/tmp/cat/1.png", "cat/../../1.png"])
def test_a_zip_with_absolute_or_climbing_names_is_refused(tmp_path, name):
    """'/tmp/cat/1.png' made a class named '' and 'cat/../x.png' vanished as hidden."""
    import io
    import re

    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("dog/1.png", buf.getvalue())
        z.writestr(name, buf.getvalue())
    _raises(re.escape(f"holds '{name}', a path that is absolute or climbs out"),
            tmp_path / "d.zip")


# ----------------------------------------------------------------------------- draws


def _many_folder(root: Path, per_class: int = 20) -> Path:
    for c in ("ant", "bee", "cow"):
        for i in range(per_class):
            _save(root / c / f"{i:03d}.png", shape=(12, 10, 3))
    return root


@pytest.mark.parametrize("form", ["folder", "zip", "npz", "digits"])
def test_a_draw_is_the_same_images_as_a_subset_of_all_and_decodes_only_them(tmp_path, decoded,
                                                                             form):
    from kdtool.data import Draw

    spec = _many_folder(tmp_path / "ds")
    if form == "zip":
        spec = _zip(spec, tmp_path / "ds.zip")
    elif form == "npz":
        full = load_data(str(spec))
        spec = tmp_path / "ds.npz"
        np.savez(spec, x=full.x.permute(0, 2, 3, 1).numpy(), y=full.y.numpy())
    elif form == "digits":
        spec = "digits:test"
    cache = tmp_path / "draw-cache"
    draw = Draw(count=17, seed=3)
    decoded.clear()  # the npz was made from a decode of the folder
    drawn = load_data(str(spec), image_size=8, draw=draw, cache_dir=cache)
    assert decoded == ([17] if form in ("folder", "zip") else [])
    assert not cache.exists()  # a draw writes no cache entry
    whole = load_data(str(spec), image_size=8, cache_dir=cache)
    assert _same(drawn, whole.subset(draw.indices(len(whole))))
    assert len(drawn) == 17 and drawn.source == str(spec)
    # A cached full decode serves a later draw: nothing decoded again.
    decoded.clear()
    assert _same(load_data(str(spec), image_size=8, draw=draw, cache_dir=cache), drawn)
    assert decoded == []
    # More than there are: all of them, in the draw's order.
    everything = load_data(str(spec), image_size=8, draw=Draw(10**6, 3), cache_dir=cache)
    assert len(everything) == len(whole) and not _same(everything, whole)


def test_a_draw_of_only_the_grey_images_of_a_mixed_folder_calibrates_a_colour_model(tmp_path,
                                                                                   decoded):
    """A folder of colour and grey images reads as colour (grey ones as equal channels); a
    draw that happens to pick grey images alone must not read as a grey folder."""
    from types import SimpleNamespace

    from kdtool.data import Draw, load_calibration

    folder = tmp_path / "mixed"
    for i in range(12):
        _save(folder / f"{i:02d}.png", (8, 8))  # grey
    _save(folder / "99.png", (8, 8, 3))  # one colour image, sorted last
    whole = load_data(str(folder))
    assert whole.channels == 3
    seed = next(s for s in range(100) if 12 not in Draw(4, s).indices(13).tolist())
    model = SimpleNamespace(in_chans=3, input_size=[8, 8], crop_fraction=None,
                            interpolation="bilinear")
    decoded.clear()
    drawn = load_calibration(str(folder), model, "calibration data", "BN statistics",
                             draw=Draw(4, seed), image_size=(6, 6))  # no cached entry
    assert decoded == [4, 4]  # the draw as it is, then as colour: never the whole folder
    whole = load_data(str(folder), image_size=(6, 6))
    assert drawn.channels == 3 and _same(drawn, whole.subset(Draw(4, seed).indices(13)))
    # a grey folder for a colour model is refused, after the headers, not a whole decode
    (folder / "99.png").unlink()
    decoded.clear()
    with pytest.raises(KdtoolError, match="has 1-channel images but the model takes 3"):
        load_calibration(str(folder), model, "calibration data", "BN statistics",
                         draw=Draw(4, seed), image_size=(7, 7))
    assert decoded == [4]


def test_a_class_folder_the_model_has_not_is_refused_before_any_decode(tmp_path, decoded,
                                                                       monkeypatch):
    from kdtool.checkpoint import ModelMeta
    from kdtool.data import load_for_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("KDTOOL_CACHE", str(cache))
    for cls in ("cat", "dog", "dgo"):
        _save(tmp_path / "val" / cls / "1.png")
    meta = ModelMeta(arch="tiny_cnn", num_classes=3, in_chans=3, input_size=[4, 4],
                     mean=[0.5] * 3, std=[0.25] * 3, class_names=["cat", "dog", "owl"])
    zipped = _zip(tmp_path / "val", tmp_path / "val.zip")
    for spec in (tmp_path / "val", zipped):
        with pytest.raises(KdtoolError, match="class folder 'dgo' is not one of the model's "
                                              "classes \\(did you mean 'dog'\\?\\)"):
            load_for_model(str(spec), meta)
    assert decoded == [] and not cache.exists()
    (tmp_path / "val" / "dgo" / "1.png").rename(tmp_path / "val" / "dog" / "2.png")
    (tmp_path / "val" / "dgo").rmdir()
    assert load_for_model(str(tmp_path / "val"), meta).y.tolist() == [0, 1, 1]


def test_folders_for_a_model_without_class_names_are_read_in_sorted_order_and_said_so(
        tmp_path, capsys):
    from kdtool.data import match_classes

    for cls in ("b", "a"):
        _save(tmp_path / "val" / cls / "1.png")
    capsys.readouterr()
    assert match_classes(load_data(str(tmp_path / "val")), []).y.tolist() == [0, 1]
    err = " ".join(capsys.readouterr().err.split())
    assert "the model's classes have no names, so its class folders (a, b) are read as " \
           "classes 0 to 1 in sorted order" in err
    match_classes(load_data("digits:test"), [])  # digits' labels are its classes: no word
    assert "have no names" not in capsys.readouterr().err


def test_the_early_class_check_reads_specs_as_load_data_does(tmp_path, monkeypatch):
    """A folder named like a built-in is not the built-in's concern, and '' is no folder."""
    from kdtool.checkpoint import ModelMeta
    from kdtool.data import load_for_model

    monkeypatch.chdir(tmp_path)
    for cls in ("0", "1", "foo"):  # ./digits shadows nothing: --data digits is the built-in
        _save(tmp_path / "digits" / cls / "1.png", (8, 8))
    meta = ModelMeta(arch="tiny_cnn", num_classes=10, in_chans=1, input_size=[8, 8],
                     mean=[0.5], std=[0.25], class_names=[str(i) for i in range(10)])
    assert len(load_for_model("digits", meta)) == 1437
    with pytest.raises(KdtoolError, match="a dataset was given as an empty string"):
        load_for_model("", meta)
    # labels nothing reads (analyze's pixels): no class check, no matching
    data = load_for_model(str(tmp_path / "digits"), meta, labels=False)
    assert data.class_names == ["0", "1", "foo"]
    with pytest.raises(KdtoolError, match="class folder 'foo' is not one of the model's"):
        load_for_model(str(tmp_path / "digits"), meta)


def test_calibrate_and_train_refuse_val_classes_before_decoding_them(cli, tmp_path, decoded,
                                                                     digits_teacher):
    for cls in ("3", "cat"):
        _save(tmp_path / "val" / cls / "1.png", (8, 8))
    decoded.clear()
    r = cli("calibrate", digits_teacher, "--data", "digits", "--val", tmp_path / "val",
            "--out", tmp_path / "c.safetensors")
    assert r.code == 1 and "class folder 'cat' is not one of the model's classes" in r.err
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--val", tmp_path / "val",
            "--epochs", "1", "--out", tmp_path / "t.safetensors")
    assert r.code == 1 and "'cat' is not one of the training data's classes" in r.err
    assert decoded == []


def test_a_grey_dataset_for_a_colour_model_is_said(capsys):
    """eval of a 3-channel model on the 1-channel digits ran silently, at chance."""
    from kdtool import console

    console.reset()  # as each command starts: said once a command
    capsys.readouterr()
    x = load_data("digits:test", channels=3).x
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 2])
    assert "grey images for a model of 3 channels" in capsys.readouterr().err
    load_data("digits:test", channels=1)
    assert "grey" not in capsys.readouterr().err
