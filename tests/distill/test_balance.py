import torch

from kdtool.distill.balance import BalancedNoise, balanced_choice
from kdtool.distill.loop import class_balance
from kdtool.distill.noise import make_noise
from kdtool.distill.teacher import FrozenTeacher
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
