"""BatchNorm modes on fused BN + activation layers (timm's BatchNormAct2d): the activation is
kept and the layer's dropout stays off, on one process's statistics and on all processes'."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kdtool.bn import batch_stats, bn_tail, global_batch_stats

norm_act = pytest.importorskip("timm.layers.norm_act")


def _bn_act(drop: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    m = norm_act.BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(drop))
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _expected(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The batch's own statistics, then the activation, and no dropout."""
    return F.silu(F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps))


def test_the_tail_of_a_bn_is_what_it_applies_after_normalising():
    m = _bn_act()
    assert [type(t) for t in bn_tail(m)] == [nn.Dropout, nn.SiLU]
    assert bn_tail(nn.BatchNorm2d(4)) == []
    assert bn_tail(norm_act.BatchNormAct2d(4, apply_act=False)) == []  # identities only

    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    assert bn_tail(Custom(4)) is None  # unknown: folding refuses it


def test_current_statistics_keep_the_activation_and_leave_dropout_off():
    m = _bn_act()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(16, 6, 5, 5) * 3 + 1
    with torch.no_grad(), batch_stats(m, [m]):
        first, second = m(x), m(x)
    torch.testing.assert_close(first, _expected(m, x))
    assert torch.equal(first, second)  # a dropout in train mode would differ each call
    assert not m.training and not m.drop.training  # modes restored
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_global_statistics_keep_the_activation(tmp_path):
    m = _bn_act()
    x = torch.randn(16, 6, 5, 5) * 3 + 1
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        with torch.no_grad(), global_batch_stats([m]):
            y = m(x)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(y, _expected(m, x), atol=1e-5, rtol=1e-5)
