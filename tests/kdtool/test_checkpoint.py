import re
from pathlib import Path

import pytest
import torch

from kdtool.checkpoint import (
    ForeignSpec,
    ModelMeta,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from kdtool.errors import KdtoolError
from kdtool.models import create_model
from kdtool.runinfo import provenance


def _meta(arch="tiny_cnn", num_classes=10, in_chans=3) -> ModelMeta:
    return ModelMeta(arch=arch, num_classes=num_classes, in_chans=in_chans, input_size=[32, 32],
                     mean=[0.5] * in_chans, std=[0.25] * in_chans,
                     class_names=[f"c{i}" for i in range(num_classes)],
                     provenance=provenance(seed=3, metrics={"val_top1": 91.5}),
                     stages={"train": {"epochs": 2}})


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=g) + (0.5 if "running_var" in name else 0))
        else:
            t.fill_(7)
    return model


def test_round_trip_is_bit_identical(tmp_path: Path):
    model = _randomised(create_model("tiny_cnn"))
    saved_meta = _meta()
    path = save_checkpoint(tmp_path / "m.safetensors", model, saved_meta, force=False)
    loaded, meta = load_checkpoint(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    assert meta == saved_meta
    assert meta.provenance["seed"] == 3 and meta.provenance["metrics"] == {"val_top1": 91.5}
    assert meta.class_names == [f"c{i}" for i in range(10)]
    assert not loaded.training
    assert read_meta(path) == meta


def test_overwrite_refused_without_force(tmp_path: Path):
    model = create_model("tiny_cnn")
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta(), force=False)
    before = path.read_bytes()
    with pytest.raises(KdtoolError, match="already exists.*--force"):
        save_checkpoint(path, _randomised(create_model("tiny_cnn")), _meta(), force=False)
    assert path.read_bytes() == before
    save_checkpoint(path, _randomised(create_model("tiny_cnn")), _meta(), force=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left
    assert path.stat().st_mode & 0o644 == 0o644  # readable like any new file, not 0600


def test_truncated_file_is_a_clear_error(tmp_path: Path):
    path = save_checkpoint(tmp_path / "m.safetensors", create_model("tiny_cnn"), _meta(), False)
    data = path.read_bytes()
    for cut in (len(data) - 100, 20, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(KdtoolError, match="m.safetensors.*(corrupt|truncated)"):
            load_checkpoint(path)


def test_missing_file_and_not_a_checkpoint(tmp_path: Path):
    with pytest.raises(KdtoolError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(KdtoolError, match="without kdtool metadata.*--arch"):
        load_checkpoint(tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(KdtoolError, match="is a text file"):  # not "corrupt"
        load_checkpoint(tmp_path / "text.safetensors")
    damaged = b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\": {\"dtype\""  # header cut short
    (tmp_path / "cut.safetensors").write_bytes(damaged)
    with pytest.raises(KdtoolError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.safetensors")
    # A corrupt plain state_dict is named as corrupt, not as lacking --mean/--std (a
    # kdtool architecture has no published normalisation to fall back on).
    for name in ("cut.safetensors", "damaged.pt"):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(KdtoolError, match="corrupt or truncated"):
            load_checkpoint(tmp_path / name, ForeignSpec("tiny_cnn"))
    # torch.save's archive cut short (torch itself says "KeyError: 101" or speaks of miniz).
    torch.save(create_model("tiny_cnn").state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(KdtoolError, match="cut.pt' is corrupt or truncated.*torch.save"):
        load_checkpoint(tmp_path / "cut.pt", ForeignSpec("tiny_cnn", mean=[0.5], std=[0.5]))
    legacy = tmp_path / "legacy.pt"  # torch.save's pre-1.6 format: a pickle, still readable
    torch.save(create_model("tiny_cnn").state_dict(), legacy,
               _use_new_zipfile_serialization=False)
    load_checkpoint(legacy, ForeignSpec("tiny_cnn", mean=[0.5], std=[0.5]))


def test_a_damaged_checkpoint_whose_header_length_looks_like_a_magic_number_is_corrupt(
        tmp_path: Path):
    """A header length whose first byte is 0x80 (a pickle's) or reads "BM" (a bitmap's) was
    named as that kind, with advice to rename the file."""
    path = tmp_path / "m.safetensors"
    for first in (b"\x80", b"BM"):
        header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        # pad the JSON so that its length's low bytes are ``first``
        header += b" " * ((int.from_bytes(first, "little") - len(header)) % 256 ** len(first))
        data = len(header).to_bytes(8, "little") + header + b"\0" * 4
        assert data.startswith(first)
        path.write_bytes(data[:-2])  # cut: the tensor's bytes are short
        with pytest.raises(KdtoolError, match="is corrupt or truncated"):
            load_checkpoint(path)


def test_a_file_of_another_kind_is_named_not_called_corrupt(tmp_path: Path, cli):
    import numpy as np
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "digit.png")
    np.savez(tmp_path / "data.npz", x=np.zeros((1, 8, 8, 1), np.uint8), y=np.zeros(1))
    torch.save(create_model("tiny_cnn").state_dict(), tmp_path / "weights.safetensors")
    (tmp_path / "s.sweep.csv").write_text("batches,top1\n1,80.5\n2,82.1 \u00e9\n")
    for name, kind in [("digit.png", "a PNG image"), ("data.npz", "an .npz array file"),
                       ("weights.safetensors", "a torch.save file"),
                       ("s.sweep.csv", "a text file (.csv)")]:
        r = cli("info", tmp_path / name)
        assert r.code == 1 and f"is {kind}, not a" in r.err, r.err
        assert "corrupt" not in r.err and "Traceback" not in r.err
    r = cli("info", tmp_path / "weights.safetensors")
    assert "rename it to weights.pt" in r.err
    # Under a PyTorch suffix (read as a state_dict), and as a plain safetensors state_dict.
    (tmp_path / "digit.pt").write_bytes((tmp_path / "digit.png").read_bytes())
    spec = ForeignSpec("tiny_cnn", mean=[0.5], std=[0.5])
    for name in ("digit.pt", "digit.png"):
        with pytest.raises(KdtoolError, match="is a PNG image, not a model checkpoint"):
            load_checkpoint(tmp_path / name, spec)


def test_wrong_architecture_names_first_mismatch(tmp_path: Path):
    path = save_checkpoint(tmp_path / "m.safetensors", create_model("resnet8"),
                           _meta("resnet8"), False)
    torch.save(create_model("resnet8", num_classes=4).state_dict(), tmp_path / "m4.pt")
    with pytest.raises(KdtoolError, match=r"'linear.weight'.*\(4, 64\).*\(10, 64\)"):
        load_checkpoint(tmp_path / "m4.pt", ForeignSpec("resnet8", 10, 3, mean=[0.5] * 3,
                                                         std=[0.5] * 3))
    with pytest.raises(KdtoolError, match="lacks tensor"):
        load_checkpoint(path, ForeignSpec("resnet20", mean=[0.5] * 3, std=[0.5] * 3))


def test_foreign_state_dict_loads_without_unpickling(tmp_path: Path):
    model = _randomised(create_model("tv:resnet18", num_classes=5))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               tmp_path / "r18.pth")
    loaded, meta = load_checkpoint(tmp_path / "r18.pth", ForeignSpec("tv:resnet18", 5))
    assert meta.mean == [0.485, 0.456, 0.406] and meta.input_size == [224, 224]
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model.eval()(x))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(KdtoolError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt", ForeignSpec("tv:resnet18", 5))


def test_a_torchvision_file_under_kdtools_name_is_told_its_architecture(tmp_path: Path):
    """torchvision's resnet18 (7x7 stem, fc) and kdtool's (3x3 stem, linear) share a name:
    the mismatch comes before any question on normalisation, with the name to pass."""
    torch.save(create_model("tv:resnet18", num_classes=5).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(KdtoolError) as e:
        load_checkpoint(tmp_path / "r18.pth", ForeignSpec("resnet18"))
    assert "(64, 3, 7, 7)" in e.value.message  # the stem, the first tensor that differs
    assert e.value.hint == ("its tensors are those of --arch tv:resnet18, not resnet18: "
                            "pass --arch tv:resnet18")
    torch.save(create_model("resnet18").state_dict(), tmp_path / "k18.pth")
    with pytest.raises(KdtoolError) as e:  # and the other way round
        load_checkpoint(tmp_path / "k18.pth", ForeignSpec("tv:resnet18"))
    assert "pass --arch resnet18" in e.value.hint


def test_a_lightning_checkpoint_loads_with_its_wrapper_prefix_removed(tmp_path: Path):
    model = _randomised(create_model("tiny_cnn", num_classes=4))
    ckpt = {"epoch": 3, "global_step": 120, "optimizer_states": [],
            "state_dict": {"model.net." + k: v for k, v in model.state_dict().items()}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded, meta = load_checkpoint(tmp_path / "last.ckpt",
                                   ForeignSpec("tiny_cnn", mean=[0.5], std=[0.5]))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert meta.num_classes == 4  # read from the tensors once the prefix is off
    assert meta.provenance["state_dict_key"] == "state_dict"
    assert meta.provenance["stripped_prefix"] == "model.net."
    # A prefix that does not make the names match stays, and the error shows the file's own.
    ckpt["state_dict"]["loss.weight"] = torch.ones(4)
    torch.save(ckpt, tmp_path / "mixed.ckpt")
    with pytest.raises(KdtoolError, match=r"lacks tensor 'conv1.weight'.*its own are named "
                                          r"like 'model.net.conv1.weight'"):
        load_checkpoint(tmp_path / "mixed.ckpt", ForeignSpec("tiny_cnn", mean=[0.5], std=[0.5]))


def test_pickles_are_refused_in_kdtools_words_never_with_torchs_advice(tmp_path: Path,
                                                                       capsys):
    """torch's message suggests weights_only=False; a blocked module (os) was named in a
    form kdtool missed, so users read that advice instead of what the file holds."""
    import os
    import pickle

    from kdtool.runstate import load_state

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"w": Evil()}, protocol=4))
    spec = ForeignSpec("tiny_cnn", mean=[0.5], std=[0.5])
    with pytest.raises(KdtoolError) as e:
        load_checkpoint(tmp_path / "evil.pt", spec)
    assert f"holds a pickled Python object ({os.system.__module__}.system)" in e.value.message
    with pytest.raises(KdtoolError) as raw:  # pickle.dump: an opcode torch's loader lacks
        load_checkpoint(tmp_path / "raw.pt", spec)
    assert "a pickle that torch's tensors-only loader cannot read" in raw.value.message
    (tmp_path / "run.state.pt").write_bytes((tmp_path / "evil.pt").read_bytes())
    with pytest.raises(KdtoolError) as state:
        load_state(tmp_path / "run.state.pt")
    assert "holds a pickled Python object" in state.value.message
    for err in (e, raw, state):
        assert "weights_only" not in str(err.value) and "never unpickles" in err.value.message
    assert "UserWarning" not in capsys.readouterr().err  # torch's note on pickle protocols


def test_foreign_zoo_model_needs_normalisation(tmp_path: Path):
    torch.save(create_model("resnet8").state_dict(), tmp_path / "r8.pt")
    with pytest.raises(KdtoolError, match="--mean and --std"):
        load_checkpoint(tmp_path / "r8.pt", ForeignSpec("resnet8"))


def test_inconsistent_metadata_is_refused(tmp_path: Path):
    bad = _meta()
    bad.mean = [0.5]
    with pytest.raises(KdtoolError, match="mean/std need 3 values"):
        save_checkpoint(tmp_path / "m.safetensors", create_model("tiny_cnn"), bad, False)
    bad = _meta()
    bad.std = [0.25, float("nan"), 0.25]  # NaN > 0 is False, and so is NaN <= 0
    with pytest.raises(KdtoolError, match="mean/std must be finite numbers"):
        save_checkpoint(tmp_path / "m.safetensors", create_model("tiny_cnn"), bad, False)


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda d: "a string", "malformed kdtool metadata"),
    (lambda d: {**d, "format_version": "1"}, "format_version '1' is not a version number"),
    (lambda d: {**d, "stages": ["train"]}, "stages must be dict"),
    (lambda d: {**d, "stages": {"calibrate": "folded"}}, "every stage record must be an obj"),
    (lambda d: {**d, "class_names": list(range(10))}, "class names must be strings"),
    (lambda d: {**d, "arch_args": [1]}, "arch_args must be dict"),
    (lambda d: {**d, "arch_args": {"depth": 3}}, "the recorded arch_args {'depth': 3} do not fit"),
    (lambda d: {**d, "num_classes": 10**9}, "num_classes must be a whole number from 1 to "
                                            "1,000,000, got 1000000000"),
    (lambda d: {**d, "num_classes": True}, "num_classes must be a whole number"),
    (lambda d: {**d, "input_size": [100000, 100000]}, "each from 1 to 16,384"),
    (lambda d: {**d, "provenance": {"x": [[[[1]]]]} | {"deep": "[" * 100_000}},
     None),  # a long string is only data
    # said by name, not as ModelMeta.__init__()'s missing positional argument
    (lambda d: {k: v for k, v in d.items() if k != "mean"}, "malformed kdtool metadata: it "
                                                             "lacks 'mean'"),
    (lambda d: {**d, "colour": 1}, "it has unknown fields 'colour'"),
])
def test_crafted_metadata_is_a_clear_error_not_a_traceback_or_a_huge_allocation(
        tmp_path: Path, edit, fragment):
    import json

    from kdtool.checkpoint import write_checkpoint

    model = create_model("tiny_cnn")
    meta = json.loads(_meta().to_json())
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, {k: v.contiguous() for k, v in model.state_dict().items()},
                     json.dumps(edit(meta)))
    if fragment is None:
        load_checkpoint(path)
        return
    with pytest.raises(KdtoolError, match=re.escape(fragment)):
        load_checkpoint(path)


def test_deeply_nested_metadata_is_malformed_not_a_recursion_error(tmp_path: Path):
    from kdtool.checkpoint import write_checkpoint

    path = tmp_path / "m.safetensors"
    write_checkpoint(path, {"w": torch.zeros(1)}, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(KdtoolError, match="malformed kdtool metadata") as e:
        read_meta(path)
    assert "kdtool convert" in e.value.hint
    write_checkpoint(path, {"w": torch.zeros(1)}, '{"format": "kdtool", "mean": [0.5],}')
    with pytest.raises(KdtoolError, match=r"malformed kdtool metadata: its JSON is broken"):
        read_meta(path)


def test_a_class_name_twice_is_refused(tmp_path: Path):
    bad = _meta()
    bad.class_names[3] = "c1"
    with pytest.raises(KdtoolError, match="class name 'c1' appears twice"):
        save_checkpoint(tmp_path / "m.safetensors", create_model("tiny_cnn"), bad, False)
    bad.class_names[3] = "Cafe\u0301"  # NFC-equal to "Café": one folder name for both
    bad.class_names[4] = "Caf\u00e9"
    with pytest.raises(KdtoolError, match="appears twice"):
        save_checkpoint(tmp_path / "m.safetensors", create_model("tiny_cnn"), bad, False)


def test_provenance_names_the_code_and_the_machine_a_rerun_needs(tmp_path, cli, monkeypatch):
    import subprocess

    import kdtool.runinfo as runinfo

    root = Path(runinfo.__file__).resolve().parents[1]
    prov = provenance(seed=1, device="cpu", precision="fp32")
    assert prov["machine"]["device"] == "cpu" and prov["machine"]["precision"] == "fp32"
    assert prov["machine"]["torch_threads"] == torch.get_num_threads()
    assert prov["machine"]["usable_cpus"] >= 1 and prov["machine"]["cpu"]
    if (root / ".git").exists():  # a checkout: its commit, and whether it has changes
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert re.fullmatch(re.escape(head) + r"(-dirty)?", prov["kdtool_commit"])
    runinfo.code_commit.cache_clear()
    monkeypatch.setattr(runinfo, "__file__", str(tmp_path / "kdtool" / "runinfo.py"))
    try:
        assert "kdtool_commit" not in provenance()  # an installed release: its version says
    finally:
        runinfo.code_commit.cache_clear()
    path = save_checkpoint(tmp_path / "m.safetensors", create_model("tiny_cnn"),
                           ModelMeta(arch="tiny_cnn", num_classes=10, in_chans=3,
                                     input_size=[32, 32], mean=[0.5] * 3, std=[0.25] * 3,
                                     provenance=prov), force=False)
    r = cli("info", path)
    assert r.code == 0, r.err
    line = " ".join(r.out.split())
    threads = torch.get_num_threads()
    assert f"cpu, fp32, {threads} torch thread{'s' * (threads != 1)};" in line
    assert "usable CPUs" in line and "{" not in line
