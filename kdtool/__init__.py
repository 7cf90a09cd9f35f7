"""kdtool: turn a trained image classifier into a small, fast student without its training data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdtool")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
