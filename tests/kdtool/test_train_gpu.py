"""The CUDA path of ``kdtool train`` (bf16 autocast, channels_last, GPU augmentation)."""

import pytest
import torch

from kdtool.checkpoint import load_checkpoint
from kdtool.train import TrainConfig, Trainer

pytestmark = pytest.mark.gpu


def test_cuda_training_learns(tmp_path):
    # no augmentation: flips and 4-px shifts destroy 8x8 digits (tested in test_loader)
    cfg = TrainConfig(arch="resnet8", data="digits", val="digits:test", epochs=6, batch_size=64,
                      device="cuda")
    result = Trainer(cfg, tmp_path / "a.safetensors").run()
    assert result["device"].startswith("cuda")
    assert result["val_top1"] > 90
    model, _ = load_checkpoint(tmp_path / "a.safetensors")
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert torch.cuda.max_memory_allocated() > 0
