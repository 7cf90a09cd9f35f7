import pytest
import torch

from kdtool.distill.balance import BalancedNoise, balanced_choice, class_weights
from kdtool.distill.distiller import NoiseKD
from kdtool.distill.loop import DistillConfig, class_balance
from kdtool.distill.noise import make_noise
from kdtool.distill.teacher import FrozenTeacher
from kdtool.errors import KdtoolError
from kdtool.models import create_model


def test_balanced_choice_takes_the_quota_of_each_class_first():
    gen = torch.Generator().manual_seed(0)
    classes = torch.tensor([0] * 50 + [1] * 30 + [2] * 4)  # class 2 is rare
    idx = balanced_choice(classes, 30, 3, gen)
    assert len(idx) == 30 and len(set(idx.tolist())) == 30
    counts = classes[idx].bincount(minlength=3).tolist()
    assert counts[2] == 4  # every rare one is kept
    assert counts[0] + counts[1] == 26 and max(counts[:2]) <= 13
    again = balanced_choice(classes, 30, 3, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


def test_balanced_noise_evens_out_the_teachers_classes():
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=10, in_chans=1)
    with torch.no_grad():
        model.linear.bias.copy_(torch.linspace(0, 3, 10))  # a teacher biased to some classes
    teacher = FrozenTeacher(model)
    noise = make_noise("gaussian", 1, (8, 8), [0.3], [0.37], "cpu")
    balanced = BalancedNoise(noise, teacher, 10, oversample=4)
    gen = torch.Generator().manual_seed(1)
    plain_hist = teacher(noise.sample(256, gen)).argmax(1).bincount(minlength=10)
    x = balanced.sample(256, gen)
    bal_hist = teacher(x).argmax(1).bincount(minlength=10)
    assert x.shape == (256, 1, 8, 8)
    assert class_balance(bal_hist) > class_balance(plain_hist)
    assert balanced.describe()["balanced"] is True


def test_class_balance_measure():
    assert class_balance(torch.tensor([5, 5, 5, 5])) == 1.0
    assert class_balance(torch.tensor([20, 0, 0, 0])) == 0.0
    assert f"{class_balance(torch.tensor([20, 0]))}" == "0.0"  # not -0.0 ("-0.000" in tables)


def test_class_weights_give_each_predicted_class_the_same_total():
    pred = torch.tensor([0, 0, 0, 2, 0, 2, 7, 0])  # counts 5, 2, 1 of 3 present classes
    w = class_weights(pred, 10)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    totals = [w[pred == c].sum().item() for c in (0, 2, 7)]
    assert totals == pytest.approx([8 / 3] * 3)
    assert torch.equal(class_weights(torch.arange(10).repeat(3), 10), torch.ones(30))


@pytest.mark.parametrize("loss", ["soft_ce", "kl"])
def test_class_weighted_loss_is_the_weighted_mean_of_per_sample_terms(loss):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=4, in_chans=1)
    teacher = FrozenTeacher(model)
    s = torch.randn(6, 4)
    t = torch.tensor([[5.0, 0, 0, 0]] * 4 + [[0, 0, 5.0, 0]] * 2)  # classes 0 x4, 2 x2
    plain = NoiseKD(torch.nn.Identity(), teacher, loss=loss)
    weighted = NoiseKD(torch.nn.Identity(), teacher, loss=loss, class_weighted=True)
    per_sample = torch.stack([plain.losses(s[i:i + 1], t[i:i + 1])[loss] for i in range(6)])
    expected = (per_sample[:4].sum() * 6 / (2 * 4) + per_sample[4:].sum() * 6 / (2 * 2)) / 6
    torch.testing.assert_close(weighted.losses(s, t)[loss], expected)
    torch.testing.assert_close(plain.losses(s, t)[loss], per_sample.mean())
    # a batch the teacher already sees as balanced is left as it is
    even = t[[0, 4]]
    torch.testing.assert_close(weighted.losses(s[:2], even)[loss],
                               plain.losses(s[:2], even)[loss])


def test_balance_mode_is_checked():
    with pytest.raises(KdtoolError, match="did you mean 'weight'"):
        DistillConfig(teacher="t.safetensors", balance="wieght").resolved()
