"""SIGTERM (a scheduler's preemption) stops a command as Ctrl-C does: saved, resumable."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdtool.checkpoint import read_meta
from kdtool.interrupts import Terminated, describe, sigterm_as_interrupt


def test_sigterm_raises_terminated_inside_the_block_only():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert describe(Terminated()) == ("terminated (SIGTERM)", 143)
    assert describe(KeyboardInterrupt()) == ("interrupted", 130)
    assert describe(None) == ("interrupted", 130)


def _exit_0_if_sigterm_is_default() -> None:
    sys.exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)


def test_forked_helpers_keep_the_default_sigterm():
    # The dataset decoders are forked: on SIGTERM they must die quietly, not raise.
    import multiprocessing as mp

    with sigterm_as_interrupt():
        child = mp.get_context("fork").Process(target=_exit_0_if_sigterm_is_default)
        child.start()
        child.join(30)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the parent's stays
    assert child.exitcode == 0


def test_a_host_programs_own_handler_is_left_alone():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
    try:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert len(calls) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_stops_distill_cleanly_and_it_resumes(digits_teacher, tmp_path, cli):
    out = tmp_path / "s.safetensors"
    args = ["distill", "--teacher", str(digits_teacher), "--student", "tiny_cnn",
            "--epochs", "30", "--iters-per-epoch", "3", "--batch-size", "64", "--out", str(out)]
    state = Path(f"{out}.state.pt")
    proc = subprocess.Popen([sys.executable, "-m", "kdtool", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "KDTOOL_PROGRESS": "off"})
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): every finished epoch is saved" in err and "--resume" in err
    assert "Traceback" not in err
    read_meta(out)  # the files are whole
    r = cli(*args, "--resume", "--json")
    assert r.code == 0, r.err
    done = int(re.search(r"resuming .* after epoch (\d+)/30", r.err).group(1))
    assert 1 <= done < 30  # stopped part-way, continued from its last saved epoch
    assert [row["epoch"] for row in r.json()["history"]] == list(range(1, 31))


@pytest.mark.parametrize("stop, status, said", [(Terminated, 143, "terminated (SIGTERM)"),
                                                 (KeyboardInterrupt, 130, "interrupted")])
def test_train_says_how_it_stopped(cli, tmp_path, monkeypatch, stop, status, said):
    from kdtool.train import Trainer

    def stopped(self):
        raise stop()

    monkeypatch.setattr(Trainer, "run", stopped)
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--out", tmp_path / "t.safetensors")
    assert r.code == status
    # Stopped before an epoch was saved: no --resume to offer (it would find no state).
    assert f"{said}: it stopped before its first epoch was saved: nothing to resume" in r.err


@pytest.mark.parametrize("stop, status", [(Terminated, 143), (KeyboardInterrupt, 130)])
def test_an_interrupt_inside_the_onnx_exporter_is_an_interrupt(cli, digits_teacher, tmp_path,
                                                               monkeypatch, stop, status):
    """torch.export wraps a Ctrl-C that lands while it traces in its own error: that read as
    "cannot export the model (try --exporter torchscript)", exit 1."""
    from kdtool.export import onnx_export

    def traced(*args):
        try:
            raise stop()
        except KeyboardInterrupt as e:  # as torch.export does: AttributeError, then its own
            try:
                raise AttributeError("'NoneType' object has no attribute 'graph'") from e
            except AttributeError as inner:
                raise RuntimeError("Failed to export the model with torch.export") from inner

    monkeypatch.setattr(onnx_export, "_dynamo", traced)
    r = cli("export", digits_teacher, "--onnx", tmp_path / "t.onnx")
    assert r.code == status, r.err
    assert "cannot export" not in r.err and not (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize("stop, status, said", [(Terminated, 143, "terminated (SIGTERM)"),
                                                 (KeyboardInterrupt, 130, "interrupted")])
def test_every_command_says_how_it_stopped_and_json_gets_its_object(cli, digits_teacher,
                                                                    monkeypatch, stop, status,
                                                                    said):
    """typer turns an interrupt that leaves a command into a bare exit 130: no word on
    stderr, nothing for --json, and SIGTERM's 143 lost."""
    from kdtool import evaluate

    def stopped(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(evaluate, "evaluate", stopped)
    r = cli("eval", digits_teacher, "--data", "digits:test", "--json")
    assert r.code == status and said in r.err, r.err
    assert json.loads(r.out) == {"error": said, "hint": None}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_command_finished_keeps_its_status(sig):
    """A scheduler's SIGTERM in the second of shutdown after a finished export turned a
    success into 143 (SIGINT: 130)."""
    script = (
        "import atexit, os, signal, sys, time\n"
        "from kdtool.cli import main\n"
        f"atexit.register(lambda: (os.kill(os.getpid(), {int(sig)}), time.sleep(1)))\n"
        "sys.argv = ['kdtool', '--version']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert r.stdout.startswith("kdtool ")  # what it printed was flushed before the exit


def test_signals_after_the_last_exit_hook_are_ignored():
    """Finalisation resets Python's handlers to the default action, and a SIGTERM while
    torch tore down still ended a finished run with 143 (an audit: 10-200 ms after the
    summary). A hook registered before kdtool loads runs after kdtool's last one: it sees
    the signals ignored, which finalisation leaves so."""
    script = (
        "import atexit, signal, sys\n"
        "atexit.register(lambda: print('ignored', all(signal.getsignal(s) == signal.SIG_IGN "
        "for s in (signal.SIGINT, signal.SIGTERM))))\n"
        "from kdtool.cli import main\n"
        "sys.argv = ['kdtool', '--version']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("ignored True"), (r.stdout, r.stderr)


def test_a_stopped_demo_says_how_to_run_it_again(cli, tmp_path, monkeypatch):
    """It said only "interrupted", and its next run: "--out is not empty"."""
    from kdtool.demo import Demo

    def stopped(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Demo, "run", stopped)
    r = cli("demo", "--quick", "--out", tmp_path / "demo")
    assert r.code == 130 and "Traceback" not in r.err
    assert "interrupted: " in r.err and "holds what the demo finished" in r.err
    assert "pass --force (it starts over)" in r.err.replace("\n", " ")
