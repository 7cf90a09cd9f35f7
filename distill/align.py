"""Batch alignment for teachers whose normalisers work per sample (GroupNorm, LayerNorm, ...).

Noise distillation works because a BN teacher re-standardises every channel with the
statistics of the noise batch: the samples of a batch are coupled, and each channel
reaches the next layer at the scale it was trained for. GroupNorm, LayerNorm and
InstanceNorm normalise each sample alone, so a noise batch gets no such correction.
Following NormShift-KD's batch-alignment idea (REFERENCE.md), ``batch_aligned`` makes
each such layer, while the teacher answers, standardise its normalised output per
channel over the batch (as BN does) before its own affine transform:

    y = weight * standardise_over_batch(norm_without_affine(x)) + bias

Nothing of the teacher changes: its ``forward`` methods are swapped only inside the
context, and these layers hold no buffers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdtool.bn import swapped_forward
from kdtool.errors import KdtoolError

PER_SAMPLE_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                    nn.InstanceNorm3d)


def per_sample_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every per-sample normaliser of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PER_SAMPLE_NORMS)]


def _standardise(x: torch.Tensor, channel_dim: int, eps: float) -> torch.Tensor:
    """Zero mean and unit variance per channel over every other dimension (batch included)."""
    dims = [d for d in range(x.ndim) if d != channel_dim % x.ndim]
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


def _channel_shape(x: torch.Tensor, channel_dim: int) -> list[int]:
    shape = [1] * x.ndim
    shape[channel_dim] = x.shape[channel_dim]
    return shape


def _channels_first(m: nn.LayerNorm, x: torch.Tensor) -> bool:
    """Whether ``m`` normalises an N, C, H, W input over C: the LayerNorm2d of ConvNeXt in
    torchvision and timm, which subclass LayerNorm and permute in their own forward."""
    if type(m).forward is nn.LayerNorm.forward:
        return False  # torch's own: over the trailing dimensions, whatever they are
    channels = m.normalized_shape[0] if len(m.normalized_shape) == 1 else None
    if x.ndim == 4 and x.shape[1] == channels:
        return True
    raise KdtoolError(
        f"cannot batch-align {type(m).__module__}.{type(m).__name__}: a LayerNorm with its "
        f"own forward, normalised shape {list(m.normalized_shape)}, on input "
        f"{list(x.shape)}",
        "kdtool aligns torch's LayerNorm and channels-first LayerNorm2d layers (ConvNeXt's)")


def aligned_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m``'s output with its normalised values standardised per channel over the batch."""
    if isinstance(m, nn.LayerNorm):
        channels_first = _channels_first(m, x)
        if channels_first:
            x = x.movedim(1, -1)
        xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        # LayerNorm over the last (channel) dimension, as channels-last CNNs use it;
        # over (C, H, W) the channel is dimension 1.
        channel_dim = -1 if len(m.normalized_shape) == 1 else 1
        z = _standardise(xhat, channel_dim, m.eps)
        if m.weight is not None:
            z = z * m.weight
        z = z + m.bias if m.bias is not None else z
        return z.movedim(-1, 1) if channels_first else z
    if isinstance(m, nn.GroupNorm):
        xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
    else:  # InstanceNorm: batch statistics per sample, never running ones here
        xhat = F.instance_norm(x, None, None, None, None, True, 0.0, m.eps)
    z = _standardise(xhat, 1, m.eps)
    if m.affine:
        z = z * m.weight.view(_channel_shape(z, 1)) + m.bias.view(_channel_shape(z, 1))
    return z


def batch_aligned(layers: list[nn.Module]):
    """Inside the context, each of ``layers`` computes ``aligned_forward``; restored on exit."""
    return swapped_forward(layers, aligned_forward)
