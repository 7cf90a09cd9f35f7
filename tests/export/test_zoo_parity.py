"""ONNX parity at batch 1 and 37 for every zoo architecture, BN folded and not folded.

Every registered architecture runs with ``-m slow`` (the dynamo exporter takes 5-40 s
for a deep graph on 2 shared cores). The default suite covers each family: resnet8 and
tiny_cnn as registered, and MobileNetV2, DenseNet and WideResNet as shallow
instances of the zoo's own classes (same blocks, fewer of them).
"""

import numpy as np
import onnx
import pytest
import torch

from kdtool.bn import bn_layers
from kdtool.export.batch import parse_batch
from kdtool.export.onnx_export import export_onnx
from kdtool.export.parity import TOLERANCES, compare, parity_batches
from kdtool.export.runners import OrtRunner, TorchRunner
from kdtool.models import create_model, list_models
from kdtool.models.densenet import DenseNet
from kdtool.models.mobilenetv2 import MobileNetV2
from kdtool.models.wide_resnet import WideResNet

DEFAULT = {"resnet8", "tiny_cnn"}


class _ShallowMobileNetV2(MobileNetV2):
    # Both block kinds: a conv shortcut (16->24), an identity shortcut (24->24), stride 2.
    cfg = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 320, 1, 2))


SHALLOW = {
    "mobilenetv2_shallow": lambda: _ShallowMobileNetV2(num_classes=10),
    "densenet_shallow": lambda: DenseNet([1, 2, 1, 1], growth_rate=8, num_classes=10),
    "wrn10_2": lambda: WideResNet(depth=10, widen_factor=2, num_classes=10),
}
SIZE = 16  # CIFAR-style zoo models pool globally: a small input keeps the checks fast


def _arch_params():
    for arch in list_models():
        marks = () if arch in DEFAULT else (pytest.mark.slow,)
        yield pytest.param(arch, marks=marks, id=arch)
    for name in SHALLOW:
        yield pytest.param(name, id=name)


def _trained_looking(arch: str, seed: int = 0) -> torch.nn.Module:
    """Random weights with non-trivial BN statistics, so that folding has work to do."""
    torch.manual_seed(seed)
    model = SHALLOW[arch]() if arch in SHALLOW else create_model(arch, num_classes=10)
    for _, bn in bn_layers(model):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _fold(model):
    fold = pytest.importorskip("kdtool.calibrate.fold")
    folded, report = fold.fold_bn(model, torch.randn(4, 3, SIZE, SIZE))
    assert not bn_layers(folded) or report.kept, "fold_bn left BatchNorm layers"
    return folded


@pytest.mark.parametrize("folded", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("arch", list(_arch_params()))
def test_onnx_matches_pytorch_at_batch_1_and_37(arch, folded, tmp_path):
    model = _trained_looking(arch)
    if folded:
        model = _fold(model)
    profile = parse_batch("1:32:64")
    proto, record = export_onnx(model, (3, SIZE, SIZE), batch=profile)
    if folded:
        assert "BatchNormalization" not in record["ops"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # dynamic batch
    path = tmp_path / f"{arch}.onnx"
    onnx.save(proto, str(path))
    batches, _ = parity_batches(None, [0.0] * 3, [1.0] * 3, (3, SIZE, SIZE), profile, 37)
    assert [len(b) for b in batches] == [1, 37]
    with OrtRunner(path) as ort_runner:
        report = compare(TorchRunner(model), ort_runner, batches, TOLERANCES["fp32"])
        assert report.passed, report.summary()
        assert report.top1_agreement == 100.0
        # the symbolic batch takes any size, not only the two checked
        assert ort_runner.infer(np.zeros((5, 3, SIZE, SIZE), np.float32)).shape == (5, 10)


def test_torchscript_exporter_gives_the_same_graph_outputs(tmp_path):
    model = _trained_looking("resnet8")
    profile = parse_batch("1:32:64")
    batches, _ = parity_batches(None, [0.0] * 3, [1.0] * 3, (3, SIZE, SIZE), profile, 37)
    outputs = []
    for exporter in ("torchscript", "dynamo"):
        proto, record = export_onnx(model, (3, SIZE, SIZE), batch=profile, exporter=exporter)
        assert record["exporter"] == exporter
        path = tmp_path / f"{exporter}.onnx"
        onnx.save(proto, str(path))
        with OrtRunner(path) as runner:
            assert compare(TorchRunner(model), runner, batches, TOLERANCES["fp32"]).passed
            outputs.append(runner.infer(batches[1]))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
