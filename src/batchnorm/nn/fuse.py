"""Fusing each ReLU that follows a batch-norm layer into it."""

from __future__ import annotations

from typing import Any

from ..layers import BatchNorm
from .layers import ReLU

__all__ = ["fuse_activations"]


def fuse_activations(model: Any) -> Any:
    """Fuse every ``ReLU`` that directly follows a :class:`~batchnorm.BatchNorm` into it.

    In each ``Sequential`` of `model` (nested ones included), a ``BatchNorm`` without an
    activation followed by a toolkit ``ReLU`` becomes one ``BatchNorm`` with
    ``activation="relu"`` (the same layer object, so its arrays and the optimiser's references
    to them stay), and the ``ReLU`` is removed. The model computes the same values, forward
    and backward, with two passes over the activations less per step and none of the ReLU's
    arrays (see the ``activation`` argument of :class:`~batchnorm.BatchNorm`).

    Parameters
    ----------
    model : Sequential, or any object with a ``layers`` list
        Changed in place.

    Returns
    -------
    model
        The same object.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list):
        return model
    out: list[Any] = []
    for layer in layers:
        fuse_activations(layer)
        prev = out[-1] if out else None
        if type(layer) is ReLU and isinstance(prev, BatchNorm) and prev.activation is None:
            prev.activation = "relu"
            continue
        out.append(layer)
    model.layers = out
    return model
