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


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_cpu_optimisers_are_fused_and_step_as_the_reference_does(name):
    # Fused kernels on the CPU (3x faster steps, bench/cpu_step_layout.py) must compute what
    # PyTorch's default implementation computes: both groups, weight decay included.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    reference = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    reference.load_state_dict(model.state_dict())
    opt, _ = optim.build(model, name, "cosine", 0.05, 5e-4, 10)
    assert all(g["fused"] for g in opt.param_groups)
    groups = [{"params": [reference[0].weight], "weight_decay": 5e-4},
              {"params": [reference[0].bias, *reference[1].parameters()],
               "weight_decay": 0.0}]
    ref = (torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, foreach=False)
           if name == "sgd" else torch.optim.Adam(groups, lr=0.05, foreach=False))
    for _ in range(5):  # the same gradients for both: only the update rules are compared
        grads = [torch.randn_like(p) for p in model.parameters()]
        for m, o in ((model, opt), (reference, ref)):
            for p, g in zip(m.parameters(), grads, strict=True):
                p.grad = g.clone()
            o.step()
    torch.manual_seed(0)  # the starting weights again
    start = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    for p, q, p0 in zip(model.parameters(), reference.parameters(), start.parameters(),
                        strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, p0)  # both moved: the comparison is live
