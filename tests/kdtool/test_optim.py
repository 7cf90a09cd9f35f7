import pytest
import torch

from kdtool import optim
from kdtool.errors import KdtoolError


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "plateau"])
@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 9, 100])
def test_every_schedule_runs_for_any_length(schedule, total):
    model = torch.nn.Linear(3, 2)
    opt, sched = optim.build(model, "adam", schedule, 1e-3, 0.0, total)
    for _ in range(total):
        model(torch.randn(4, 3)).sum().backward()
        assert all(g["lr"] >= 0 for g in opt.param_groups)  # the rate each step uses
        opt.step()
        if optim.steps_per_iteration(sched):
            sched.step()
        else:
            sched.step(1.0)


def test_weight_decay_spares_bn_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    opt, _ = optim.build(model, "sgd", "cosine", 0.1, 5e-4, 10)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight)}
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_resolve_defaults_and_errors():
    assert optim.resolve("sgd", None, None) == ("onecycle", 0.1)
    assert optim.resolve("adam", None, None) == ("plateau", 1e-3)
    with pytest.raises(KdtoolError, match="did you mean 'adam'"):
        optim.resolve("adma", None, None)
    with pytest.raises(KdtoolError, match="positive"):
        optim.resolve("sgd", "cosine", 0.0)
