"""``--precision`` (bf16 autocast) and ``--channels-last`` (NHWC) for training steps."""

from __future__ import annotations

import pytest
import torch

import kdtool.device as device
from kdtool.checkpoint import load_checkpoint, read_meta
from kdtool.device import cpu_has_native_bf16, memory_format_for, resolve_precision
from kdtool.errors import KdtoolError
from kdtool.train import TrainConfig, Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_on_cuda_and_fp32_on_a_cpu():
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp32", CUDA) == "fp32"
    assert memory_format_for(True) is torch.channels_last
    assert memory_format_for(False) is None
    with pytest.raises(KdtoolError, match="did you mean 'bf16'"):
        resolve_precision("bf61", CPU)


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, capsys):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("bf16", CPU) == "bf16"
    assert "emulated" in capsys.readouterr().err
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    resolve_precision("bf16", CPU)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("line", "native"), [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),  # AMD Zen 4, Intel
    ("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
    ("Features\t: fp asimd sve bf16 i8mm", True),  # Arm Neoverse V1/N2
    ("flags\t\t: fpu sse2 avx2 avx512f avx512bw", False),  # AVX-512, no bf16
    ("Features\t: fp asimd", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(line, native):
    assert cpu_has_native_bf16(f"processor\t: 0\n{line}\n") is native


def _conv_dtypes(model: torch.nn.Module) -> list:
    # The last conv: its input has several channels, so NCHW and NHWC strides differ.
    seen = []
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last.register_forward_hook(lambda m, a, y: seen.append((y.dtype, a[0].is_contiguous(
        memory_format=torch.channels_last))))
    return seen


@pytest.mark.parametrize(("precision", "channels_last", "dtype"),
                         [("bf16", True, torch.bfloat16), ("auto", True, torch.float32),
                          ("bf16", False, torch.bfloat16), ("auto", False, torch.float32)])
def test_train_steps_run_in_the_chosen_precision_and_layout(tmp_path, monkeypatch, precision,
                                                            channels_last, dtype):
    seen = []
    real = Trainer._train_epoch

    def spy(self, model, *a):
        seen.extend([] if seen else [_conv_dtypes(model)])
        return real(self, model, *a)

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    cfg = TrainConfig(arch="tiny_cnn", data="digits", epochs=1, batch_size=256,
                      augment=False, precision=precision, channels_last=channels_last)
    Trainer(cfg, tmp_path / "t.safetensors").run()
    assert seen[0] and set(seen[0]) == {(dtype, channels_last)}
    model, _ = load_checkpoint(tmp_path / "t.safetensors")
    assert {v.dtype for v in model.state_dict().values() if v.is_floating_point()} == {
        torch.float32}  # autocast: the weights themselves stay float32


def test_the_commands_take_precision_and_suggest_on_a_typo(cli, digits_teacher, tmp_path):
    r = cli("distill", "--teacher", digits_teacher, "--student", "tiny_cnn", "--epochs", "1",
            "--iters-per-epoch", "2", "--batch-size", "32", "--precision", "bf16",
            "--out", tmp_path / "s.safetensors", "--json")
    assert r.code == 0, r.err
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--epochs", "1",
            "--no-channels-last", "--out", tmp_path / "t.safetensors", "--json")
    assert r.code == 0, r.err
    assert read_meta(tmp_path / "t.safetensors").stages["train"]["config"]["channels_last"] is False
    bad = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--precision", "bf61",
              "--out", tmp_path / "t.safetensors")
    assert bad.code == 1 and "did you mean 'bf16'" in bad.err


@pytest.mark.parametrize(("name", "gpus", "message"), [
    ("mps", 0, "device 'mps' is not supported"),
    ("meta", 0, "device 'meta' is not supported"),
    ("tpu", 0, "unknown device 'tpu'"),
    ("cuda", 0, "no CUDA GPU is available"),
    ("cuda:1", 1, "this machine has 1 CUDA GPU (use cuda:0 to cuda:0)"),
    ("cuda:2", 2, "this machine has 2 CUDA GPUs (use cuda:0 to cuda:1)"),
])
def test_a_device_that_cannot_run_is_refused_up_front(monkeypatch, name, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(KdtoolError) as e:
        device.resolve_device(name)
    assert message in str(e.value)


def test_the_devices_that_run_resolve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device.resolve_device("cuda:1") == torch.device("cuda:1")
    assert device.resolve_device("cpu") == torch.device("cpu")
