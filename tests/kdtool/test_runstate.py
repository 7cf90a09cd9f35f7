"""RunCheckpoint: per-epoch files written off the main thread, from a snapshot, in order."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

import kdtool.runstate as runstate
from kdtool.checkpoint import ModelMeta, load_checkpoint
from kdtool.errors import KdtoolError
from kdtool.models import create_model
from kdtool.runstate import RunCheckpoint, load_state, snapshot, state_path_for


def _run_parts():
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=3, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    return model, opt, sched


def _meta() -> ModelMeta:
    return ModelMeta(arch="tiny_cnn", num_classes=3, in_chans=1, input_size=[8, 8],
                     mean=[0.5], std=[0.5], class_names=["a", "b", "c"])


def _gate_writes(monkeypatch) -> threading.Event:
    """State writes wait until the returned event is set (the main thread goes on)."""
    gate = threading.Event()
    real = runstate.save_state

    def gated(path, state):
        assert gate.wait(30), "the test never opened the gate"
        real(path, state)

    monkeypatch.setattr(runstate, "save_state", gated)
    return gate


def test_save_returns_before_the_write_and_writing_waits_for_it(tmp_path, monkeypatch):
    gate = _gate_writes(monkeypatch)
    model, opt, sched = _run_parts()
    ckpt = RunCheckpoint(tmp_path / "out.safetensors", force=False, resume=False)
    with ckpt.writing():
        ckpt.save({"a": 1}, 0, 1.0, [{"epoch": 1}], model, opt, sched)
        assert not ckpt.path.exists()  # save() came back while the write waits
        gate.set()
    assert load_state(ckpt.path)["epoch"] == 0  # on disk once the block is left


def test_the_files_hold_the_state_at_save_not_later_updates(tmp_path, monkeypatch):
    gate = _gate_writes(monkeypatch)
    model, opt, sched = _run_parts()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    history = [{"epoch": 1, "loss": 0.5}]
    ckpt = RunCheckpoint(tmp_path / "out.safetensors", force=False, resume=False)
    with ckpt.writing():
        ckpt.save({"a": 1}, 0, 1.0, history, model, opt, sched, output=_meta())
        with torch.no_grad():  # the next epoch trains while the files are written
            for p in model.parameters():
                p.add_(1.0)
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        opt.step()
        history.append({"epoch": 2})
        history[0]["loss"] = 9.9
        gate.set()
    state = load_state(ckpt.path)
    assert state["history"] == [{"epoch": 1, "loss": 0.5}]
    for k, v in want.items():
        assert torch.equal(state["model"][k], v), k
    saved_momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(saved_momentum, momentum, strict=True))
    out, _ = load_checkpoint(ckpt.out)
    for k, v in want.items():
        assert torch.equal(out.state_dict()[k], v), k


def test_the_output_is_written_before_the_state(tmp_path, monkeypatch):
    order = []
    real_state, real_ckpt = runstate.save_state, __import__("kdtool.checkpoint").checkpoint
    monkeypatch.setattr(runstate, "save_state",
                        lambda path, state: (order.append("state"), real_state(path, state)))
    real_write = real_ckpt.write_checkpoint
    monkeypatch.setattr(real_ckpt, "write_checkpoint",
                        lambda *a: (order.append("output"), real_write(*a)))
    model, opt, sched = _run_parts()
    ckpt = RunCheckpoint(tmp_path / "out.safetensors", force=False, resume=False)
    with ckpt.writing():
        ckpt.save({}, 0, 1.0, [], model, opt, sched, output=_meta())
        ckpt.save({}, 1, 1.0, [], model, opt, sched)  # no better: the state alone
    assert order == ["output", "state", "state"]


def test_a_failed_write_is_a_user_error_naming_the_file(tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runstate, "atomic_write_bytes", full)
    model, opt, sched = _run_parts()
    ckpt = RunCheckpoint(tmp_path / "out.safetensors", force=False, resume=False)
    with pytest.raises(KdtoolError, match=r"could not write '.*out\.safetensors\.state\.pt': "
                                          r"No space left on device") as e, ckpt.writing():
        ckpt.save({}, 0, 1.0, [], model, opt, sched)
    # The first epoch's state was never written: there is nothing to resume yet.
    assert "free some disk space" in e.value.hint and "--resume" not in e.value.hint
    monkeypatch.undo()
    ckpt = RunCheckpoint(tmp_path / "out.safetensors", force=True, resume=False)
    with ckpt.writing():
        ckpt.save({}, 0, 1.0, [], model, opt, sched)  # epoch 1 on disk
    monkeypatch.setattr(runstate, "atomic_write_bytes", full)
    with pytest.raises(KdtoolError) as e, ckpt.writing():
        ckpt.save({}, 1, 1.0, [], model, opt, sched)
    assert e.value.hint.endswith(", then --resume")
    # Permissions get their own hint; an errno that is no state of the machine is a bug.
    for number, hint in ((errno.EACCES, "check the permissions"), (errno.EBADF, None)):
        def failing(path, data, number=number):
            raise OSError(number, os.strerror(number))

        monkeypatch.setattr(runstate, "atomic_write_bytes", failing)
        with pytest.raises(KdtoolError if hint else OSError) as e, ckpt.writing():
            ckpt.save({}, 2, 1.0, [], model, opt, sched)
        assert hint is None or e.value.hint.startswith(hint)


def test_an_empty_state_file_is_named_as_such(tmp_path):
    """What a power loss can leave: torch.load raised EOFError with no message."""
    (tmp_path / "out.safetensors.state.pt").write_bytes(b"")
    with pytest.raises(KdtoolError, match="the file is empty"):
        load_state(tmp_path / "out.safetensors.state.pt")


def test_a_damaged_or_foreign_run_state_is_a_clear_error(tmp_path):
    """A state of the wrong shape raised AttributeError, KeyError or load_state_dict's
    RuntimeError paragraph."""
    out = tmp_path / "out.safetensors"
    model, opt, sched = _run_parts()
    good = {"command": "train", "config": {}, "epoch": 0, "best": 1.0, "history": [],
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict()}
    other = create_model("tiny_cnn", num_classes=5, in_chans=1).state_dict()
    for state, fragment in [([1, 2], "is damaged: it holds a list, not a run's state"),
                            ({**good, "model": None}, "is damaged: 'model' is missing"),
                            ({**good, "model": other}, "does not fit this run: size mismatch "
                                                       "for linear.weight")]:
        torch.save(state, tmp_path / "out.safetensors.state.pt")
        out.write_bytes(b"")
        ckpt = RunCheckpoint(out, force=False, resume=True)
        with pytest.raises(KdtoolError, match=fragment) as e:
            ckpt.restore({}, *_run_parts())
        assert e.value.hint == "start over: drop --resume and pass --force"
    torch.save(good, tmp_path / "out.safetensors.state.pt")
    assert RunCheckpoint(out, force=False, resume=True).restore({}, *_run_parts())[0] == 1
    # Bytes that are no torch.save archive: torch's own message was "unreadable: 101".
    state = tmp_path / "out.safetensors.state.pt"
    whole = state.read_bytes()
    for damage, fragment in [(whole[:100], r"is not a whole torch\.save archive \(corrupt or "
                                           r"truncated\)"),
                             (b"some notes\n", "is not a whole torch.save archive: it is a "
                                               r"text file \(\.pt\)")]:
        state.write_bytes(damage)
        with pytest.raises(KdtoolError, match=fragment) as e:
            RunCheckpoint(out, force=False, resume=True).restore({}, *_run_parts())
        assert e.value.hint == "start over: drop --resume and pass --force"
    state.unlink()
    state.mkdir()
    with pytest.raises(KdtoolError, match="is a folder, not a file"):
        RunCheckpoint(out, force=False, resume=True)


@pytest.mark.parametrize("command", ["train", "distill"])
def test_resume_without_a_state_is_refused_before_any_data_loads(cli, tmp_path, monkeypatch,
                                                                 command):
    """A missing folder raised FileNotFoundError from the lock; a missing state was said
    only after the data (or teacher) had loaded, minutes on a large set."""
    import kdtool.data
    import kdtool.distill.loop
    import kdtool.train

    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded before the run state was checked")

    # The names the runs call (imported before patching: a module first imported under the
    # patch would keep the stand-in for the tests after this one).
    monkeypatch.setattr(kdtool.data, "load_data", no_loading)
    monkeypatch.setattr(kdtool.train, "load_data", no_loading)
    monkeypatch.setattr(kdtool.distill.loop, "load_for_model", no_loading)
    monkeypatch.setattr(kdtool.distill.loop, "load_checkpoint", no_loading)
    args = (["train", "--arch", "tiny_cnn", "--data", "digits"] if command == "train" else
            ["distill", "--teacher", "t.safetensors", "--val", "digits"])
    for out in (tmp_path / "nodir" / "x.safetensors", tmp_path / "x.safetensors"):
        r = cli(*args, "--resume", "--out", out)
        assert r.code == 1 and "Traceback" not in r.err, r.err
        assert f"no run state to resume at '{out}.state.pt'" in r.err


def test_a_second_process_writing_the_run_is_refused(tmp_path):
    """Two runs on one --out (or --resume of a run still going) took turns over its files."""
    model, opt, sched = _run_parts()
    out = tmp_path / "out.safetensors"
    first = RunCheckpoint(out, force=False, resume=False)
    with first.writing():
        lock = tmp_path / ".out.safetensors.lock"
        assert lock.read_text() == str(__import__("os").getpid())
        for resume in (False, True):
            with pytest.raises(KdtoolError, match=r"another kdtool process \(pid \d+\) is "
                                                  r"writing '.*out\.safetensors'"):
                RunCheckpoint(out, force=not resume, resume=resume)
        first.save({}, 0, 1.0, [], model, opt, sched)
    assert not lock.exists()  # the run ended: the lock went with it
    RunCheckpoint(out, force=False, resume=True)  # and the run may be resumed


def test_the_stopped_hint_offers_resume_only_for_a_state_this_run_wrote(tmp_path):
    import os
    import time

    out = tmp_path / "out.safetensors"
    started = time.time()
    assert "nothing to resume" in runstate.stopped_hint(out, False, started)
    state = runstate.state_path_for(out)
    state.write_bytes(b"state")
    assert "--resume" in runstate.stopped_hint(out, False, started)
    os.utime(state, (started - 3600, started - 3600))  # an earlier run's, replaced by --force
    assert "nothing to resume" in runstate.stopped_hint(out, False, started)
    assert "--resume" in runstate.stopped_hint(out, True, started)  # the one being resumed


def test_an_error_in_the_run_is_the_one_raised_and_finished_epochs_stay_saved(
        tmp_path, monkeypatch):
    gate = _gate_writes(monkeypatch)
    model, opt, sched = _run_parts()
    ckpt = RunCheckpoint(tmp_path / "out.safetensors", force=False, resume=False)
    with pytest.raises(KeyboardInterrupt), ckpt.writing():
        ckpt.save({}, 3, 1.0, [], model, opt, sched)
        gate.set()
        raise KeyboardInterrupt  # Ctrl-C during the next epoch
    assert load_state(ckpt.path)["epoch"] == 3


def test_a_write_failure_during_an_interrupt_is_reported_not_raised(tmp_path, monkeypatch,
                                                                     capsys):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runstate, "atomic_write_bytes", full)
    model, opt, sched = _run_parts()
    ckpt = RunCheckpoint(tmp_path / "out.safetensors", force=False, resume=False)
    with pytest.raises(KeyboardInterrupt), ckpt.writing():
        ckpt.save({}, 0, 1.0, [], model, opt, sched)
        raise KeyboardInterrupt
    assert "No space left on device" in capsys.readouterr().err


def test_a_full_disk_during_kdtool_train_exits_1_with_one_line(cli, tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runstate, "atomic_write_bytes", full)
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--epochs", "1", "--out",
            tmp_path / "t.safetensors")
    assert r.code == 1
    assert "could not write" in r.err and "t.safetensors.state.pt" in r.err
    assert "Traceback" not in r.err


def test_snapshot_copies_tensors_and_containers():
    t = torch.zeros(3)
    obj = {"a": [t, (t, 1)], "b": "x", "c": 2.5}
    copy = snapshot(obj)
    t.add_(1)
    obj["a"].append(0)
    assert copy["a"][0].sum() == 0 and copy["a"][1][0].sum() == 0 and len(copy["a"]) == 2
    assert copy["b"] == "x" and copy["c"] == 2.5


@pytest.mark.parametrize("command", ["train", "distill"])
def test_force_with_resume_is_refused_not_ignored(cli, digits_teacher, tmp_path, command):
    args = (["train", "--arch", "tiny_cnn", "--data", "digits"] if command == "train" else
            ["distill", "--teacher", digits_teacher, "--student", "tiny_cnn"])
    r = cli(*args, "--out", tmp_path / "m.safetensors", "--resume", "--force")
    assert r.code == 1 and "--force and --resume contradict each other" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_a_checkpoint_of_an_unfinished_run_says_so_when_used(tmp_path, capsys):
    """A run stopped at epoch 2 of 200 leaves a checkpoint that export and eval took as
    the finished model without a word."""
    from kdtool.checkpoint import save_checkpoint

    model = create_model("tiny_cnn", num_classes=3, in_chans=1)
    cases = {  # the last stage recorded decides
        "stopped.safetensors": ({"distill": {"config": {"epochs": 200}, "history": [{}, {}]}},
                                "holds a 'kdtool distill' run stopped after epoch 2 of 200"),
        "trained.safetensors": ({"train": {"epochs": 3, "epoch": 2, "history": [{}] * 3}}, None),
        "stopped_train.safetensors": ({"train": {"epochs": 3, "epoch": 1, "history": [{}]}},
                                      "holds a 'kdtool train' run stopped after epoch 1 of 3"),
        # kept at its best validated epoch (2 of 3): its history ends there, finished or not
        "best.safetensors": ({"train": {"config": {"val": "digits:test"}, "epochs": 3,
                                        "epoch": 2, "history": [{}] * 2}}, None),
        "calibrated.safetensors": ({"distill": {"config": {"epochs": 9}, "history": [{}]},
                                    "calibrate": {"batches": 32}}, None),
    }
    for name, (stages, said) in cases.items():
        meta = _meta()
        meta.stages = stages
        path = save_checkpoint(tmp_path / name, model, meta, force=False)
        capsys.readouterr()
        load_checkpoint(path)
        err = capsys.readouterr().err
        if said:
            assert said in err and "--resume" in err, err
        else:
            assert "warning" not in err, err


def test_force_over_an_output_says_when_it_is_replaced(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"a finished run's model")
    RunCheckpoint(out, force=True, resume=False)
    assert (f"--force: '{out}' is replaced when this run saves its first epoch"
            in capsys.readouterr().err.replace("\n", ""))
    assert out.read_bytes() == b"a finished run's model"


def test_a_folder_that_takes_no_new_files_is_a_user_error(tmp_path, monkeypatch):
    """/proc passes the writable check and refuses to create files (ENOENT): a traceback
    from every writer."""
    import tempfile

    from kdtool.io import atomic_write_text
    from kdtool.runstate import RunLock

    def refuse(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(KdtoolError, match=r"cannot create a file in folder '.*' \(for "
                                          r"'.*x\.json'\): No such file or directory"):
        atomic_write_text(tmp_path / "x.json", "{}")
    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(KdtoolError, match="cannot create the run's lock file"):
        RunLock(tmp_path / "m.safetensors").acquire()


def test_a_resume_with_another_device_precision_or_world_size(tmp_path, capsys):
    """Another number of processes is another run (its ranks' noise and averaging): refused.
    Another device or precision goes on, but is said (it was silent)."""
    from kdtool.runstate import check_same_config

    with pytest.raises(KdtoolError, match="world_size was 2, now 1"):
        check_same_config({"lr": 0.1, "world_size": 2}, {"lr": 0.1, "world_size": 1}, tmp_path)
    check_same_config({"lr": 0.1}, {"lr": 0.1, "world_size": 1}, tmp_path)  # an older state
    # every change at once: --optimizer sgd was refused as "lr was 0.001, now 0.1" alone
    with pytest.raises(KdtoolError, match="lr was 0.001, now 0.1; optimizer was 'adam', now "
                                          "'sgd'"):
        check_same_config({"lr": 0.001, "optimizer": "adam"}, {"lr": 0.1, "optimizer": "sgd"},
                          tmp_path)
    out = tmp_path / "out.safetensors"
    model, opt, sched = _run_parts()
    ckpt = RunCheckpoint(out, force=False, resume=False)
    ckpt.restore({"precision": "fp32", "device": "cpu", "epochs": 5}, model, opt, sched)
    with ckpt.writing():
        ckpt.save({"precision": "fp32", "device": "cpu", "epochs": 5}, 0, 1.0, [], model, opt,
                  sched, output=None)
    out.write_bytes(b"")
    capsys.readouterr()
    RunCheckpoint(out, force=False, resume=True).restore(
        {"precision": "bf16", "device": "cpu", "epochs": 5}, *_run_parts())
    assert "with precision fp32 -> bf16: the run goes on" in capsys.readouterr().err.replace(
        "\n", "")


def test_resume_of_a_finished_run_without_its_output_or_an_output_without_state(tmp_path):
    out = tmp_path / "out.safetensors"
    model, opt, sched = _run_parts()
    ckpt = RunCheckpoint(out, force=False, resume=False)
    ckpt.restore({"epochs": 1}, model, opt, sched)
    with ckpt.writing():
        ckpt.save({"epochs": 1}, 0, 1.0, [], model, opt, sched)  # its last epoch
    # It exited 0 naming the missing file as its output.
    with pytest.raises(KdtoolError, match=r"finished \(epoch 1 of 1\), and its output "
                                          r"'.*out\.safetensors' is gone"):
        RunCheckpoint(out, force=False, resume=True).restore({"epochs": 1}, *_run_parts())
    # The output without its state (a kill during the first state write): --resume said
    # "start without --resume", which said "already exists".
    state_path_for(out).unlink()
    out.write_bytes(b"weights")
    with pytest.raises(KdtoolError, match="is there without it") as e:
        RunCheckpoint(out, force=False, resume=True)
    assert "start over with --force" in e.value.hint
