"""Resumable run state (model, optimiser, scheduler, progress), written every epoch.

Saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``,
which accepts only tensors and plain containers: a state file, too, is never
unpickled.

A run's per-epoch files are written off the main thread: ``RunCheckpoint.save`` copies
the state (a snapshot, on the CPU) and returns; serialising and fsync-ing about 90 MB
(ResNet-18 with its optimiser) took 0.2-0.5 s an epoch on the main thread, which on a GPU
is time the device sits idle (bench/checkpoint_cost.py).
"""

from __future__ import annotations

import copy
import io
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kdtool import console
from kdtool.errors import ENVIRONMENT_ERRNOS, KdtoolError
from kdtool.io import atomic_write_bytes, require_name


def state_path_for(out: str | Path) -> Path:
    out = require_name(out, "--out")
    return out.with_name(out.name + ".state.pt")


def stopped_hint(out: str | Path, resume: bool, started: float) -> str:
    """What a run stopped by Ctrl-C or SIGTERM kept: offer --resume only when a state is on
    disk that this run wrote (or resumed from)."""
    path = state_path_for(out)
    # (a second of slack: some filesystems keep coarse modification times)
    if path.exists() and (resume or path.stat().st_mtime >= started - 1):
        return "every finished epoch is saved; continue with the same command and --resume"
    return "it stopped before its first epoch was saved: nothing to resume"


@contextmanager
def stopped_with_hint(out: str | Path, resume: bool) -> Iterator[None]:
    """Around a run (train, distill): Ctrl-C or SIGTERM leaves it as ``Stopped`` whose hint
    says whether there is a state to --resume (``stopped_hint``)."""
    from kdtool.interrupts import Stopped

    started = time.time()
    try:
        yield
    except KeyboardInterrupt as e:
        raise Stopped(e, stopped_hint(out, resume, started)) from None


class RunLock:
    """An advisory lock on a run's output (``.OUT.lock`` beside it): a second process
    writing the same --out, or resuming a run that is still going, is refused instead of
    taking turns with the first over its files. The kernel releases it when the process
    ends, however it ends; the file goes when the run ends normally."""

    def __init__(self, out: Path):
        self.path = out.with_name(f".{out.name}.lock")
        self._file = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not guarded there
            return
        if not self.path.parent.is_dir():  # --resume into a folder that is not there: no run
            return
        while True:
            try:
                f = open(self.path, "a+")  # noqa: SIM115 (held until release)
            except OSError as e:  # a folder that takes no new files (/proc, ...)
                raise KdtoolError(f"cannot create the run's lock file '{self.path}': "
                                  f"{e.strerror}", "write --out elsewhere") from e
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                who = f.read().strip() or "?"
                f.close()
                out = self.path.with_name(self.path.name[1:].removesuffix(".lock"))
                raise KdtoolError(f"another kdtool process (pid {who}) is writing '{out}'",
                                  "wait for it to finish, stop it, or write to another --out") \
                    from None
            # A releasing process unlinks the file: one opened just before holds a lock on
            # a name no one else sees, so lock the file the name holds now.
            try:
                if os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()  # closing releases the lock
            self._file = None


def save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


STARTOVER = "start over: drop --resume and pass --force"


def require_state(path: Path) -> None:
    """Refuse a --resume with no state file to resume, or an empty one (a cut write)."""
    if path.is_dir():
        raise KdtoolError(f"run state '{path}' is a folder, not a file", "move it away, then "
                          "start over: drop --resume and pass --force")
    if not path.is_file():
        out = path.with_name(path.name.removesuffix(".state.pt"))
        if out.is_file():  # e.g. killed while writing the first epoch's state
            raise KdtoolError(f"no run state to resume at '{path}': '{out}' is there without "
                              "it (a run stopped before its first state was saved, or the "
                              "state was removed)", "start over with --force, which replaces "
                              "it (a run stopped that early loses at most its first epoch)")
        raise KdtoolError(f"no run state to resume at '{path}'",
                          "start without --resume (the state file is written after each epoch)")
    if path.stat().st_size == 0:
        raise KdtoolError(f"run state '{path}' is unreadable: the file is empty (a write cut "
                          "off by a crash or power loss)", STARTOVER)


def load_state(path: Path) -> dict[str, Any]:
    from kdtool.checkpoint import file_kind, load_tensors_only

    require_state(path)
    kind = file_kind(path)
    if kind != "a torch.save file":  # torch.load's own word for it is a bare "KeyError: 101"
        raise KdtoolError(f"run state '{path}' is not a whole torch.save archive"
                          + (f": it is {kind}" if kind else " (corrupt or truncated)"),
                          STARTOVER)
    return load_tensors_only(path, f"run state '{path}' is unreadable", STARTOVER)


# Where and how fast a run computes may change on resume; what it computes may not.  A
# changed device or precision continues the run, not bit for bit: its generators and
# arithmetic differ.
RESUMABLE_CHANGES = ("device", "precision", "compile", "compile_mode", "channels_last")
# A run's inputs by content: config[content_key("teacher")] holds a digest of the teacher
# file, so a file replaced under the same path is refused and the same file under another
# spelling of its path is not.
CONTENT_SUFFIX = "_contents"
_CONTENT_NAMES = {"val": "--val data"}  # as messages name an input recorded by contents


def content_key(option: str) -> str:
    return option + CONTENT_SUFFIX


# Settings newer than some saved states, with the value that does what those runs did.
ADDED_SETTINGS = {"val_every": 1, "world_size": 1}


# What a run state holds, by type (states are written by RunCheckpoint.save)
STATE_FIELDS = {"config": dict, "epoch": int, "best": (int, float), "history": list,
                "model": dict, "optimizer": dict, "scheduler": dict}


def _damage(state: Any) -> str | None:
    """What is missing or of the wrong kind in a loaded run state, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a run's state"
    for key, kind in STATE_FIELDS.items():
        if not isinstance(state.get(key), kind):
            return f"'{key}' is missing or of the wrong kind"
    return None


def check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path,
                      ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> None:
    """A resumed run must be the same run: refuse when a setting changed.

    A setting newer than the saved state (absent from it) matches when it is left off
    (0, None or False) or at the value that behaves as before (``ADDED_SETTINGS``), so a
    run started before an upgrade still resumes.
    """
    changed = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore or (key not in saved and (
                not current[key] or current[key] == ADDED_SETTINGS.get(key))):
            continue
        content = content_key(key)
        if saved.get(content) is not None and saved.get(content) == current.get(content):
            continue  # the same contents under another path ('T.safetensors', './T...')
        if key.endswith(CONTENT_SUFFIX):
            if key in saved and saved[key] != current.get(key):
                what = key.removesuffix(CONTENT_SUFFIX)
                raise KdtoolError(
                    f"cannot resume '{path}': the {_CONTENT_NAMES.get(what, what)} "
                    f"'{current.get(what)}' is not the one "
                    f"the run started with (its contents changed)",
                    f"resume with the run's {_CONTENT_NAMES.get(what, what)}, or {STARTOVER}")
            continue  # a state written before contents were recorded: the paths decide
        if saved.get(key) != current.get(key):
            changed.append(f"{key} was {saved.get(key)!r}, now {current.get(key)!r}")
    if changed:  # all of them: one option may change another's default (--optimizer, --lr)
        raise KdtoolError(f"cannot resume '{path}': {'; '.join(changed)}",
                          f"resume with the same options, or {STARTOVER}")


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` that later in-place updates cannot reach: tensors copied to the CPU,
    containers rebuilt, anything else deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class RunCheckpoint:
    """The output and resumable state of one long run (``train``, ``distill``).

    Protects existing files (no overwrite without ``force``), restores model,
    optimiser, scheduler and progress on ``resume`` and saves them after every
    epoch, so a killed run loses at most the epoch in flight (and, killed within the
    fraction of a second the previous epoch's files take to write, that epoch too).

    ``save`` snapshots and hands the writing to a background thread; the run's body goes
    inside ``with ckpt.writing():``, which waits for the last write on the way out, also
    after Ctrl-C or an error, so every finished epoch is on disk when the run returns.
    """

    def __init__(self, out: str | Path, force: bool, resume: bool, writer: bool = True,
                 command: str = "train"):
        from kdtool.checkpoint import CHECKPOINT_SUFFIX
        from kdtool.io import check_output

        self.out = Path(out)
        self.path = state_path_for(self.out)
        self.resume = resume
        self.command = command  # "train" or "distill": another's state cannot be resumed
        self.writer = writer  # in a multi-process run only rank 0 checks and writes files
        self._executor: ThreadPoolExecutor | None = None
        self.segments: list[dict] = []  # the run's parts, one per start or resume
        self._pending: Future | None = None
        if resume and force:
            raise KdtoolError("--force and --resume contradict each other",
                              "--resume continues the run in --out; --force starts it over")
        self._lock = RunLock(self.out)
        if not resume and writer:
            # The state first: an interrupted run leaves both files, and the fix it needs is
            # --resume, which "already exists (pass --force)" would hide.
            if self.path.exists() and not force:
                other = _stage_of(self.out)
                if other not in (None, command):
                    raise KdtoolError(
                        f"checkpoint '{self.out}' already exists, written by 'kdtool {other}' "
                        f"(its run state: '{self.path}')",
                        "choose another --out, or pass --force to replace both")
                what = (f"checkpoint '{self.out}' already exists, with the run state "
                        f"'{self.path}' of the run that wrote it" if self.out.exists() else
                        f"a run state '{self.path}' exists from an earlier run")
                raise KdtoolError(what, "pass --resume to continue that run from its last "
                                  "finished epoch (if it stopped early), or --force to start "
                                  "over")
            check_output(self.out, force, "checkpoint", (CHECKPOINT_SUFFIX,))
            if force and self.out.is_file():  # a finished run's output, perhaps: say when
                console.warn(f"--force: '{self.out}' is replaced when this run saves its "
                             "first epoch (stop it before then to keep the old one)")
        if writer:  # refuse now, before the work, if another process holds the run
            self._lock.acquire()
            self._lock.release()
        if resume:  # before the data or teacher load, which can take minutes
            require_state(self.path)

    def restore(self, config: dict, model, opt, sched,
                ema=None) -> tuple[int, float, list[dict]]:
        """(first epoch to run, best metric, history): from the state when resuming.
        ``ema``: a ``kdtool.ema.WeightEMA`` restored too."""
        if not self.resume:
            self.segments = [_segment(0, config)]
            return 0, float("-inf"), []
        state = load_state(self.path)
        damaged = _damage(state)
        if damaged:
            raise KdtoolError(f"run state '{self.path}' is damaged: {damaged}",
                              STARTOVER)
        # States written before they named their command: distill's config has a teacher.
        other = state.get("command") or ("distill" if "teacher" in state["config"] else "train")
        if other != self.command:
            raise KdtoolError(f"cannot resume '{self.path}': it is the run state of a 'kdtool "
                              f"{other}' run, not of 'kdtool {self.command}'",
                              f"resume it with 'kdtool {other} --resume', or choose another "
                              "--out")
        check_same_config(state["config"], config, self.path)
        _warn_if_numerics_differ(state.get("numerics"), self.path)
        _warn_if_settings_differ(state["config"], config, self.path)
        total = config.get("epochs")
        if isinstance(total, int) and state["epoch"] + 1 >= total and not self.out.is_file():
            raise KdtoolError(
                f"the run in '{self.path}' finished (epoch {total} of {total}), and its output "
                f"'{self.out}' is gone", "there is nothing to resume: start over with --force "
                "(the run state holds the last epoch's weights, not a checkpoint)")
        self.segments = [*state.get("segments", []), _segment(state["epoch"] + 1, config)]
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            # load_state_dict's text opens with "Error(s) in loading state_dict for X:"
            why = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else
                   lines[0] if lines else type(e).__name__)[:300]
            raise KdtoolError(f"run state '{self.path}' does not fit this run: {why}",
                              STARTOVER) from e
        return state["epoch"] + 1, state["best"], state["history"]

    def save(self, config: dict, epoch: int, best: float, history: list[dict], model, opt,
             sched, output=None, ema=None) -> None:
        """Snapshot the run after ``epoch`` and write it in the background.

        ``output`` (a ``ModelMeta``): also write the model as the run's output checkpoint,
        before the state, so a state on disk never runs ahead of the output; with ``ema``
        (a ``kdtool.ema.WeightEMA``) the output holds the averaged weights. The previous
        epoch's writes finish first (at most one snapshot waits in memory) and a failed
        write raises here or in ``wait``.
        """
        _require_finite(model, epoch)
        if not self.writer:
            return
        from kdtool.checkpoint import write_checkpoint

        self.wait()
        state = snapshot({
            "command": self.command, "config": config, "epoch": epoch, "best": best,
            "history": history, "numerics": numerics(), "segments": self.segments,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            **({"ema": ema.state_dict()} if ema is not None else {})})
        jobs: list[tuple[Path, Callable[[], None]]] = []
        if output is not None:
            if isinstance(output.stages.get(self.command), dict):  # how the run went, resumes
                output.stages[self.command]["segments"] = self.segments  # and all
            output.validate(str(self.out))
            # The snapshot's own copies (one each, so no shared storage for safetensors).
            weights = state["ema"]["model"] if ema is not None else state["model"]
            tensors = {k: v.contiguous() for k, v in weights.items()}
            meta_json = output.to_json()
            jobs.append((self.out, lambda: write_checkpoint(self.out, tensors, meta_json)))
        jobs.append((self.path, lambda: save_state(self.path, state)))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="kdtool-checkpoint")
        self._pending = self._executor.submit(_write_all, jobs)

    def wait(self) -> None:
        """Block until the last ``save`` is on disk; raise if it could not be written."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    @contextmanager
    def writing(self) -> Iterator[RunCheckpoint]:
        if self.writer:
            self._lock.acquire()
        try:
            yield self
        except BaseException:
            try:  # the epochs that finished stay saved; the original error is the one raised
                self.wait()
            except Exception as e:
                console.warn(str(e))
            raise
        else:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None
            self._lock.release()


def _stage_of(out: Path) -> str | None:
    """The command ("train", "distill") that wrote the checkpoint ``out``, if it says."""
    from kdtool.checkpoint import read_meta

    try:
        stages = read_meta(out).stages
    except KdtoolError:  # missing, foreign or unreadable: the usual messages follow
        return None
    return next((s for s in ("distill", "train") if s in stages), None)


def _write_all(jobs: list[tuple[Path, Callable[[], None]]]) -> None:
    for path, write in jobs:
        try:
            write()
        except OSError as e:
            hint = ENVIRONMENT_ERRNOS.get(e.errno)
            if hint is None:  # not the disk's or the permissions' fault: a bug, as it is
                raise
            state = jobs[-1][0]  # the state is written last: resumable if an earlier one is
            raise KdtoolError(f"could not write '{path}': {e.strerror or e}",
                              hint + (", then --resume" if state.exists() else "")) from e


def _require_finite(model, epoch: int) -> None:
    """Refuse to save a model whose weights are NaN or infinite: a diverged run (a learning
    rate far too high) once wrote such a checkpoint and exited 0."""
    with torch.no_grad():
        bad = next((n for n, t in model.state_dict().items()
                    if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise KdtoolError(
            f"the run diverged at epoch {epoch + 1}: '{bad}' holds NaN or infinite values, so "
            "this epoch was not saved", "lower --lr (an earlier epoch's files are kept)")


def numerics() -> dict:
    """What a run's float results depend on besides its seed and settings."""
    from kdtool.runinfo import cpu_name

    return {"torch_threads": torch.get_num_threads(), "cpu": cpu_name()}


def _segment(first_epoch: int, config: dict) -> dict:
    """One part of a run, from its start or a resume: where and how its epochs computed."""
    return {"from_epoch": first_epoch + 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **{k: config[k] for k in (*RESUMABLE_CHANGES, "world_size") if k in config},
            **numerics()}


def _warn_if_settings_differ(saved: dict, current: dict, path: Path) -> None:
    """Where and how fast may change on resume (RESUMABLE_CHANGES); the numbers then differ
    from an uninterrupted run's: say so (the output records each part, ``segments``)."""
    changed = [f"{key} {saved[key]} -> {current[key]}" for key in ("device", "precision")
               if key in saved and key in current and saved[key] != current[key]]
    if changed:
        console.warn(f"resuming '{path}' with {'; '.join(changed)}: the run goes on, but not "
                     "bit-identical to an uninterrupted one (its output records each part)")


def _warn_if_numerics_differ(began: dict | None, path: Path) -> None:
    """A resumed run computes on; on other threads or another CPU its sums round otherwise,
    and the result differs from an uninterrupted run's: say so, do not refuse."""
    now = numerics()
    changed = [f"{key.replace('_', ' ')} {began[key]} -> {now[key]}" for key in now
               if began and key in began and began[key] != now[key]]
    if changed:
        console.warn(f"resuming '{path}' with other numerics than it began with "
                     f"({'; '.join(changed)}): the remaining epochs will not be bit-identical "
                     "to an uninterrupted run (pass --threads to match)")
