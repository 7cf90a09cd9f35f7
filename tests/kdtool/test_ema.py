"""--ema: the weight average's arithmetic, and train's output, validation and resume."""

import pytest
import torch
import torch.nn as nn

from kdtool.checkpoint import load_checkpoint, read_meta
from kdtool.data import load_data
from kdtool.ema import WeightEMA, make_ema
from kdtool.errors import KdtoolError
from kdtool.runstate import check_same_config, load_state, state_path_for
from kdtool.train import TrainConfig, Trainer


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))


def test_average_follows_the_formula_with_warm_up_and_leaves_the_model_alone():
    model = _net()
    model(torch.randn(2, 1, 5, 5))  # materialise the lazy layer
    ema = WeightEMA(model, decay=0.9)
    expected = {k: v.detach().clone().double() for k, v in ema.module.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for t in range(1, 8):
        model.train()
        model(torch.randn(4, 1, 5, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        d = min(0.9, (1 + t) / (10 + t))  # warm-up: 0.18, 0.25, ... until 0.9 caps it
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v.double()
            else:
                expected[k] = v.clone()
        ema.update()
    got = ema.module.state_dict()
    for k, v in expected.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got[k], v), k  # num_batches_tracked copied
    live = model.state_dict()
    assert not torch.equal(got["0.weight"], live["0.weight"])  # an average, not a copy
    assert ema.steps == 7 and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_state_round_trip_and_off_switch():
    model = _net()
    model(torch.randn(2, 1, 5, 5))
    ema = WeightEMA(model, 0.99)
    ema.update()
    other = WeightEMA(_net_like(model), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 1
    for k, v in ema.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v)
    assert make_ema(model, 0.0) is None


def _net_like(model):
    m = _net()
    m(torch.randn(2, 1, 5, 5))
    m.load_state_dict(model.state_dict())
    return m


@pytest.mark.parametrize("decay", [1.0, -0.1, 2.0])
def test_decay_out_of_range_is_a_user_error(decay):
    with pytest.raises(KdtoolError, match=r"--ema must be in \[0, 1\)"):
        make_ema(_net(), decay)


def test_cli_refuses_a_bad_decay(cli, tmp_path):
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--epochs", "1", "--ema", "1",
            "--out", tmp_path / "t.safetensors")
    assert r.code == 1 and "--ema must be in [0, 1)" in r.err and "Traceback" not in r.err


def _cfg(**kw) -> TrainConfig:
    base = dict(arch="tiny_cnn", data="digits", val="digits:test", epochs=3, batch_size=128,
                seed=3, ema=0.95)
    return TrainConfig(**{**base, **kw})


def test_train_writes_the_average_and_keeps_both_in_its_state(tmp_path):
    out = tmp_path / "t.safetensors"
    Trainer(_cfg(val=None), out).run()  # no validation: the last epoch is the output
    state = load_state(state_path_for(out))
    written = load_checkpoint(out)[0].state_dict()
    averaged, live = state["ema"]["model"], state["model"]
    assert written.keys() == averaged.keys()
    for k, v in averaged.items():
        assert torch.equal(written[k], v), k
    weights = [k for k, v in live.items() if v.is_floating_point() and v.ndim > 1]
    assert all(not torch.equal(averaged[k], live[k]) for k in weights)
    batches = len(load_data("digits")) // 128  # drop_last
    assert state["ema"]["steps"] == 3 * batches


def test_train_validates_the_average_and_shows_the_live_weights(cli, tmp_path):
    out = tmp_path / "t.safetensors"
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--val", "digits:test",
            "--epochs", "2", "--ema", "0.9", "--out", out, "--json")
    assert r.code == 0, r.err
    result = r.json()
    assert all({"val_top1", "val_top1_live"} <= set(row) for row in result["history"])
    assert "EMA; live weights" in r.err  # the epoch line
    ev = cli("eval", out, "--data", "digits:test", "--json")
    assert ev.json()["top1"] == pytest.approx(result["val_top1"])  # the file is the average
    meta = read_meta(out)
    assert meta.stages["train"]["config"]["ema"] == 0.9
    assert "val_top1_live" in meta.provenance["metrics"]


def test_a_resumed_run_keeps_its_decay(tmp_path):
    out = tmp_path / "t.safetensors"
    Trainer(_cfg(val=None, epochs=1), out).run()
    with pytest.raises(KdtoolError, match="ema was 0.95, now 0.9"):
        Trainer(_cfg(val=None, epochs=1, ema=0.9), out, resume=True).run()


def test_a_state_from_before_a_new_option_resumes_while_the_option_is_off(tmp_path):
    saved = {"arch": "resnet8", "epochs": 3}
    check_same_config(saved, {"arch": "resnet8", "epochs": 3, "ema": 0.0}, tmp_path)
    with pytest.raises(KdtoolError, match="ema was None, now 0.9"):
        check_same_config(saved, {"arch": "resnet8", "epochs": 3, "ema": 0.9}, tmp_path)
