"""Any torchvision classifier as ``tv:<name>``, always randomly initialised.

Weights are never requested (``weights=None``), so building never touches the
network: kdtool distils into students from scratch.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from kdtool.errors import KdtoolError, check_choice
from kdtool.models._registry import TV_PREFIX, ModelSpec

# torchvision's ImageClassification evaluation transform without a resize_size: 256 / 224.
_DEFAULT_RESIZE = 256
# ... and the normalisation of its ImageNet weights.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Builder defaults that make a plain logits-only classifier: with aux_logits the
# net returns a namedtuple in training mode, and leaving init_weights unset
# makes torchvision emit a FutureWarning on every build.
_DEFAULT_KWARGS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}


@functools.lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    import torchvision.models

    # module= restricts to the classification builders (no detection,
    # segmentation, video or quantized ones).
    return tuple(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def eval_transform(name: str) -> tuple[int, int, str]:
    """(crop size, resize size, interpolation) of the evaluation transform of ``name``'s
    DEFAULT weights.

    Read from torchvision's weight tables (no download); (224, 256, bilinear) for a
    builder without published weights.
    """
    import torchvision.models

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return 224, _DEFAULT_RESIZE, "bilinear"
    kw = getattr(weights.transforms, "keywords", {})
    crop = int(kw.get("crop_size", 224))
    how = getattr(kw.get("interpolation"), "value", "bilinear")
    return crop, int(kw.get("resize_size") or _DEFAULT_RESIZE), \
        how if how in ("bilinear", "bicubic") else "bilinear"


def published_params(name: str) -> int | None:
    """Parameters of ``tv:name`` at 1000 classes, from its DEFAULT weights' table (no build);
    None for a kdtool architecture or a builder without published weights."""
    import torchvision.models

    if not name.startswith(TV_PREFIX):
        return None
    try:
        meta = torchvision.models.get_model_weights(name[len(TV_PREFIX):]).DEFAULT.meta
    except (ValueError, KeyError, AttributeError):
        return None
    return meta.get("num_params")


def list_names() -> list[str]:
    """Names of the torchvision classifiers usable as ``tv:<name>``."""
    return list(_names())


def replace_first_conv(model: nn.Module, in_chans: int) -> nn.Module:
    """Swap the first ``nn.Conv2d`` (in registration order) for one taking ``in_chans``."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise KdtoolError(f"{type(model).__name__} has no Conv2d input layer to adapt")
    name, module = first
    if module.in_channels == in_chans:
        return model
    if module.groups != 1:
        raise KdtoolError(
            f"cannot adapt the grouped input conv '{name}' of {type(model).__name__} "
            f"to {in_chans} channels",
            "use in_chans=3 or a kdtool architecture",
        )
    new = nn.Conv2d(
        in_chans,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


def _builder(name: str):
    def build(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
        import torchvision.models

        kwargs = {**_DEFAULT_KWARGS.get(name, {}), **kwargs}
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return replace_first_conv(model, in_chans)

    build.__name__ = name
    return build


def spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of torchvision classifier ``name`` (without the ``tv:`` prefix)."""
    check_choice(name, _names(), "torchvision model", "kdtool models --torchvision lists them")
    crop, resize, interpolation = eval_transform(name)
    return ModelSpec(
        name=TV_PREFIX + name,
        fn=_builder(name),
        family="torchvision",
        input_size=(crop, crop),
        description=f"torchvision {name} (random init)",
        # Fitted as torchvision evaluates its ImageNet weights: resize, then centre crop.
        crop_fraction=crop / resize,
        interpolation=interpolation,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
