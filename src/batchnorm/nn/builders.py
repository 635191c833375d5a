"""Builders for the demo's networks: an MLP and a small CNN, with or without batch norm."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends import Backend
from ..layers import BatchNorm
from .layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid
from .sequential import Sequential

__all__ = ["cnn", "init_std", "mlp"]

WeightInit = float | str


def init_std(weight_init: WeightInit, fan_in: int) -> float:
    """Standard deviation of the initial weights.

    Parameters
    ----------
    weight_init : float or {"he", "xavier"}
        A number is the standard deviation itself (the weight-scale experiment);
        ``"he"`` is ``sqrt(2 / fan_in)`` (for ReLU), ``"xavier"`` is ``sqrt(1 / fan_in)``.
    fan_in : int
        Inputs per output unit (``C * k * k`` for a convolution).
    """
    if isinstance(weight_init, str):
        name = weight_init.lower()
        if name == "he":
            return math.sqrt(2.0 / fan_in)
        if name == "xavier":
            return math.sqrt(1.0 / fan_in)
        raise ValueError(f"expected weight_init 'he', 'xavier' or a number, got {weight_init!r}")
    std = float(weight_init)
    if not std > 0:
        raise ValueError(f"expected a positive weight scale, got {weight_init!r}")
    return std


def _activation(name: str) -> Any:
    if name == "relu":
        return ReLU()
    if name == "sigmoid":
        return Sigmoid()
    raise ValueError(f"expected activation 'relu' or 'sigmoid', got {name!r}")


def mlp(
    in_features: int,
    out_features: int = 10,
    hidden: Sequence[int] = (100, 100, 100, 100, 100),
    *,
    batchnorm: bool = False,
    activation: str = "relu",
    weight_init: WeightInit = "he",
    rng: np.random.Generator | None = None,
    dtype: Any = np.float64,
    backend: str | Backend | None = None,
    bn_momentum: float = 0.9,
    bn_eps: float = 1e-5,
) -> Sequential:
    """A multilayer perceptron: ``[Linear -> (BatchNorm) -> activation] * len(hidden) -> Linear``.

    Parameters
    ----------
    in_features, out_features : int
    hidden : sequence of int, default five layers of 100
    batchnorm : bool, default False
        Put ``BatchNorm(width)`` between each hidden affine layer and its activation, as
        Ioffe & Szegedy do.
    activation : {"relu", "sigmoid"}
    weight_init : float or {"he", "xavier"}
        Standard deviation of the initial weights (see :func:`init_std`); biases are zero.
    rng : numpy.random.Generator, optional
        Source of the initial weights; default ``default_rng(0)``. Two calls with generators
        in the same state give the same weights with and without batch norm, because the
        batch-norm layers draw nothing.
    dtype : float32 or float64
    backend, bn_momentum, bn_eps
        Passed to :class:`batchnorm.BatchNorm` (``momentum``, ``eps``).

    Returns
    -------
    Sequential
        Takes (N, in_features), returns logits (N, out_features).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    layers: list[Any] = []
    sizes = [int(in_features), *(int(h) for h in hidden)]
    for fan_in, width in zip(sizes[:-1], sizes[1:], strict=True):
        std = init_std(weight_init, fan_in)
        layers.append(
            Linear(fan_in, width, weight=std * rng.standard_normal((fan_in, width)), dtype=dtype)
        )
        if batchnorm:
            layers.append(
                BatchNorm(width, momentum=bn_momentum, eps=bn_eps, dtype=dtype, backend=backend)
            )
        layers.append(_activation(activation))
    std = init_std(weight_init, sizes[-1])
    layers.append(
        Linear(
            sizes[-1], int(out_features),
            weight=std * rng.standard_normal((sizes[-1], int(out_features))), dtype=dtype,
        )
    )
    return Sequential(layers)


def cnn(
    in_shape: tuple[int, int, int] = (1, 8, 8),
    out_features: int = 10,
    channels: Sequence[int] = (16, 32),
    hidden: Sequence[int] = (100,),
    *,
    batchnorm: bool = False,
    weight_init: WeightInit = "he",
    rng: np.random.Generator | None = None,
    dtype: Any = np.float64,
    backend: str | Backend | None = None,
    bn_momentum: float = 0.9,
    bn_eps: float = 1e-5,
) -> Sequential:
    """A small convolutional network.

    ``[Conv2d 3x3 pad 1 -> (BatchNorm per channel) -> ReLU -> MaxPool2d 2] * len(channels)
    -> Flatten -> [Linear -> (BatchNorm) -> ReLU] * len(hidden) -> Linear``.

    Parameters
    ----------
    in_shape : (C, H, W), default (1, 8, 8)
        Shape of one image; H and W must survive ``len(channels)`` halvings.
    out_features : int
    channels : sequence of int, default (16, 32)
    hidden : sequence of int, default (100,)
    batchnorm : bool, default False
        ``BatchNorm(C, axis=1)`` on the (N, C, H, W) output of each convolution (statistics per
        channel over batch and positions), ``BatchNorm(width)`` after each hidden affine layer.
    weight_init, rng, dtype, backend, bn_momentum, bn_eps
        As for :func:`mlp`.

    Returns
    -------
    Sequential
        Takes (N, C, H, W), returns logits (N, out_features).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    c, h, w = (int(v) for v in in_shape)
    layers: list[Any] = []
    for out_c in channels:
        if h < 2 or w < 2:
            raise ValueError(f"input of shape {tuple(in_shape)} is too small for {len(channels)} "
                             "conv blocks, each of which halves H and W")
        std = init_std(weight_init, c * 9)
        layers.append(
            Conv2d(c, int(out_c), 3, pad=1, weight=std * rng.standard_normal((out_c, c, 3, 3)),
                   dtype=dtype)
        )
        if batchnorm:
            layers.append(BatchNorm(int(out_c), axis=1, momentum=bn_momentum, eps=bn_eps,
                                    dtype=dtype, backend=backend))
        layers += [ReLU(), MaxPool2d(2)]
        c, h, w = int(out_c), h // 2, w // 2
    layers.append(Flatten())
    tail = mlp(c * h * w, out_features, hidden, batchnorm=batchnorm, weight_init=weight_init,
               rng=rng, dtype=dtype, backend=backend, bn_momentum=bn_momentum, bn_eps=bn_eps)
    return Sequential(layers + tail.layers)
