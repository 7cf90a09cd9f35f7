"""Safe file output: atomic writes and no silent overwrites."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from kdtool.errors import ENVIRONMENT_ERRNOS, KdtoolError


def require_name(path: str | Path, what: str, hint: str = "pass a file name") -> Path:
    """``path`` as a Path if it names a file; '' and '.' (typer reads an empty --out as
    '.') are a KdtoolError."""
    path = Path(path)
    if not path.name:
        raise KdtoolError(f"{what} path '{path}' names no file", hint)
    return path


def require_file(path: str | Path, what: str, hint: str = "check the path") -> Path:
    """``path`` as a Path if it is an existing file; otherwise a KdtoolError naming it."""
    path = Path(path)
    if not path.exists():
        raise KdtoolError(f"{what} '{path}' does not exist", hint)
    if not path.is_file():
        raise KdtoolError(f"{what} '{path}' is not a file", hint)
    if path.stat().st_size == 0:  # said as such, not as "no metadata" or "header too small"
        raise KdtoolError(f"{what} '{path}' is empty (0 bytes)",
                          "copy it again or re-create it")
    return path


# The longest name kdtool derives from an output's: ".NAME.HOST-PID.XXXXXXXX.tmp"
# (atomic_path; HOST a 6-digit tag, PID up to 7 digits) and the same for NAME.state.pt (a
# run's state, written the same way).
SIDE_NAME_EXTRA = len(".") + len(".state.pt") + len(".hhhhhh-ppppppp") + len(".XXXXXXXX.tmp")


def check_distinct(**paths: str | Path | None) -> None:
    """Refuse two options naming one file (``markdown="a.md", plot="a.md"``): the second
    write would replace the first, --force or not. Keys are option names (``_`` for ``-``)."""
    seen: dict[Path, str] = {}
    for key, path in paths.items():
        if path is None:
            continue
        option = "--" + key.replace("_", "-")
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            raise KdtoolError(f"{seen[resolved]} and {option} both name '{path}': the second "
                              "file would replace the first", "give each its own file")
        seen[resolved] = option


READ_BACK = "kdtool tells files apart by their suffix and would not read it back as one"
# Reports kdtool never reads (bench's Markdown, predict's CSV) keep their suffix so that a
# slip of the tab key cannot put one over the model it was made from, --force or not.
REPORT = "a report keeps its own suffix, so it never replaces a model or data file"


def refuse_input_as_output(path: str | Path, sources: dict[str, str | Path | None],
                           what: str = "--out") -> None:
    """Refuse an output that is one of its own inputs (``sources``: what each is, e.g.
    "the teacher", and its path), by name, link or hard link: --force or not, the run
    would replace what it reads."""
    for desc, source in sources.items():
        if source is None:
            continue
        try:
            same = os.path.samefile(path, source)
        except OSError:  # either is not there (yet): the same only by name
            same = Path(path).expanduser().resolve() == Path(source).expanduser().resolve()
        if same:
            raise KdtoolError(f"{what} '{path}' is {desc}: the output would replace its own "
                              "input, --force or not", "choose another --out")


def check_output(path: str | Path, force: bool, what: str = "output",
                 suffixes: tuple[str, ...] = (), why: str = READ_BACK,
                 sources: dict[str, str | Path | None] | None = None) -> Path:
    """Refuse to overwrite ``path`` without ``force``; create its folder. With ``suffixes``
    (the first is the canonical one), refuse a name of another kind of file (``why``);
    with ``sources``, an output that is one of the inputs (refuse_input_as_output)."""
    path = require_name(path, what)
    refuse_input_as_output(path, sources or {}, what)
    if path.parts and path.parts[0].startswith("~"):
        # --out=~/x: the shell expands ~ only at the start of a word, not after "="
        raise KdtoolError(f"{what} '{path}' starts with '~', which the shell did not expand "
                          "(it does not after '=')", f"write it as --out {path} (a space, not "
                          "'='), or give the full path")
    if suffixes and path.suffix.lower() not in suffixes:
        raise KdtoolError(f"{what} '{path}' must end in {' or '.join(suffixes)}: {why}",
                          f"name it '{path.with_suffix(suffixes[0])}'")
    if path.is_dir():
        raise KdtoolError(f"{what} '{path}' is a directory", "pass a file path to --out")
    if path.exists() and not force:
        raise KdtoolError(f"{what} '{path}' already exists", "pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocking = next((p for p in [path.parent, *path.parent.parents]
                         if p.is_file() or (p.is_symlink() and not p.exists())), None)
        if blocking is not None:  # mkdir says only "File exists"
            raise KdtoolError(f"cannot create folder '{path.parent}': '{blocking}' is "
                              f"{'a broken link' if blocking.is_symlink() else 'a file'}",
                              "choose another --out folder") from e
        raise KdtoolError(f"cannot create folder '{path.parent}': {e.strerror}",
                          ENVIRONMENT_ERRNOS.get(e.errno, "choose another folder")) from e
    if not os.access(path.parent, os.W_OK):  # say so now, not after the work
        raise KdtoolError(f"cannot write {what} '{path}': folder '{path.parent}' is not "
                          "writable", "choose a folder you can write to")
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no such limit
        name_max = 255
    if len(path.name.encode()) + SIDE_NAME_EXTRA > name_max:
        raise KdtoolError(f"{what} name '{path.name}' is {len(path.name.encode())} bytes; "
                          f"the files kdtool writes beside it (a temporary file; a run's "
                          f"state) need up to {SIDE_NAME_EXTRA} more, over this filesystem's "
                          f"{name_max}", "use a shorter name")
    return path


def temp_prefix(name: str) -> str:
    """The prefix of a temporary beside output ``name``: hidden, and naming its writer
    (host and process), so that a later write can tell one left by a killed process."""
    return f".{name}.{_host_tag()}-{os.getpid()}."


def _host_tag() -> str:
    """Six hex digits for this host (a pod's name can be 63 characters)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


LEFT_BEHIND_AGE_S = 600


def remove_left_behind(folder: Path, name: str, suffixes: tuple[str, ...] = (".tmp",)) -> None:
    """Delete the temporaries of output ``name`` in ``folder`` whose writer, a process of
    this host, is gone (SIGKILL or power loss skip every cleanup): a 44 MB checkpoint or a
    whole export's folder otherwise stays behind, hidden, for good. Another host's are
    left alone: their writer may be running there; so are those touched in the last
    ``LEFT_BEHIND_AGE_S`` (a container sharing this host's name has its own process ids)."""
    pattern = re.compile(re.escape(f".{name}.{_host_tag()}-") + r"(\d+)\..*(" +
                         "|".join(map(re.escape, suffixes)) + ")$")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        with suppress(OSError):
            if now - entry.stat(follow_symlinks=False).st_mtime < LEFT_BEHIND_AGE_S:
                continue
        with suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            from kdtool import console

            console.info(f"removed {entry.path}, left by an interrupted write")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash or an exception leaves the old file (or nothing) in place, never a
    half-written one: the rename is atomic within a filesystem, and the file's bytes
    reach the disk before it (fsync), then the rename itself (the folder's fsync), so a
    power loss cannot leave the new name on an empty or partial file either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_left_behind(path.parent, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp",
                                   dir=path.parent)
    except OSError as e:  # a folder that takes no new files (/proc, a special filesystem)
        if e.errno in ENVIRONMENT_ERRNOS:  # a full disk, no permission: said as for any write
            raise
        raise KdtoolError(f"cannot create a file in folder '{path.parent}' (for '{path}'): "
                          f"{e.strerror}", "write it elsewhere") from e
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkstemp makes 0600 files, and so do writers that replace the file with their own
        # temp file (safetensors' save_file): outputs get the permissions of any new file
        # (umask), so a shared dataset cache stays readable by the others who share it.
        tmp.chmod(0o666 & ~umask)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:
        if e.filename is None:  # writers of bytes (safetensors, onnx) say "disk full", not where
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk. A folder cannot be
    opened for that on Windows, nor a file some filesystems: those go without."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
