import torch

from kdtool.bn import batch_stats, bn_layers
from kdtool.data import ImageData
from kdtool.loader import Augment, DeviceLoader, random_crop_flip
from kdtool.models import create_model


def _data(n=10, c=3, h=6, w=5) -> ImageData:
    x = torch.arange(n * c * h * w, dtype=torch.int64).remainder(251).to(torch.uint8)
    return ImageData(x=x.view(n, c, h, w), y=torch.arange(n) % 3, class_names=["a", "b", "c"],
                     source="test")


def test_crop_flip_matches_a_per_sample_reference():
    x = _data().x
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, Augment(pad=2, flip=True), gen)
    # replay the same draws to build the reference one sample at a time
    gen = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (10,), generator=gen)
    dx = torch.randint(0, 5, (10,), generator=gen)
    flip = torch.rand(10, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(10):
        ref = padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 5]
        assert torch.equal(out[i], ref.flip(2) if flip[i] else ref)


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
