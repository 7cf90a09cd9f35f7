"""The kdtool model zoo: CIFAR-style classifiers plus any torchvision classifier (``tv:``)."""

from kdtool.models import densenet, mobilenetv2, resnet, tiny, wide_resnet  # noqa: F401  (register)
from kdtool.models._registry import (
    TV_PREFIX,
    ModelSpec,
    count_params,
    create_model,
    list_models,
    model_spec,
    register_model,
)

__all__ = [
    "TV_PREFIX",
    "ModelSpec",
    "count_params",
    "create_model",
    "list_models",
    "model_spec",
    "register_model",
]
