"""Freezing the batch-normalization layers of a model for fine-tuning."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..layers import BatchNorm

__all__ = ["batchnorm_layers", "freeze_batchnorm", "unfreeze_batchnorm"]


def batchnorm_layers(model: Any) -> Iterator[BatchNorm]:
    """Every :class:`~batchnorm.BatchNorm` (or subclass) of `model`, in order: the model
    itself, or the layers of a ``Sequential`` (nested ones included)."""
    if isinstance(model, BatchNorm):
        yield model
        return
    for layer in getattr(model, "layers", ()):
        yield from batchnorm_layers(layer)


def freeze_batchnorm(model: Any, *, trainable_affine: bool = False) -> Any:
    """Freeze every BatchNorm layer of `model` (see :meth:`batchnorm.BatchNorm.freeze`).

    All layers are checked before any is frozen, so an error changes nothing. Returns `model`.
    An optimiser built from ``model.params`` before freezing still holds gamma and beta: build
    it after freezing.
    """
    layers = list(batchnorm_layers(model))
    for layer in layers:
        if not layer.track_running_stats:
            raise ValueError(
                f"expected BatchNorm layers with running statistics to freeze, got {layer!r}"
            )
    for layer in layers:
        layer.freeze(trainable_affine=trainable_affine)
    return model


def unfreeze_batchnorm(model: Any) -> Any:
    """Undo :func:`freeze_batchnorm`. Returns `model`."""
    for layer in batchnorm_layers(model):
        layer.unfreeze()
    return model
