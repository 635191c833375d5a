"""Builders for the demo's networks: an MLP and a small CNN, with batch, group or layer
normalization, or none."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backends import Backend
from ..layers import BatchNorm
from ..norm_layers import GroupNorm, LayerNorm
from .fuse import fuse_activations
from .layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid
from .sequential import Sequential

__all__ = ["cnn", "init_std", "mlp"]

WeightInit = float | str
#: ``"batch"``, ``"group"``, ``"layer"``, None, or a callable ``make(shape) -> layer`` given the
#: per-sample shape of the activations it normalises: ``(C, H, W)`` or ``(width,)``.
Norm = str | Callable[[tuple[int, ...]], Any] | None
_NORMS = ("batch", "group", "layer")


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


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"expected {name} to be a bool, got {value!r}")
    return bool(value)


def _activation(name: str) -> Any:
    if name == "relu":
        return ReLU()
    if name == "sigmoid":
        return Sigmoid()
    raise ValueError(f"expected activation 'relu' or 'sigmoid', got {name!r}")


def _norm_maker(
    norm: Norm, batchnorm: bool, groups: int, dtype: Any, backend: str | Backend | None,
    momentum: float, eps: float,
) -> Callable[[tuple[int, ...]], Any] | None:
    """``make(shape) -> layer`` for the normalization `norm` (None for no normalization)."""
    if batchnorm and norm not in (None, "batch"):
        raise ValueError(f"expected either batchnorm=True or norm={norm!r}, got both")
    if batchnorm:
        norm = "batch"
    if norm is None or callable(norm):
        return norm
    if norm not in _NORMS:
        raise ValueError(f"expected norm 'batch', 'group', 'layer', None or a callable, "
                         f"got {norm!r}")
    if norm == "group" and (isinstance(groups, bool) or not isinstance(groups, int)
                            or groups < 1):
        raise ValueError(f"expected groups to be an int >= 1, got {groups!r}")

    def make(shape: tuple[int, ...]) -> Any:
        kw = dict(eps=eps, dtype=dtype, backend=backend)
        if norm == "batch":
            return BatchNorm(shape[0], axis=1, momentum=momentum, **kw)
        if norm == "group":
            return GroupNorm(groups, shape[0], axis=1, **kw)
        return LayerNorm(shape, **kw)

    return make


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
    norm: Norm = None,
    groups: int = 4,
    fuse_activation: bool = False,
) -> Sequential:
    """A multilayer perceptron: ``[Linear -> (norm) -> activation] * len(hidden) -> Linear``.

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
        Passed to the normalization layers (``backend``, BatchNorm's ``momentum``, ``eps``).
    norm : {"batch", "group", "layer"}, callable or None, default None
        The normalization after each hidden affine layer, in place of ``batchnorm``:
        ``BatchNorm(width)``, ``GroupNorm(groups, width)`` or ``LayerNorm(width)``; a callable
        is called with ``(width,)`` and returns the layer. ``batchnorm=True`` is
        ``norm="batch"``; giving both with another `norm` is a ValueError.
    groups : int, default 4
        Groups of ``norm="group"``; must divide every hidden width.
    fuse_activation : bool, default False
        Fuse each ReLU that follows a ``BatchNorm`` into it (``BatchNorm(...,
        activation="relu")``, see :func:`batchnorm.nn.fuse_activations`): the same values,
        fewer passes. Other normalizations and activations are left as they are.

    Returns
    -------
    Sequential
        Takes (N, in_features), returns logits (N, out_features).
    """
    fuse_activation = _check_flag(fuse_activation, "fuse_activation")
    make_norm = _norm_maker(norm, batchnorm, groups, dtype, backend, bn_momentum, bn_eps)
    rng = np.random.default_rng(0) if rng is None else rng
    layers: list[Any] = []
    sizes = [int(in_features), *(int(h) for h in hidden)]
    for fan_in, width in zip(sizes[:-1], sizes[1:], strict=True):
        std = init_std(weight_init, fan_in)
        layers.append(
            Linear(fan_in, width, weight=std * rng.standard_normal((fan_in, width)), dtype=dtype)
        )
        if make_norm is not None:
            layers.append(make_norm((width,)))
        layers.append(_activation(activation))
    std = init_std(weight_init, sizes[-1])
    layers.append(
        Linear(
            sizes[-1], int(out_features),
            weight=std * rng.standard_normal((sizes[-1], int(out_features))), dtype=dtype,
        )
    )
    model = Sequential(layers)
    return fuse_activations(model) if fuse_activation else model


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
    norm: Norm = None,
    groups: int = 4,
    fuse_activation: bool = False,
) -> Sequential:
    """A small convolutional network.

    ``[Conv2d 3x3 pad 1 -> (norm) -> ReLU -> MaxPool2d 2] * len(channels)
    -> Flatten -> [Linear -> (norm) -> ReLU] * len(hidden) -> Linear``.

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
    norm : {"batch", "group", "layer"}, callable or None, default None
        The normalization after each convolution and each hidden affine layer, in place of
        ``batchnorm``. On the (N, C, H, W) convolution outputs: ``"batch"`` is
        ``BatchNorm(C, axis=1)``, ``"group"`` is ``GroupNorm(groups, C)`` (statistics per
        sample and group of channels), ``"layer"`` is ``LayerNorm((C, H, W))`` (per sample over
        all its values, one ``gamma`` per element, as PyTorch's ``nn.LayerNorm([C, H, W])``;
        ``norm="group", groups=1`` is the same statistics with one ``gamma`` per channel). A
        callable is called with ``(C, H, W)`` and with ``(width,)`` and returns the layer. The
        hidden affine layers get what :func:`mlp` gives them.
    groups : int, default 4
        Groups of ``norm="group"``; must divide every channel count and hidden width.
    fuse_activation : bool, default False
        As for :func:`mlp`: each ``BatchNorm -> ReLU`` becomes one fused ``BatchNorm``.

    Returns
    -------
    Sequential
        Takes (N, C, H, W), returns logits (N, out_features).
    """
    fuse_activation = _check_flag(fuse_activation, "fuse_activation")
    make_norm = _norm_maker(norm, batchnorm, groups, dtype, backend, bn_momentum, bn_eps)
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
        if make_norm is not None:
            layers.append(make_norm((int(out_c), h, w)))
        layers += [ReLU(), MaxPool2d(2)]
        c, h, w = int(out_c), h // 2, w // 2
    layers.append(Flatten())
    tail = mlp(c * h * w, out_features, hidden, norm=make_norm, weight_init=weight_init,
               rng=rng, dtype=dtype, backend=backend, bn_momentum=bn_momentum, bn_eps=bn_eps)
    model = Sequential(layers + tail.layers)
    return fuse_activations(model) if fuse_activation else model
