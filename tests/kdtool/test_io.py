"""kdtool.io: input checks and atomic, never-overwriting output."""

from pathlib import Path

import pytest

from kdtool.errors import KdtoolError
from kdtool.io import atomic_write_text, check_output, require_file


def test_require_file_names_the_path_and_the_fix(tmp_path):
    f = tmp_path / "model.onnx"
    with pytest.raises(KdtoolError, match="ONNX model '.*model.onnx' does not exist") as e:
        require_file(f, "ONNX model", "pass the exported file")
    assert e.value.hint == "pass the exported file"
    with pytest.raises(KdtoolError, match="is not a file"):
        require_file(tmp_path, "ONNX model")
    f.write_bytes(b"x")
    assert require_file(str(f), "ONNX model") == f


def test_outputs_are_written_whole_and_never_overwritten_without_force(tmp_path):
    out = tmp_path / "sub" / "result.json"
    assert check_output(out, force=False) == out and out.parent.is_dir()
    atomic_write_text(out, "first")
    with pytest.raises(KdtoolError, match="already exists"):
        check_output(out, force=False)
    check_output(out, force=True)
    atomic_write_text(out, "second")
    assert out.read_text() == "second"
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temp file left


@pytest.mark.parametrize(("args", "fragment"), [
    (["train", "--data", "digits", "--arch", "tiny_cnn", "--out", "m.pt"], "'m.safetensors'"),
    (["distill", "--teacher", "{teacher}", "--student", "tiny_cnn", "--out", "m.pth"],
     "'m.safetensors'"),
    (["calibrate", "{teacher}", "--data", "digits", "--out", "m.bin"], "'m.safetensors'"),
    (["convert", "{pt}", "--arch", "tiny_cnn", "--mean", "0.5", "--std", "0.5", "--out",
      "m.pt"], "'m.safetensors'"),
    (["export", "{teacher}", "--onnx", "m.txt"], "'m.onnx'"),
    # reports kdtool never reads: a slip put one over the model it came from, with --force
    (["bench", "{teacher}", "--markdown", "{teacher}", "--force"], "teacher.md'"),
    (["predict", "{teacher}", "{teacher}", "--csv", "{teacher}", "--force"], "teacher.csv'"),
])
def test_outputs_get_the_suffix_they_are_read_back_by(cli, digits_teacher, tmp_path,
                                                      monkeypatch, args, fragment):
    """kdtool reads a .pt as a plain state_dict: a checkpoint written as m.pt was a file
    kdtool itself could not load. The name is refused before any work."""
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save({}, tmp_path / "plain.pt")
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(Path(digits_teacher).read_bytes())
    r = cli(*[a.format(teacher=teacher, pt=tmp_path / "plain.pt") for a in args])
    assert r.code == 1 and "must end in" in r.err and fragment in r.err, r.err
    assert "Traceback" not in r.err and not list(tmp_path.glob("m.*"))
    assert teacher.read_bytes() == Path(digits_teacher).read_bytes()


def test_a_write_that_fails_names_the_file(tmp_path):
    """safetensors and onnx write bytes that say "disk full" but not where."""
    import errno

    from kdtool.io import atomic_path

    with pytest.raises(OSError) as e, atomic_path(tmp_path / "m.onnx"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # and no temporary file stays behind


def test_outputs_the_shell_did_not_expand_or_too_long_to_write_beside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdtoolError, match="starts with '~', which the shell did not expand"):
        check_output("~/x.safetensors", False)
    assert not (tmp_path / "~").exists()
    name = "a" * 228 + ".safetensors"  # 240 bytes: legal, but its .state.pt temp is not
    with pytest.raises(KdtoolError, match="is 240 bytes; the files kdtool writes beside it"):
        check_output(tmp_path / name, False)
    longest = check_output(tmp_path / ("a" * 205 + ".safetensors"), False)  # 217 bytes
    atomic_write_text(longest.with_name(longest.name + ".state.pt"), "its state")  # fits


def test_outputs_get_the_umasks_permissions_even_from_writers_that_make_their_own_file(
        tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    from kdtool.io import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.safetensors") as tmp:  # writes a temp file + rename
            save_file({"x": torch.zeros(2)}, str(tmp))
        atomic_write_text(tmp_path / "b.txt", "b")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.txt"):  # readable by others, as any new file (0644)
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_temporaries_left_by_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """SIGKILL skips every cleanup: a run's 44 MB temporary stayed hidden beside its output
    for good. One of a live process (this one; another host's) is left alone."""
    import os
    import subprocess
    import sys
    import time

    from kdtool.io import temp_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()

    def temp(output: str, pid: str, tail: str, age_s: float = 3600) -> Path:
        path = tmp_path / (temp_prefix(output).replace(f"-{os.getpid()}.", f"-{pid}.") + tail)
        path.write_bytes(b"half a file")
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    temp("m.safetensors", dead, "abcd1234.tmp")  # its writer is gone: removed
    kept = [temp("m.safetensors", str(os.getpid()), "live0000.tmp"),  # being written
            temp("n.safetensors", dead, "abcd1234.tmp"),  # another output's
            temp("m.safetensors", dead, "new00000.tmp", age_s=5)]  # touched just now
    kept.append(tmp_path / ".m.safetensors.0a0b0c-1.zzzz0000.tmp")  # another host's writer
    kept[-1].write_bytes(b"being written there")
    atomic_write_text(tmp_path / "m.safetensors", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.safetensors", *(p.name for p in kept)])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_an_output_reaches_the_disk_before_its_name_and_its_name_after(tmp_path, monkeypatch):
    """fsync of the written temporary, then the rename, then the folder's fsync: a power loss
    leaves the old file or the whole new one under the name, never an empty one."""
    import os

    from kdtool.io import atomic_path

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "model.safetensors"
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"weights")
        written = tmp.name
    assert events == [f"fsync {written}", "rename", f"fsync {tmp_path.name}"]
    assert out.read_bytes() == b"weights"


@pytest.mark.parametrize(("args", "what"), [
    (["calibrate", "{teacher}", "--data", "digits", "--out", "{out}", "--force"],
     "the checkpoint to calibrate"),
    (["convert", "{plain}", "--arch", "tiny_cnn", "--mean", "0.5", "--std", "0.5", "--out",
      "{plain_out}", "--force"], "the state_dict to convert"),
    (["distill", "--teacher", "{teacher}", "--student", "tiny_cnn", "--out", "{out}",
      "--force"], "the teacher"),
])
@pytest.mark.parametrize("link", ["same", "hard", "sym"])
def test_an_output_that_is_its_own_input_is_refused_even_with_force(
        cli, digits_teacher, tmp_path, args, what, link):
    """calibrate --out X.safetensors --force on X replaced the noise student it calibrates,
    which could then never be calibrated again."""
    import os

    import torch
    from safetensors.torch import save_file

    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(Path(digits_teacher).read_bytes())
    plain = tmp_path / "plain.safetensors"  # a plain state_dict, as convert takes one
    save_file({k: v.contiguous() for k, v in torch.nn.Linear(2, 2).state_dict().items()}, plain)
    out = {"same": lambda p: p, "hard": lambda p: (os.link(p, tmp_path / "h.safetensors"),
                                                   tmp_path / "h.safetensors")[1],
           "sym": lambda p: ((tmp_path / "s.safetensors").symlink_to(p),
                             tmp_path / "s.safetensors")[1]}[link]
    source = plain if "{plain_out}" in args else teacher
    before = source.read_bytes()
    target = out(source)
    r = cli(*[a.format(teacher=teacher, plain=plain, out=target, plain_out=target)
              for a in args])
    assert r.code == 1 and f"is {what}: the output would replace its own input" in r.err, r.err
    assert source.read_bytes() == before


def test_an_output_under_a_file_names_the_file(tmp_path):
    """mkdir said only "File exists", of the folder it could not create."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(KdtoolError, match=r"cannot create folder '.*afile/sub': '.*afile' is "
                                          r"a file") as e:
        check_output(tmp_path / "afile" / "sub" / "x.onnx", force=False)
    assert e.value.hint == "choose another --out folder"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(KdtoolError, match="'.*dangling' is a broken link"):
        check_output(tmp_path / "dangling" / "x.onnx", force=False)
