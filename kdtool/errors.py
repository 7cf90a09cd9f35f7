"""Error types.

``KdtoolError`` is the one type for *user* errors (bad file, bad value, missing
dependency): the CLI prints its message on one line and exits 1, without a
traceback.  Anything else that escapes is a bug in kdtool and keeps its
traceback; ``InternalError`` marks broken invariants explicitly.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import math
from collections.abc import Iterable


class KdtoolError(Exception):
    """A user error: names the file or value at fault and how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InternalError(RuntimeError):
    """A broken invariant inside kdtool: a bug, reported with its traceback."""


# Words users write for what the choices call otherwise: spelling distance alone would
# answer "gpu" with "cpu".
_SYNONYMS = (("gpu", "cuda"), ("nvidia", "cuda"), ("tensorrt", "trt"))


def message_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of ``e``'s message ('' when it has none), cut at ``limit`` characters:
    libraries' messages run to paragraphs, and a user error is one line."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def suggest(value: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to a mistyped ``value``, or None."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    value = value.lower()
    for word, meant in _SYNONYMS:
        if word in value and meant not in value:
            guess = suggest(value.replace(word, meant), choices)
            if guess is not None:
                return guess
    if value in lowered:
        return lowered[value]
    match = difflib.get_close_matches(value, list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


# Beyond this many choices a hint names where they are listed instead of listing them (timm
# has over 1,000 models: the line ran to 26 KB).
MAX_LISTED_CHOICES = 30


def check_choice(value: str, choices: Iterable[str], what: str,
                 listing: str | None = None) -> str:
    """Return ``value`` if it is one of ``choices``, else raise with 'did you mean'.
    ``listing``: where a long list of choices can be seen (said instead of the list)."""
    choices = list(choices)
    if value in choices:
        return value
    guess = suggest(value, choices)
    if guess:
        hint = f"did you mean '{guess}'?"
    elif len(choices) > MAX_LISTED_CHOICES:
        hint = f"{len(choices):,} to choose from" + (f": {listing}" if listing else "")
    else:
        hint = "choose one of: " + ", ".join(choices)
    raise KdtoolError(f"unknown {what} '{value}'", hint)


# More threads than any machine kdtool runs on has cores (torch crashed at 100,000).
MAX_THREADS = 1024


def check_threads(threads: int | None) -> int | None:
    """--threads (None or 0: the library's default, one per core), checked. Here, not in
    kdtool.device: predict and serve on ONNX never import torch."""
    if threads is not None and threads < 0:
        raise KdtoolError(f"--threads must be at least 0, not {threads}",
                          "0 (or no --threads) is the library's default, one per core")
    if threads is not None and threads > MAX_THREADS:
        raise KdtoolError(f"--threads {threads} is more than kdtool runs ({MAX_THREADS})",
                          "give at most the cores of this machine")
    return threads


def check_val_every(val_every: int, val: str | None) -> None:
    """--val-every paces validation on --val (train and distill alike)."""
    if val_every < 1:
        raise KdtoolError(f"--val-every must be >= 1, got {val_every}")
    if val_every != 1 and not val:
        raise KdtoolError(f"--val-every {val_every} paces validation on --val, and there "
                          "is none", "add --val DATA, or drop --val-every")


def check_val_limit(val_limit: int | None, val: str | None) -> None:
    """--val-limit draws some of --val's images (train and distill alike)."""
    if val_limit is None:
        return
    if val_limit < 1:
        raise KdtoolError(f"--val-limit must be >= 1, got {val_limit}")
    if not val:
        raise KdtoolError(f"--val-limit {val_limit} draws images of --val, and there is none",
                          "add --val DATA, or drop --val-limit")


def check_weight_decay(weight_decay: float) -> None:
    """--weight-decay shrinks weights towards zero (train and distill alike): a negative or
    non-finite value would grow them without bound."""
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise KdtoolError(f"--weight-decay must be a finite number >= 0, got {weight_decay:g}",
                          "use 0 for none, or a small positive value such as 5e-4")


# OSErrors that are the machine's state, not a bug, with what to do about each: the CLI
# prints them as one line, and a run's writer names them so.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EDQUOT: "free some of your disk quota or write elsewhere",
    errno.EACCES: "check the permissions of that file or folder, or use another",
    errno.EPERM: "check the permissions of that file or folder, or use another",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.EFBIG: "the file is over this filesystem's (or ulimit -f's) size limit: write "
                 "elsewhere",
    errno.ENAMETOOLONG: "use a shorter file name",
}


def require_fields(cls, record: dict) -> None:
    """Raise ValueError naming the fields without a default that ``record`` lacks for the
    dataclass ``cls`` (its __init__ would say "missing 1 required positional argument")."""
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in record and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"it lacks {', '.join(map(repr, missing))}")
