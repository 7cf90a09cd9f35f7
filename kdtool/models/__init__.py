"""The kdtool model zoo: CIFAR-style classifiers plus any torchvision (``tv:``) or timm
(``timm:``) classifier."""

from kdtool.models import densenet, mobilenetv2, resnet, tiny, wide_resnet  # noqa: F401  (register)
from kdtool.models._registry import (
    TIMM_PREFIX,
    TV_PREFIX,
    ModelSpec,
    architecture_params,
    build_on_meta,
    check_input_size,
    count_params,
    create_model,
    list_models,
    model_spec,
    register_model,
)

__all__ = [
    "TIMM_PREFIX",
    "TV_PREFIX",
    "ModelSpec",
    "architecture_params",
    "build_on_meta",
    "check_input_size",
    "count_params",
    "create_model",
    "list_models",
    "model_spec",
    "register_model",
]
