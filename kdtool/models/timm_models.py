"""Any timm (pytorch-image-models) classifier as ``timm:<name>``, always randomly initialised.

For teachers that users bring as timm state_dicts (``kdtool convert --arch timm:NAME``),
and for students from timm's zoo. Weights are never requested (``pretrained=False``), so
building never touches the network. The input size, resize rule and normalisation are
those of the name's default pretrained config (read from timm's tables, no download).
timm is optional: ``pip install 'kdtool[timm]'``.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from kdtool.errors import KdtoolError, check_choice
from kdtool.models._registry import TIMM_PREFIX, ModelSpec

INSTALL_HINT = "pip install 'kdtool[timm]' (or pip install timm)"


def _timm():
    try:
        import timm
    except ImportError:
        raise KdtoolError("timm: architectures need the timm package", INSTALL_HINT) from None
    return timm


@functools.lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    return tuple(_timm().list_models())


def list_names(pattern: str = "*") -> list[str]:
    """Names of the timm classifiers usable as ``timm:<name>`` that match ``pattern``."""
    return list(_timm().list_models(pattern))


def _config(name: str) -> dict:
    """Input size, crop fraction, interpolation, mean and std of ``name``'s default
    pretrained config; ImageNet's evaluation settings for a name without one."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    d = cfg.to_dict() if cfg is not None else {}
    how = d.get("interpolation", "bilinear")
    return {
        "input_size": tuple(d.get("input_size", (3, 224, 224))[1:]),
        "crop_fraction": float(d.get("crop_pct", 0.875)),
        "interpolation": how if how in ("bilinear", "bicubic") else "bilinear",
        "mean": tuple(d.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(d.get("std", (0.229, 0.224, 0.225))),
    }


def _builder(name: str):
    def build(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
        return _timm().create_model(name, pretrained=False, num_classes=num_classes,
                                    in_chans=in_chans, **kwargs)

    build.__name__ = name
    return build


def spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of timm classifier ``name`` (without the ``timm:`` prefix)."""
    check_choice(name, _names(), "timm model", "kdtool models --timm 'PATTERN' lists them")
    cfg = _config(name)
    return ModelSpec(
        name=TIMM_PREFIX + name,
        fn=_builder(name),
        family="timm",
        input_size=cfg["input_size"],
        description=f"timm {name} (random init)",
        crop_fraction=cfg["crop_fraction"],
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
    )
