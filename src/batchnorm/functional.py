"""Pure batch-normalization kernels: arrays in, arrays out, no state.

The feature axis is ``axis``; every other axis is reduced. Inputs of dtype float16 are computed
in float32 and returned as float16; float32 and float64 keep their dtype.

Notes
-----
Training (Ioffe & Szegedy 2015, Algorithm 1), with ``M`` values per feature::

    mean = sum(x) / M,   var = sum((x - mean)**2) / M          (biased)
    x_hat = (x - mean) / sqrt(var + eps),   y = gamma * x_hat + beta

Backward, the compact form::

    dbeta = sum(dy),   dgamma = sum(dy * x_hat)
    dx = gamma / sqrt(var + eps) / M * (M * dy - dbeta - x_hat * dgamma)

Inference uses given statistics (running averages) in place of the batch ones; its backward is
that of a fixed affine map: ``dx = gamma / sqrt(var + eps) * dy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import overload

import numpy as np

from .backends import Backend, get_backend

__all__ = [
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_norm_train",
    "update_running_stats",
]

_FLOATS = (np.float16, np.float32, np.float64)
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
# NaN and Inf propagate by design; the layers decide what to do with them.
_quiet = np.errstate(invalid="ignore", over="ignore", divide="ignore")


@dataclass
class BatchNormCache:
    """What ``batch_norm_backward`` needs from a forward call.

    Attributes
    ----------
    mean, var : ndarray of shape (C,), float64
        The statistics that normalised the input: the batch mean and biased batch variance in
        training, the given (running) ones in inference.
    count : int
        Values per feature that the statistics cover (``M``).
    training : bool
        True when batch statistics were used (their gradient flows back into ``dx``).
    """

    mean: np.ndarray
    var: np.ndarray
    count: int
    training: bool
    x3: np.ndarray = field(repr=False)
    center: np.ndarray = field(repr=False)
    inv_std: np.ndarray = field(repr=False)
    gamma: np.ndarray | None = field(repr=False)
    gamma_dtype: np.dtype | None = field(repr=False)
    beta_dtype: np.dtype | None = field(repr=False)
    shape: tuple[int, ...] = ()
    dtype: np.dtype = np.dtype(np.float64)
    axis: int = 1
    eps: float = 1e-5
    backend: Backend | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# validation


def compute_dtype(dtype: np.dtype, what: str = "x") -> np.dtype:
    """The dtype a kernel computes in for data of ``dtype`` (float16 -> float32)."""
    if dtype is _F32 or dtype is _F64:  # the usual case, without building a dtype
        return dtype
    dtype = np.dtype(dtype)
    if dtype.type not in _FLOATS:
        raise TypeError(f"expected {what} of dtype float16, float32 or float64, got {dtype}")
    # Native byte order: a byte-swapped '>f4' array is computed as float32 like any other.
    return np.dtype(np.float32) if dtype.type is np.float16 else np.dtype(dtype.type)


def normalize_axis(axis: int, ndim: int) -> int:
    """``axis`` as a non-negative index into ``ndim`` dims, or a ValueError."""
    if type(axis) is int and -ndim <= axis < ndim:  # the usual case, quickly
        return axis % ndim
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"expected axis to be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for input with {ndim} dims "
            f"(expected {-ndim} <= axis < {ndim})"
        )
    return int(axis) % ndim


def check_input(x: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """Validate ``x`` and ``axis``; return ``x`` as an array and the axis as an index."""
    if type(x) is not np.ndarray:
        x = np.asarray(x)
    compute_dtype(x.dtype)
    if x.ndim < 2:
        raise ValueError(
            f"expected input with at least 2 dims (a batch axis and a feature axis), "
            f"got {x.ndim}-D of shape {x.shape}"
        )
    return x, normalize_axis(axis, x.ndim)


def check_vector(v, name: str, size: int, x_shape: tuple[int, ...], axis: int) -> np.ndarray:
    """``v`` as a float vector of ``size`` values, or an error naming both shapes."""
    if type(v) is not np.ndarray:
        v = np.asarray(v)
    if v.dtype.type not in _FLOATS:
        raise TypeError(f"expected {name} of dtype float16, float32 or float64, got {v.dtype}")
    if v.shape != (size,):
        raise ValueError(
            f"expected {name} with {size} values (x.shape[{axis}] of x with shape {x_shape}), "
            f"got shape {v.shape}"
        )
    return v


def as_3d(x: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    """View ``x`` as ``(A, C, B)`` with ``C = x.shape[axis]`` (a copy only where needed)."""
    a = math.prod(x.shape[:axis])
    b = math.prod(x.shape[axis + 1 :])
    if x.dtype is not dtype:
        x = x.astype(dtype, copy=False)
    return x.reshape(a, x.shape[axis], b)


# ---------------------------------------------------------------------------------------------
# building blocks shared with the synchronised layer


@_quiet
def normalize_with_stats(
    x3: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    backend: Backend,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``y3 = gamma * (x3 - mean) / sqrt(var + eps) + beta`` per feature.

    Returns ``(y3, center, inv_std)``: the float part of the mean the backend subtracted and
    the float64 inverse standard deviation, both needed by the backward pass.
    """
    # A backend may do all of this in one call (numba, small inputs: there the dozen tiny
    # array operations below cost more than the pass over the data).
    fused = getattr(backend, "normalize", None)
    if fused is not None:
        out = fused(x3, mean, var, gamma, beta, eps)
        if out is not None:
            return out
    # Few, array-only operations: on small inputs these per-feature lines cost more than the
    # pass over the data.
    dtype = x3.dtype
    mean = np.asarray(mean, dtype=np.float64)
    inv_std = np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    np.reciprocal(inv_std, out=inv_std)
    g = inv_std if gamma is None else inv_std * gamma
    center = mean.astype(dtype)
    # (x - mean) * g + b == (x - center) * g + (b - lo * g) with lo = mean - center, and
    # x - center is exact: the part of the mean that `dtype` cannot hold moves into the shift.
    shift = (mean - center) * g
    np.negative(shift, out=shift)
    if beta is not None:
        shift += beta
    y3 = backend.affine(x3, center, g.astype(dtype), shift.astype(dtype))
    return y3, center, inv_std


@_quiet
def param_grads(
    cache: BatchNormCache, sum_dy: np.ndarray, sum_dy_xc: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(dgamma, dbeta) = (sum(dy * x_hat), sum(dy))`` in float64, from the per-feature sums
    ``sum(dy)`` and ``sum(dy * (x - center))`` that a backend's ``grad_sums`` returns."""
    lo = cache.mean - cache.center.astype(np.float64)
    return cache.inv_std * (sum_dy_xc - lo * sum_dy), sum_dy


@_quiet
def input_grad(
    cache: BatchNormCache, dy3: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray
) -> np.ndarray:
    """``dx3`` from ``dy3`` and the parameter gradients of the whole batch (float64)."""
    dtype = cache.x3.dtype
    inv_std = cache.inv_std
    k = inv_std if cache.gamma is None else cache.gamma.astype(np.float64) * inv_std
    if cache.training:
        # dx = k * (dy - dbeta / M - x_hat * dgamma / M), x_hat = (x - center - lo) * inv_std
        lo = cache.mean - cache.center.astype(np.float64)
        m = cache.count
        q = -k * inv_std * dgamma / m
        r = -k * dbeta / m - q * lo
    else:
        q = np.zeros_like(k)
        r = q
    return cache.backend.grad_input(
        dy3, cache.x3, cache.center, k.astype(dtype), q.astype(dtype), r.astype(dtype)
    )


def make_cache(
    x: np.ndarray,
    x3: np.ndarray,
    axis: int,
    mean: np.ndarray,
    var: np.ndarray,
    count: int,
    training: bool,
    center: np.ndarray,
    inv_std: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    backend: Backend,
) -> BatchNormCache:
    return BatchNormCache(
        mean=np.array(mean, dtype=np.float64),
        var=np.array(var, dtype=np.float64),
        count=count,
        training=training,
        x3=x3,
        center=center,
        inv_std=inv_std,
        gamma=None if gamma is None else gamma.astype(x3.dtype),
        gamma_dtype=None if gamma is None else gamma.dtype,
        beta_dtype=None if beta is None else beta.dtype,
        shape=x.shape,
        dtype=x.dtype,
        axis=axis,
        eps=eps,
        backend=backend,
    )


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"expected eps > 0, got {eps}")
    return eps


# ---------------------------------------------------------------------------------------------
# public kernels


def batch_norm_train(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    backend: str | Backend | None = None,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch normalization with the statistics of the batch itself.

    Parameters
    ----------
    x : ndarray of shape (N, C) or (N, C, *spatial), or any shape with the features on `axis`
        float16, float32 or float64.
    gamma, beta : ndarray of shape (C,) or None
        Scale and shift; ``None`` means no scale (1) or no shift (0).
    axis : int, default 1
        The feature axis; negative counts from the end (``-1`` for channels-last).
    eps : float, default 1e-5
        Added to the variance.
    backend : {"auto", "numpy", "numba"} or None
        See :func:`batchnorm.backends.get_backend`.

    Returns
    -------
    y : ndarray, same shape and dtype as `x`
    cache : BatchNormCache
        For :func:`batch_norm_backward`; ``cache.mean`` and ``cache.var`` are the batch mean
        and biased variance (float64, shape (C,)).

    Raises
    ------
    TypeError
        For a non-float `x`, `gamma` or `beta`.
    ValueError
        For fewer than 2 dims, an axis out of range, `gamma`/`beta` of the wrong size, or an
        empty batch.
    """
    x, ax = check_input(x, axis)
    eps = _check_eps(eps)
    c = x.shape[ax]
    gamma = None if gamma is None else check_vector(gamma, "gamma", c, x.shape, ax)
    beta = None if beta is None else check_vector(beta, "beta", c, x.shape, ax)
    count = x.size // c if c else 0
    if count == 0:
        raise ValueError(f"expected at least one value per feature, got x of shape {x.shape}")
    be = get_backend(backend)
    x3 = as_3d(x, ax, compute_dtype(x.dtype))
    mean, var = be.moments(x3)
    y3, center, inv_std = normalize_with_stats(x3, mean, var, gamma, beta, eps, be)
    cache = make_cache(x, x3, ax, mean, var, count, True, center, inv_std, gamma, beta, eps, be)
    return y3.reshape(x.shape).astype(x.dtype, copy=False), cache


@overload
def batch_norm_inference(
    x, gamma, beta, mean, var, *, axis=..., eps=..., backend=..., return_cache=False
) -> np.ndarray: ...
@overload
def batch_norm_inference(
    x, gamma, beta, mean, var, *, axis=..., eps=..., backend=..., return_cache=True
) -> tuple[np.ndarray, BatchNormCache]: ...


def batch_norm_inference(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    backend: str | Backend | None = None,
    return_cache: bool = False,
):
    """Batch normalization with given statistics (the running averages).

    Parameters
    ----------
    x : ndarray of shape (N, C) or (N, C, *spatial), or any shape with the features on `axis`
    gamma, beta : ndarray of shape (C,) or None
    mean, var : ndarray of shape (C,)
        The statistics to normalise with.
    axis, eps, backend
        As in :func:`batch_norm_train`.
    return_cache : bool, default False
        Also return a cache, for the gradient of this fixed transform (a frozen layer).

    Returns
    -------
    y : ndarray, same shape and dtype as `x`
    cache : BatchNormCache, only with ``return_cache=True``

    Raises
    ------
    TypeError, ValueError
        As in :func:`batch_norm_train`; also for `mean`/`var` of the wrong size.
    """
    x, ax = check_input(x, axis)
    eps = _check_eps(eps)
    c = x.shape[ax]
    gamma = None if gamma is None else check_vector(gamma, "gamma", c, x.shape, ax)
    beta = None if beta is None else check_vector(beta, "beta", c, x.shape, ax)
    mean = check_vector(mean, "mean", c, x.shape, ax)
    var = check_vector(var, "var", c, x.shape, ax)
    be = get_backend(backend)
    x3 = as_3d(x, ax, compute_dtype(x.dtype))
    y3, center, inv_std = normalize_with_stats(x3, mean, var, gamma, beta, eps, be)
    y = y3.reshape(x.shape).astype(x.dtype, copy=False)
    if not return_cache:
        return y
    count = x.size // c if c else 0
    cache = make_cache(x, x3, ax, mean, var, count, False, center, inv_std, gamma, beta, eps, be)
    return y, cache


def batch_norm_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of a forward call with respect to its input and parameters.

    Parameters
    ----------
    dy : ndarray, same shape as the forward input
        Gradient of the loss with respect to ``y``.
    cache : BatchNormCache
        From :func:`batch_norm_train` (batch statistics: the gradient flows through them) or
        :func:`batch_norm_inference` with ``return_cache=True`` (a fixed transform).

    Returns
    -------
    dx : ndarray, same shape and dtype as the forward input
    dgamma, dbeta : ndarray of shape (C,) or None
        ``None`` where the forward had no `gamma` / `beta`; otherwise in their dtype.

    Raises
    ------
    ValueError
        When `dy` has another shape than the forward input.
    TypeError
        For a non-float `dy`.
    """
    dy = np.asarray(dy)
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"expected a BatchNormCache from a forward call, got {type(cache)}")
    if dy.shape != cache.shape:
        raise ValueError(
            f"expected dy of shape {cache.shape} (the forward input's), got {dy.shape}"
        )
    compute_dtype(dy.dtype, "dy")
    dy3 = as_3d(dy, cache.axis, cache.x3.dtype)
    dgamma, dbeta = param_grads(cache, *cache.backend.grad_sums(dy3, cache.x3, cache.center))
    dx3 = input_grad(cache, dy3, dgamma, dbeta)
    dx = dx3.reshape(cache.shape).astype(cache.dtype, copy=False)
    dg = None if cache.gamma_dtype is None else dgamma.astype(cache.gamma_dtype)
    db = None if cache.beta_dtype is None else dbeta.astype(cache.beta_dtype)
    return dx, dg, db


@_quiet
def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    count: int,
    *,
    momentum: float | None,
    num_batches_tracked: int,
    unbiased: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """New running statistics after one training batch (the inputs are not modified).

    ``running = momentum * running + (1 - momentum) * batch_stat``: `momentum` is the weight
    of the OLD value, as in the book, Keras, Flax and Chainer. PyTorch's ``momentum`` is the
    weight of the new value, so PyTorch's ``m`` is our ``1 - m``.

    Parameters
    ----------
    running_mean, running_var : ndarray of shape (C,)
    mean, var : ndarray of shape (C,)
        The batch mean and biased batch variance.
    count : int
        Values per feature in the batch.
    momentum : float in [0, 1] or None
        ``None`` gives the cumulative average of all batches seen:
        ``running = running + (stat - running) / num_batches_tracked``.
    num_batches_tracked : int
        Batches seen including this one (only used when `momentum` is None).
    unbiased : bool, default False
        Store ``var * count / (count - 1)`` (what PyTorch and Chainer store) instead of the
        biased batch variance.

    Returns
    -------
    new_mean, new_var : ndarray of shape (C,), in the dtype of the running statistics.
    """
    var = np.asarray(var, dtype=np.float64)
    if unbiased:
        var = var * count / max(count - 1, 1)
    if momentum is None:
        w_new = 1.0 / max(num_batches_tracked, 1)
    else:
        w_new = 1.0 - momentum
    w_old = 1.0 - w_new
    new_mean = w_old * running_mean.astype(np.float64) + w_new * np.asarray(mean, np.float64)
    new_var = w_old * running_var.astype(np.float64) + w_new * var
    return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)
