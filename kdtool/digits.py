"""scikit-learn's 8x8 handwritten digits and kdtool's fixed train/test split of them.

The images are read straight from the CSV file scikit-learn ships, without importing
scikit-learn (1.2 s of a command's start-up, for 11 ms of reading); its own loader is the
fallback should the file move. The split is stored here rather than recomputed: it is
``train_test_split(test_size=0.2, stratify=y, random_state=0)`` (1,437 train and 360 test
images, the test split stratified, about 36 per class), and a stored mask cannot change
with scikit-learn's version. A checksum ties it to the images it was made for.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np

from kdtool.errors import KdtoolError

N_IMAGES = 1797
# CRC-32 of the 1,797 x 64 pixel values (0..16, uint8, row-major) the split was made for.
PIXELS_CRC32 = 4087501628
# Bit i (most significant first) is set when image i is in digits:test.
TEST_MASK_HEX = (
    "000004883524104000064100934205001a00080100240028062c12001000940a009019120420f8a0028110a0"
    "00080a8820441524494240a00a0000004004d80000818020004805c400104008a0100005404800301000020e"
    "c409000224840083a8013c20a6980a0000000b08400804a0184802024041c1008004404684376a8102160044"
    "80004042a0a4180a5000840b8561c608108008004c80c02004068e00010882008100380803c008190000100e"
    "01008410a0210033282904c044c080680e0102830082008822a6402c24042108a860809081a00c0282024212"
    "0138a41500"
)


def held_out_mask() -> np.ndarray:
    """Boolean mask over the 1,797 images: True for the 360 of digits:test."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(TEST_MASK_HEX), dtype=np.uint8))
    return bits[:N_IMAGES].astype(bool)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels 0..16 as uint8, N x 8 x 8; labels int64) of ``split``, "train" or "test",
    in the data set's own order."""
    pixels, labels = _read_all()
    mask = held_out_mask() if split == "test" else ~held_out_mask()
    return pixels[mask].reshape(-1, 8, 8), labels[mask]


def _read_all() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise KdtoolError("the embedded digits data set comes with scikit-learn, which is not "
                          "installed", "pip install scikit-learn")
    csv = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:  # the file moved in some scikit-learn version: its loader knows where
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, labels = digits.data.astype(np.uint8), digits.target.astype(np.int64)
    pixels = np.ascontiguousarray(pixels)
    if pixels.shape != (N_IMAGES, 64) or zlib.crc32(pixels.tobytes()) != PIXELS_CRC32:
        raise KdtoolError(
            f"scikit-learn's digits data set at '{csv}' is not the one kdtool's fixed split "
            f"was made for ({pixels.shape[0]} images, checksum {zlib.crc32(pixels.tobytes())})",
            "install a scikit-learn release whose digits are the classic 1,797 images")
    return pixels, labels
