import pytest
import torch

from kdtool.bn import batch_stats, bn_layers
from kdtool.data import ImageData
from kdtool.loader import Augment, DeviceLoader, cutout, random_crop_flip
from kdtool.models import create_model


def _data(n=10, c=3, h=6, w=5) -> ImageData:
    x = torch.arange(n * c * h * w, dtype=torch.int64).remainder(251).to(torch.uint8)
    return ImageData(x=x.view(n, c, h, w), y=torch.arange(n) % 3, class_names=["a", "b", "c"],
                     source="test")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_crop_flip_matches_a_per_sample_reference(device):
    x = _data().x.to(device)
    gen = torch.Generator(device).manual_seed(0)
    out = random_crop_flip(x, Augment(pad=2, flip=True), gen)
    # replay the same draws to build the reference one sample at a time
    gen = torch.Generator(device).manual_seed(0)
    dy = torch.randint(0, 5, (10,), generator=gen, device=device)
    dx = torch.randint(0, 5, (10,), generator=gen, device=device)
    flip = torch.rand(10, generator=gen, device=device) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(10):
        ref = padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 5]
        assert torch.equal(out[i], ref.flip(2) if flip[i] else ref)


def test_cutout_erases_one_clipped_square_per_sample():
    x = torch.ones(64, 2, 12, 12)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    erased = (out == 0).all(1)  # both channels erased together
    assert ((out == 0) | (out == 1)).all()
    counts = erased.flatten(1).sum(1)
    assert counts.max() == 16 and counts.min() >= 4  # whole square, or clipped at a corner
    for m in erased:  # the erased pixels form one axis-aligned rectangle
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m.sum() == len(rows) * len(cols)
        assert rows.max() - rows.min() + 1 == len(rows) <= 4


def test_normalisation_and_batches():
    data = _data()
    loader = DeviceLoader(data, 4, "cpu", mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    batches = list(loader.epoch(0))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    expected = (data.x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / \
        torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), expected)
    shuffled = DeviceLoader(data, 4, "cpu", [0.5] * 3, [0.2] * 3, shuffle=True, drop_last=True,
                            seed=1)
    ys = [torch.cat([y for _, y in shuffled.epoch(e)]) for e in (0, 0, 1)]
    assert len(ys[0]) == 8 and torch.equal(ys[0], ys[1]) and not torch.equal(ys[0], ys[2])


def test_batch_stats_uses_batch_statistics_and_restores_modes():
    model = create_model("tiny_cnn").eval()
    for _, bn in bn_layers(model):
        bn.running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 16, 16)
    eval_out = model(x)
    with batch_stats(model):
        current = model(x)
    # reference: a train-mode copy normalises with batch statistics
    ref = create_model("tiny_cnn")
    ref.load_state_dict(before)
    torch.testing.assert_close(current, ref.train()(x))
    assert not torch.allclose(current, eval_out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
