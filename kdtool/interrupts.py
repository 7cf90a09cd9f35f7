"""SIGTERM stops a kdtool command the way Ctrl-C does.

Batch schedulers (SLURM preemption, Kubernetes eviction, ``docker stop``) end a job with
SIGTERM and a grace period before SIGKILL. Python's default for SIGTERM kills the process
at once, mid-write of whatever it was saving; raised as an interrupt instead, it runs the
same clean-up as Ctrl-C: a run waits for its checkpoint write, says how to resume, exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""


class Stopped(Exception):
    """A Ctrl-C or SIGTERM that stopped a command, carried to kdtool's ``main`` as an
    ordinary exception: typer turns an interrupt that leaves a command into a bare exit 130,
    with no message and SIGTERM's 143 lost. ``hint`` says what was kept and how to go on."""

    def __init__(self, interrupt: KeyboardInterrupt, hint: str | None = None):
        super().__init__(interrupt)
        self.interrupt = interrupt
        self.hint = hint


def describe(e: BaseException | None) -> tuple[str, int]:
    """What stopped the command and its exit status (128 + the signal, as shells report);
    anything but SIGTERM counts as Ctrl-C."""
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT


def raise_if_interrupted(e: BaseException) -> None:
    """Re-raise the Ctrl-C or SIGTERM that ``e`` wraps, if any.

    Libraries that catch broad errors while tracing Python code (torch.export) can turn an
    interrupt that arrives inside them into their own error type; reported as that error,
    the user's Ctrl-C would read as a bug, with a hint to change options."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            raise e
        seen.add(id(e))
        e = e.__cause__ or e.__context__


def _raise_terminated(signum, frame) -> None:
    # Once stopping, a second SIGTERM must not cut short the clean-up (the checkpoint write
    # the run waits for); SIGKILL at the end of the grace period still ends it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def _default_in_forked_child() -> None:
    # A forked helper (the dataset decoders) must die quietly on SIGTERM, as before, not
    # raise into its own loop and print a traceback; the parent does the clean-up.
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


_fork_hook_registered = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread. Left alone where
    the host program (an embedding application, a test runner) set its own handler."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    global _fork_hook_registered
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_default_in_forked_child)
        _fork_hook_registered = True
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
