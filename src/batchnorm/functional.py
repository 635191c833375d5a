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

The fused activation (``activation="relu"``) returns ``y' = max(y, 0)`` from the same pass that
writes ``y``, and its backward is batch norm's with ``dy`` replaced by ``dy * (y' > 0)`` (the
derivative of the ReLU is taken as 0 at 0, as PyTorch's and the toolkit's ``ReLU`` do). The
mask is read from the output ``y'``, which the cache keeps, inside the two gradient passes.

Three variants plug into the same steps (see ``docs/batchnorm-failures.md``):

- **masked statistics**: the statistics cover the values where ``mask`` is True (``M`` of them
  per feature); the output is computed everywhere. Backward: ``dbeta`` and ``dgamma`` sum over
  every position, and the terms through the mean and variance reach only the masked-in
  positions::

      dx = k * dy - mask * k / M * (dbeta + x_hat * dgamma),   k = gamma / sqrt(var + eps)

- **Batch Renormalization** (Ioffe 2017, Algorithm 1): ``y = gamma * (x_hat * r + d) + beta``
  with ``r``, ``d`` from the batch and running statistics, constants in backward. That is batch
  normalization with the effective scale ``gamma * r`` and shift ``gamma * d + beta``, so the
  input gradient is the compact one with ``gamma * r``; ``dgamma = sum(dy * (x_hat * r + d))``.
- **ghost batches** (Hoffer et al. 2017): the training step applied to consecutive chunks of the
  batch axis, each with its own statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import overload

import numpy as np

from .backends import Backend, get_backend
from .checks import (
    check_dy,
    check_eps,
    check_input,
    check_mask,
    check_momentum,
    check_vector,
    compute_dtype,
)
from .reducers import LOCAL, Reducer, all_finite, nonfinite_error

__all__ = [
    "ACTIVATIONS",
    "BatchNormCache",
    "GhostBatchNormCache",
    "backward",
    "batch_renorm_train",
    "ghost_chunks",
    "ghost_train_forward",
    "renorm_factors",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_norm_train",
    "inference_forward",
    "read_only",
    "running_step",
    "train_forward",
    "update_running_stats",
]

# NaN and Inf propagate by design; the layers decide what to do with them.
_quiet = np.errstate(invalid="ignore", over="ignore", divide="ignore")

ACTIVATIONS = (None, "relu")
"""The activations that can be fused into batch norm's passes."""


def check_activation(activation) -> str | None:
    """`activation` as one of :data:`ACTIVATIONS`.

    Raises
    ------
    TypeError
        For anything else than a string or None.
    ValueError
        For an unknown name.
    """
    if activation is None:
        return None
    if not isinstance(activation, str):
        raise TypeError(f"expected activation None or 'relu', got {activation!r}")
    name = activation.lower()
    if name not in ACTIVATIONS:
        raise ValueError(f"expected activation None or 'relu', got {activation!r}")
    return name


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `a` and `b` share memory (exactly where that is cheap to decide, else when
    their address ranges overlap)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=10**6))
    except np.exceptions.TooHardError:
        return True


def check_out(
    out, name: str, shape: tuple[int, ...], dtype: np.dtype, inputs: dict[str, np.ndarray]
) -> np.ndarray:
    """`out` checked as a buffer for a kernel's output `name`: an ndarray of `shape` and
    `dtype`, C-contiguous, writeable, sharing no memory with any of `inputs` (which the
    kernel still reads while it writes).

    Raises
    ------
    TypeError
        For anything else than an ndarray, or another dtype.
    ValueError
        For another shape, a non-contiguous or read-only array, or one that overlaps an input.
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"expected out to be an ndarray for {name}, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"expected out of shape {tuple(shape)} for {name}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"expected out of dtype {np.dtype(dtype).name} for {name}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous out for {name}, got a non-contiguous array")
    if not out.flags.writeable:
        raise ValueError(f"expected a writeable out for {name}, got a read-only array")
    for label, arr in inputs.items():
        if arr is not None and _overlap(out, arr):
            raise ValueError(
                f"expected out for {name} to share no memory with {label}, which the kernel "
                f"still reads while it writes {name}; got overlapping arrays"
            )
    return out


@dataclass(eq=False)
class BatchNormCache:
    """What the backward pass needs from a forward call.

    Attributes
    ----------
    mean, var : ndarray of shape (C,), float64
        The statistics that normalised the input: the batch mean and biased batch variance in
        training (over every process's batch, with a reducer that communicates), the given
        (running) ones in inference.
    count : int
        Values per feature that the statistics cover (``M``).
    training : bool
        True when batch statistics were used (their gradient flows back into ``dx``).
    x3 : ndarray of shape (A, C, B) or None
        The input as (A, C, B) in the compute dtype, owned by the cache: a copy, never a view
        of the caller's array, so that editing ``x`` in place after the forward cannot change
        the gradients. None for an inference cache made without `keep_input` (its backward
        is ``dx = gamma * inv_std * dy`` and gives no parameter gradients).
    center : ndarray of shape (C,)
        The mean rounded to the compute dtype (``x - center`` is exact).
    inv_std : ndarray of shape (C,), float64
        ``1 / sqrt(var + eps)``.
    gamma : ndarray of shape (C,) or None
        The scale at forward time, in the compute dtype.
    shape, dtype, axis, eps
        The input's shape and dtype, the feature axis (non-negative), eps.
    backend, reducer
        What computed the forward; backward uses the same.
    activation : {None, "relu"}
        The activation fused into the forward.
    y3 : ndarray of shape (A, C, B) or None
        With an activation: the forward's output ``relu(y)`` in the compute dtype (the same
        array as the returned output unless it had to be converted), whose sign is the mask of
        the backward. It must not be modified before the backward.
    mask : ndarray of shape (A, 1, B), bool, or None
        The values the statistics cover (None: all of them); ``count`` is their number per
        feature.
    renorm_r, renorm_d : ndarray of shape (C,), float64, or None
        Batch Renormalization's correction (None for batch normalization); ``gamma`` is then
        the effective scale ``gamma * r``.
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
    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int
    eps: float
    backend: Backend = field(repr=False)
    reducer: Reducer = field(repr=False)
    activation: str | None = None
    y3: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)
    renorm_r: np.ndarray | None = field(default=None, repr=False)
    renorm_d: np.ndarray | None = field(default=None, repr=False)


@dataclass(eq=False)
class GhostBatchNormCache:
    """What the backward pass needs from a ghost-batch forward: one cache per virtual batch.

    Attributes
    ----------
    chunks : list of BatchNormCache
        One per virtual batch, in order along axis 0.
    bounds : list of (start, stop)
        The rows of axis 0 each virtual batch holds.
    mean, var : ndarray of shape (C,), float64
        The statistics of the whole batch (the virtual batches' merged exactly), for
        population statistics; the running update uses :attr:`chunk_mean` and
        :attr:`chunk_var` instead.
    count : int
        Values per feature in the whole batch (the masked-in ones with a mask).
    chunk_mean, chunk_var : ndarray of shape (K, C), float64
        Each virtual batch's mean and biased variance.
    chunk_count : ndarray of shape (K,), int64
        Each virtual batch's values per feature.
    x3, y3 : ndarray or None
        The forward's input and, with an activation, its output (what the backward reads).
    """

    chunks: list[BatchNormCache] = field(repr=False)
    bounds: list[tuple[int, int]]
    mean: np.ndarray
    var: np.ndarray
    count: int
    chunk_mean: np.ndarray = field(repr=False)
    chunk_var: np.ndarray = field(repr=False)
    chunk_count: np.ndarray = field(repr=False)
    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int
    gamma_dtype: np.dtype | None = field(repr=False)
    beta_dtype: np.dtype | None = field(repr=False)
    x3: np.ndarray | None = field(default=None, repr=False)
    y3: np.ndarray | None = field(default=None, repr=False)
    training: bool = True
    reducer: Reducer = field(default=LOCAL, repr=False)


AnyCache = BatchNormCache | GhostBatchNormCache


def as_3d(x: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    """View `x` as ``(A, C, B)`` with ``C = x.shape[axis]`` (a copy only where needed)."""
    shape = x.shape
    if x.dtype is not dtype:
        x = x.astype(dtype, copy=False)
    if axis == 1 and len(shape) == 2:  # the usual (N, C) case
        return x.reshape(shape[0], shape[1], 1)
    return x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


def _own(x3: np.ndarray, x: np.ndarray, backend: Backend | None = None) -> np.ndarray:
    """`x3`, copied if it may share memory with the caller's `x` (float16 input, a layout
    that needs a copy to become (A, C, B): already a private array) and that memory can still
    be written (see :func:`read_only`)."""
    if not np.may_share_memory(x3, x) or read_only(x):
        return x3
    copied = None if backend is None else backend.copy(x3)
    return x3.copy() if copied is None else copied


def read_only(a: np.ndarray) -> bool:
    """Whether no array can write to `a`'s memory: `a` and every array it is a view of are
    read-only, down to memory that owns itself or an immutable ``bytes`` object.

    The kernels keep such an input as it is instead of copying it for backward (the copy is
    the one extra pass over the data a training step makes). Mark an input read-only with
    ``x.setflags(write=False)`` to save that pass; setting the flag back and editing the array
    before backward is the one way around the guarantee.
    """
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return a is None or isinstance(a, bytes)


def _count_error(
    count: int, min_count: int, shape: tuple[int, ...], axis, features: int | None = None
) -> ValueError:
    if features is not None:  # a mask: the count is the same for every feature
        return ValueError(
            f"expected at least {min_count} valid value(s) (mask True) per feature"
            f"{' in training' if min_count > 1 else ''}, got {count} for each of the "
            f"{features} features (all of them) of x with shape {shape}; nothing was updated"
        )
    if min_count > 1:
        return ValueError(
            f"expected more than 1 value per feature in training, got x of shape {shape} "
            f"({count} value(s) per feature on axis {axis})"
        )
    return ValueError(
        f"expected a non-empty batch, got x of shape {shape}: expected at least one value per "
        "feature"
    )


# ---------------------------------------------------------------------------------------------
# the steps of the one orchestration


def normalize_with_stats(
    x3: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    backend: Backend,
    relu: bool = False,
    out3: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``y3 = gamma * (x3 - mean) / sqrt(var + eps) + beta`` per feature (``max(y3, 0)`` with
    `relu`), written into `out3` when given.

    Returns ``(y3, center, inv_std)``: the float part of the mean the backend subtracted and
    the float64 inverse standard deviation, both needed by the backward pass.
    """
    fused = backend.normalize(x3, mean, var, gamma, beta, eps, relu=relu, out=out3)
    if fused is not None:
        return fused
    return _normalize_generic(x3, mean, var, gamma, beta, eps, backend, relu, out3)


@_quiet
def _normalize_generic(x3, mean, var, gamma, beta, eps, backend, relu=False, out3=None):
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
    y3 = backend.affine(x3, center, g.astype(dtype), shift.astype(dtype), relu=relu, out=out3)
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
    cache: BatchNormCache,
    dy3: np.ndarray,
    dgamma: np.ndarray,
    dbeta: np.ndarray,
    out3: np.ndarray | None = None,
) -> np.ndarray:
    """``dx3`` from ``dy3`` and the parameter gradients of the whole batch (float64), written
    into `out3` when given; ``dy3`` masked by the ReLU of a fused activation."""
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
    kd = k.astype(dtype)
    dx3 = cache.backend.grad_input(
        dy3, cache.x3, cache.center, kd, q.astype(dtype), r.astype(dtype),
        mask=cache.y3, out=out3,
    )
    if cache.training and cache.mask is not None:
        # Masked-out values do not enter the statistics: only the direct term k * dy (through
        # the ReLU of a fused activation) reaches them.
        direct = dy3 * kd.reshape(1, -1, 1)
        if cache.y3 is not None:
            direct *= cache.y3 > 0
        np.copyto(dx3, direct, where=~cache.mask)
    return dx3


def _out3(out: np.ndarray | None, axis: int, dtype: np.dtype) -> np.ndarray | None:
    """The (A, C, B) view of a checked output buffer that the backend can write directly
    (one of the compute dtype); None for none or one that needs a conversion (float16)."""
    if out is None or out.dtype != dtype:
        return None
    return as_3d(out, axis, dtype)


def _output(
    y3: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, out: np.ndarray | None = None
) -> np.ndarray:
    y = y3.reshape(shape)
    if out is not None:
        if not np.may_share_memory(y, out):  # computed elsewhere (float16): convert into out
            np.copyto(out, y, casting="unsafe")
        return out
    return y if y.dtype is dtype else y.astype(dtype)


def masked_values(x3: np.ndarray, mask3: np.ndarray) -> np.ndarray:
    """The values of `x3` (A, C, B) where `mask3` (A, 1, B) is True, as an (M, C, 1) array (a
    copy), for the backends' ``moments``."""
    return np.moveaxis(x3, 1, 2)[mask3[:, 0, :]][:, :, None]


def mask_3d(mask: np.ndarray, axis: int) -> np.ndarray:
    """A checked mask (x's dims, size 1 on `axis`) viewed as (A, 1, B)."""
    return as_3d(mask, axis, mask.dtype)


def renorm_factors(
    mean: np.ndarray,
    var: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
    rmax: float,
    dmax: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch Renormalization's ``(r, d)`` (Ioffe 2017, Algorithm 1), float64 of shape (C,).

    ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B - mu) / sigma, -dmax,
    dmax)`` with ``sigma_B = sqrt(var + eps)`` and ``sigma = sqrt(running_var + eps)``. With
    ``rmax = 1`` and ``dmax = 0`` they are exactly 1 and 0.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mean = np.asarray(mean, dtype=np.float64)
        sigma_b = np.sqrt(np.asarray(var, dtype=np.float64) + eps)
        sigma = np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
        r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
        d = np.clip((mean - np.asarray(running_mean, dtype=np.float64)) / sigma, -dmax, dmax)
    return r, d


def train_forward(
    x: np.ndarray,
    axis: int,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    backend: Backend,
    reducer: Reducer = LOCAL,
    *,
    min_count: int = 1,
    check_finite: bool = False,
    axis_label: int | None = None,
    activation: str | None = None,
    out: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    renorm: tuple[np.ndarray, np.ndarray, float, float] | None = None,
) -> tuple[np.ndarray, BatchNormCache]:
    """The training forward of every layer and kernel, on checked arguments.

    Batch statistics from `reducer` (or, for a local reducer, from the backend's fused kernel
    where it has one), then the normalize pass (with the fused `activation`, into `out` when
    given). `axis` must be a non-negative index, `gamma`, `beta` vectors of ``x.shape[axis]``
    values (or None), `activation` checked, `out` checked with :func:`check_out`.

    `mask` (checked by :func:`batchnorm.checks.check_mask`: x's dims with size 1 on `axis`)
    restricts the statistics to the values where it is True; the reducer then sees those
    values only, as an (M, C, 1) array, so a reducer that communicates merges masked counts
    like any others. `renorm` = ``(running_mean, running_var, rmax, dmax)`` turns the step
    into Batch Renormalization: the statistics give ``(r, d)`` (:func:`renorm_factors`) and the
    normalize pass uses the effective scale ``gamma * r`` and shift ``gamma * d + beta``.
    The fused forward kernel is skipped with either (it computes statistics and output in
    one call).

    The cache keeps a private copy of the input (one pass over ``x`` and its size in memory
    until the cache is dropped) unless converting ``x`` to the compute dtype or layout already
    made one (float16 input) or nothing can write to ``x`` (:func:`read_only`).

    Raises
    ------
    ValueError
        Fewer than `min_count` values per feature (over all processes, for a reducer that
        communicates; masked-in values with a mask); non-finite statistics when
        `check_finite`.
    """
    x3 = _own(as_3d(x, axis, compute_dtype(x.dtype)), x, backend)
    m3 = None if mask is None else mask_3d(mask, axis)
    count = x3.shape[0] * x3.shape[2]
    relu = activation == "relu"
    out3 = _out3(out, axis, x3.dtype)
    fused = None
    if reducer.local and count >= min_count and m3 is None and renorm is None:
        fused = backend.train_forward(x3, gamma, beta, eps, relu=relu, out=out3)
    r = d = None
    if fused is None:
        xs = x3 if m3 is None else masked_values(x3, m3)
        count, mean, var = reducer.moments(
            backend, xs, check_finite=check_finite, shape=x.shape
        )
        if count < min_count:
            label = axis if axis_label is None else axis_label
            raise _count_error(count, min_count, x.shape, label,
                               None if m3 is None else x3.shape[1])
        g_eff, b_eff = gamma, beta
        if renorm is not None:
            r, d = renorm_factors(mean, var, *renorm[:2], eps, *renorm[2:])
            g64 = 1.0 if gamma is None else gamma.astype(np.float64)
            g_eff = g64 * r
            b_eff = g64 * d if beta is None else g64 * d + beta
        y3, center, inv_std = normalize_with_stats(
            x3, mean, var, g_eff, b_eff, eps, backend, relu, out3
        )
        gamma_c = None if g_eff is None else g_eff.astype(x3.dtype)
    else:
        y3, mean, var, center, inv_std, finite = fused
        if check_finite and not finite:
            raise nonfinite_error(mean, var, x.shape)
        gamma_c = None if gamma is None else gamma.astype(x3.dtype)
    cache = BatchNormCache(
        mean=mean,
        var=var,
        count=count,
        training=True,
        x3=x3,
        center=center,
        inv_std=inv_std,
        gamma=gamma_c,
        gamma_dtype=None if gamma is None else gamma.dtype,
        beta_dtype=None if beta is None else beta.dtype,
        shape=x.shape,
        dtype=x.dtype,
        axis=axis,
        eps=eps,
        backend=backend,
        reducer=reducer,
        activation=activation,
        y3=y3 if relu else None,
        mask=m3,
        renorm_r=r,
        renorm_d=d,
    )
    return _output(y3, x.shape, x.dtype, out), cache


def ghost_chunks(n: int, virtual_batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each virtual batch of `n` samples.

    Consecutive chunks of `virtual_batch_size` samples; the last holds the remainder. A
    remainder of a single sample joins the chunk before it (its statistics would otherwise be
    those of one sample), so that last chunk has ``virtual_batch_size + 1`` samples.
    """
    v = int(virtual_batch_size)
    bounds = [(lo, min(lo + v, n)) for lo in range(0, n, v)]
    if len(bounds) > 1 and v > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds or [(0, 0)]


def ghost_train_forward(
    x: np.ndarray,
    axis: int,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    backend: Backend,
    virtual_batch_size: int,
    *,
    min_count: int = 1,
    check_finite: bool = False,
    axis_label: int | None = None,
    activation: str | None = None,
    out: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    renorm: tuple[np.ndarray, np.ndarray, float, float] | None = None,
) -> tuple[np.ndarray, GhostBatchNormCache]:
    """Ghost batch normalization (Hoffer, Hubara & Soudry 2017): :func:`train_forward` applied
    to each virtual batch of :func:`ghost_chunks` along axis 0 (the batch axis), on checked
    arguments (``axis >= 1``). The statistics are local: a virtual batch is a part of this
    call's batch.

    Raises
    ------
    ValueError
        As :func:`train_forward` for a virtual batch, naming it.
    """
    bounds = ghost_chunks(x.shape[0], virtual_batch_size)
    ys, caches = [], []
    for i, (lo, hi) in enumerate(bounds):
        try:
            y, cache = train_forward(
                x[lo:hi], axis, gamma, beta, eps, backend, LOCAL, min_count=min_count,
                check_finite=check_finite, axis_label=axis_label, activation=activation,
                out=None if out is None else out[lo:hi],
                mask=None if mask is None else mask[lo:hi], renorm=renorm,
            )
        except ValueError as err:
            raise ValueError(
                f"virtual batch {i} of {len(bounds)} (samples {lo}:{hi} of axis 0): {err}"
            ) from None
        ys.append(y)
        caches.append(cache)
    means = np.stack([c.mean for c in caches])
    variances = np.stack([c.var for c in caches])
    counts = np.array([c.count for c in caches], dtype=np.int64)
    # The whole batch's statistics, merged exactly from the parts (for population statistics).
    total = int(counts.sum())
    w = counts[:, None] / total
    mean = (w * means).sum(axis=0)
    var = (w * (variances + (means - mean) ** 2)).sum(axis=0)
    y = out if out is not None else np.concatenate(ys, axis=0)
    cache = GhostBatchNormCache(
        chunks=caches,
        bounds=bounds,
        mean=mean,
        var=var,
        count=total,
        chunk_mean=means,
        chunk_var=variances,
        chunk_count=counts,
        shape=x.shape,
        dtype=x.dtype,
        axis=axis,
        gamma_dtype=caches[0].gamma_dtype,
        beta_dtype=caches[0].beta_dtype,
        x3=x,
        y3=y if activation == "relu" else None,
    )
    return y, cache


def ghost_running_inputs(
    cache: GhostBatchNormCache, unbiased: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The batch mean and variance a ghost step feeds the running update: the average of the
    virtual batches' means and of their variances (tf.keras 2's convention), each variance
    corrected by ``n_k / (n_k - 1)`` first when `unbiased`."""
    var = cache.chunk_var
    if unbiased:
        n = cache.chunk_count.astype(np.float64)[:, None]
        var = var * n / np.maximum(n - 1, 1)
    return cache.chunk_mean.mean(axis=0), var.mean(axis=0)


def inference_forward(
    x: np.ndarray,
    axis: int,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    backend: Backend,
    *,
    keep_cache: bool = True,
    activation: str | None = None,
    out: np.ndarray | None = None,
    keep_input: bool = True,
) -> tuple[np.ndarray, BatchNormCache | None]:
    """The inference forward (given statistics) of every layer and kernel, on checked
    arguments; the cache (for the gradient of this fixed transform) only with `keep_cache`.
    `activation` and `out` as in :func:`train_forward`.

    Only ``dgamma`` reads the input in this backward; without `keep_input` the cache holds no
    input (``dx`` needs none) and its backward gives no parameter gradients. With it, the cache
    keeps a private copy, as :func:`train_forward` does."""
    x3 = as_3d(x, axis, compute_dtype(x.dtype))
    relu = activation == "relu"
    y3, center, inv_std = normalize_with_stats(
        x3, mean, var, gamma, beta, eps, backend, relu, _out3(out, axis, x3.dtype)
    )
    if not keep_cache:
        return _output(y3, x.shape, x.dtype, out), None
    count = x3.shape[0] * x3.shape[2]
    x3 = _own(x3, x, backend) if keep_input else None
    cache = BatchNormCache(
        mean=np.array(mean, dtype=np.float64),
        var=np.array(var, dtype=np.float64),
        count=count,
        training=False,
        x3=x3,
        center=center,
        inv_std=inv_std,
        gamma=None if gamma is None else gamma.astype(center.dtype),
        gamma_dtype=None if gamma is None else gamma.dtype,
        beta_dtype=None if beta is None else beta.dtype,
        shape=x.shape,
        dtype=x.dtype,
        axis=axis,
        eps=eps,
        backend=backend,
        reducer=LOCAL,
        activation=activation,
        y3=y3 if relu else None,
    )
    return _output(y3, x.shape, x.dtype, out), cache


def backward(
    dy: np.ndarray, cache: AnyCache, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The backward of every layer and kernel, on a checked `dy`: ``(dx, dgamma, dbeta)`` with
    ``dx`` in the input's dtype (written into `out`, checked with :func:`check_out`, when
    given) and the parameter gradients in float64 (this process's share for a reducer that
    communicates; ``dx`` uses the sums over all processes). A cache without input gives
    ``(dx, None, None)``."""
    if isinstance(cache, GhostBatchNormCache):
        parts = [
            backward(dy[lo:hi], c, None if out is None else out[lo:hi])
            for (lo, hi), c in zip(cache.bounds, cache.chunks, strict=True)
        ]
        dx = out if out is not None else np.concatenate([p[0] for p in parts], axis=0)
        return dx, sum(p[1] for p in parts), sum(p[2] for p in parts)
    x3 = cache.x3
    if x3 is None:
        return _fixed_map_backward(dy, cache, out), None, None
    dy3 = as_3d(dy, cache.axis, x3.dtype)
    out3 = _out3(out, cache.axis, x3.dtype)
    mask = cache.y3
    reducer = cache.reducer
    be = cache.backend
    fused = None
    if reducer.local and cache.mask is None:
        fused = be.backward(
            dy3, x3, cache.center, cache.mean, cache.inv_std, cache.gamma, cache.count,
            cache.training, mask=mask, out=out3,
        )
    if fused is None:
        sums = be.grad_sums(dy3, x3, cache.center, mask=mask)
        dgamma, dbeta = param_grads(cache, *sums)
        if cache.training and not reducer.local:
            # dx needs the sums over the whole batch; dgamma/dbeta stay this process's share.
            total = param_grads(cache, *reducer.grad_sums(*sums))
            dx3 = input_grad(cache, dy3, *total, out3)
        else:
            dx3 = input_grad(cache, dy3, dgamma, dbeta, out3)
    else:
        dx3, dgamma, dbeta = fused
    if cache.renorm_r is not None:
        # y = gamma * (x_hat * r + d) + beta: dgamma = sum(dy * x_hat) * r + sum(dy) * d.
        dgamma = dgamma * cache.renorm_r + dbeta * cache.renorm_d
    return _output(dx3, cache.shape, cache.dtype, out), dgamma, dbeta


@_quiet
def _fixed_map_backward(
    dy: np.ndarray, cache: BatchNormCache, out: np.ndarray | None = None
) -> np.ndarray:
    """``dx = gamma * inv_std * dy`` (``dy`` masked by a fused ReLU): the input gradient of an
    inference forward, which reads no input."""
    dtype = cache.center.dtype
    k = cache.inv_std if cache.gamma is None else cache.gamma.astype(np.float64) * cache.inv_std
    dy3 = as_3d(dy, cache.axis, dtype)
    if cache.y3 is not None:
        dy3 = np.where(cache.y3 > 0, dy3, dtype.type(0))
    out3 = _out3(out, cache.axis, dtype)
    dx3 = np.multiply(dy3, k.astype(dtype).reshape(1, -1, 1), out=out3)
    return _output(dx3, cache.shape, cache.dtype, out)


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
    reducer: Reducer | None = None,
    activation: str | None = None,
    out: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch normalization with the statistics of the batch itself, optionally followed by a
    fused ReLU.

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
    reducer : Reducer or None
        Where the statistics are combined (see :mod:`batchnorm.reducers`); None: this batch.
    activation : {None, "relu"}
        ``"relu"`` returns ``max(y, 0)``, written by the normalize pass itself; the backward
        then applies the ReLU's mask inside its own passes. The result equals batch norm
        followed by a ReLU, forward and backward (derivative 0 where ``y <= 0``).
    out : ndarray or None
        Where to write ``y``: C-contiguous, of the shape and dtype of `x`, writeable, sharing
        no memory with `x`, `gamma` or `beta`. It is returned. With an activation the cache
        refers to it: do not modify it before the backward.
    mask : bool ndarray of x's shape without the feature axis, or None
        True marks the values the statistics cover (``(N, L)`` for ``(N, C, L)`` input; also
        accepted: x's dims with size 1 on the feature axis, broadcastable to x). The output is
        computed at every position. None: every value counts.

    Returns
    -------
    y : ndarray, same shape and dtype as `x`
    cache : BatchNormCache
        For :func:`batch_norm_backward`; ``cache.mean`` and ``cache.var`` are the batch mean
        and biased variance (float64, shape (C,)).

    Raises
    ------
    TypeError
        For a non-float `x`, `gamma` or `beta`, an `activation` that is not a string or None,
        an `out` that is not an ndarray or has another dtype than `x`, a mask that is not bool.
    ValueError
        For fewer than 2 dims, an axis out of range, `gamma`/`beta` of the wrong size, an
        empty batch (no masked-in value), an unknown `activation`, an `out` of another shape,
        not C-contiguous, read-only or overlapping an input, or a mask of the wrong shape.

    Notes
    -----
    With ``activation="relu"``: ``y' = max(y, 0)`` and, in the backward, ``dy`` is replaced by
    ``dy * (y' > 0)``; NaN in ``y`` stays NaN in ``y'`` (as in PyTorch).
    """
    reducer = LOCAL if reducer is None else reducer
    with reducer.guard("forward"):
        x, ax, gamma, beta, eps, be, activation, out, mask = _check_train_args(
            x, axis, gamma, beta, eps, backend, activation, out, mask
        )
    return train_forward(x, ax, gamma, beta, eps, be, reducer, activation=activation, out=out,
                         mask=mask)


def _check_train_args(x, axis, gamma, beta, eps, backend, activation, out, mask):
    x, ax = check_input(x, axis)
    eps = check_eps(eps)
    c = x.shape[ax]
    gamma = None if gamma is None else check_vector(gamma, "gamma", c, x.shape, ax)
    beta = None if beta is None else check_vector(beta, "beta", c, x.shape, ax)
    be = get_backend(backend)
    activation = check_activation(activation)
    if out is not None:
        out = check_out(out, "y", x.shape, x.dtype, {"x": x, "gamma": gamma, "beta": beta})
    mask = None if mask is None else check_mask(mask, x.shape, ax)
    return x, ax, gamma, beta, eps, be, activation, out, mask


def check_renorm_bounds(rmax, dmax) -> tuple[float, float]:
    """`rmax` >= 1 and `dmax` >= 0 as floats (infinity allowed: no clipping)."""
    got = []
    for name, v, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if isinstance(v, (str, bytes, bool)) or not isinstance(v, (int, float, np.number)):
            raise TypeError(f"expected {name} to be a float >= {low:g}, got {v!r}")
        v = float(v)
        if not v >= low:
            raise ValueError(f"expected {name} >= {low:g}, got {v}")
        got.append(v)
    return got[0], got[1]


def batch_renorm_train(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    axis: int = 1,
    eps: float = 1e-5,
    backend: str | Backend | None = None,
    reducer: Reducer | None = None,
    activation: str | None = None,
    out: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch Renormalization's training step (Ioffe 2017, Algorithm 1).

    Parameters
    ----------
    x, gamma, beta, axis, eps, backend, reducer, activation, out, mask
        As in :func:`batch_norm_train`.
    running_mean, running_var : ndarray of shape (C,)
        The moving statistics ``mu`` and ``sigma**2 - eps`` of the paper (not modified here).
    rmax : float >= 1, default 3.0
    dmax : float >= 0, default 5.0
        Clipping bounds of the correction; ``rmax=1, dmax=0`` is batch normalization exactly.

    Returns
    -------
    y : ndarray, same shape and dtype as `x`
    cache : BatchNormCache
        For :func:`batch_norm_backward`; ``cache.renorm_r`` and ``cache.renorm_d`` hold the
        correction.

    Notes
    -----
    With the batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` and
    ``sigma = sqrt(running_var + eps)``::

        r = clip(sigma_B / sigma, 1/rmax, rmax),  d = clip((mu_B - running_mean) / sigma,
                                                           -dmax, dmax)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    ``r`` and ``d`` are constants in backward (the paper's stop-gradient): ``dx`` is batch
    normalization's with the scale ``gamma * r``, ``dgamma = sum(dy * (x_hat * r + d))`` and
    ``dbeta = sum(dy)``.

    Raises
    ------
    TypeError, ValueError
        As in :func:`batch_norm_train`; also for running statistics of the wrong size and
        `rmax` < 1 or `dmax` < 0.
    """
    reducer = LOCAL if reducer is None else reducer
    with reducer.guard("forward"):
        x, ax, gamma, beta, eps, be, activation, out, mask = _check_train_args(
            x, axis, gamma, beta, eps, backend, activation, out, mask
        )
        c = x.shape[ax]
        running_mean = check_vector(running_mean, "running_mean", c, x.shape, ax)
        running_var = check_vector(running_var, "running_var", c, x.shape, ax)
        rmax, dmax = check_renorm_bounds(rmax, dmax)
    return train_forward(x, ax, gamma, beta, eps, be, reducer, activation=activation, out=out,
                         mask=mask, renorm=(running_mean, running_var, rmax, dmax))


@overload
def batch_norm_inference(
    x, gamma, beta, mean, var, *, axis=..., eps=..., backend=..., return_cache=False,
    activation=..., out=...,
) -> np.ndarray: ...
@overload
def batch_norm_inference(
    x, gamma, beta, mean, var, *, axis=..., eps=..., backend=..., return_cache=True,
    activation=..., out=...,
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
    activation: str | None = None,
    out: np.ndarray | None = None,
):
    """Batch normalization with given statistics (the running averages), optionally followed
    by a fused ReLU.

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
    activation, out
        As in :func:`batch_norm_train` (`out` must not overlap `mean` or `var` either).

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
    eps = check_eps(eps)
    c = x.shape[ax]
    gamma = None if gamma is None else check_vector(gamma, "gamma", c, x.shape, ax)
    beta = None if beta is None else check_vector(beta, "beta", c, x.shape, ax)
    mean = check_vector(mean, "mean", c, x.shape, ax)
    var = check_vector(var, "var", c, x.shape, ax)
    be = get_backend(backend)
    activation = check_activation(activation)
    if out is not None:
        inputs = {"x": x, "gamma": gamma, "beta": beta, "mean": mean, "var": var}
        out = check_out(out, "y", x.shape, x.dtype, inputs)
    y, cache = inference_forward(
        x, ax, gamma, beta, mean, var, eps, be, keep_cache=return_cache,
        activation=activation, out=out,
    )
    return (y, cache) if return_cache else y


def batch_norm_backward(
    dy: np.ndarray, cache: AnyCache, *, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of a forward call with respect to its input and parameters.

    Parameters
    ----------
    dy : ndarray, same shape as the forward input
        Gradient of the loss with respect to ``y``.
    cache : BatchNormCache or GhostBatchNormCache
        From :func:`batch_norm_train` or :func:`batch_renorm_train` (batch statistics: the
        gradient flows through them), :func:`batch_norm_inference` with
        ``return_cache=True`` (a fixed transform) or :func:`ghost_train_forward`. With a
        fused activation, `dy` is the gradient with respect to its output ``y'``.
    out : ndarray or None
        Where to write ``dx``: C-contiguous, of the shape and dtype of the forward input,
        writeable, sharing no memory with `dy`, the forward input or (with an activation) the
        forward output. It is returned.

    Returns
    -------
    dx : ndarray, same shape and dtype as the forward input
    dgamma, dbeta : ndarray of shape (C,) or None
        ``None`` where the forward had no `gamma` / `beta`; otherwise in their dtype.

    Raises
    ------
    ValueError
        When `dy` has another shape than the forward input; for an `out` of another shape,
        not C-contiguous, read-only or overlapping an array the backward reads.
    TypeError
        For a non-float `dy`, a `cache` that is not a BatchNormCache, an `out` that is not an
        ndarray or of another dtype.
    """
    if not isinstance(cache, (BatchNormCache, GhostBatchNormCache)):
        raise TypeError(f"expected a BatchNormCache from a forward call, got {type(cache)}")
    with cache.reducer.guard("backward"):
        dy = check_dy(dy, cache.shape)
        if out is not None:
            inputs = {"dy": dy, "x": cache.x3, "the forward output": cache.y3}
            out = check_out(out, "dx", cache.shape, cache.dtype, inputs)
    dx, dgamma, dbeta = backward(dy, cache, out)
    dg = None if cache.gamma_dtype is None or dgamma is None else dgamma.astype(cache.gamma_dtype)
    db = None if cache.beta_dtype is None or dbeta is None else dbeta.astype(cache.beta_dtype)
    return dx, dg, db


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

    Raises
    ------
    TypeError, ValueError
        For a momentum that is not None or a float in [0, 1].
    """
    new_mean, new_var, _ = running_step(
        running_mean, running_var, mean, var, count, momentum=momentum,
        num_batches_tracked=num_batches_tracked, unbiased=unbiased,
    )
    return new_mean, new_var


def running_step(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    count: int,
    *,
    momentum: float | None,
    num_batches_tracked: int,
    unbiased: bool = False,
    backend: Backend | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`update_running_stats` for the layers: also whether the new statistics are
    finite in their dtype, and a `backend` whose fused ``running_update`` computes the same
    values in one call."""
    if momentum is None:
        w_new = 1.0 / max(num_batches_tracked, 1)
    else:
        w_new = 1.0 - check_momentum(momentum, allow_none=False)
    if backend is not None:
        fused = backend.running_update(
            running_mean, running_var, mean, var, count, w_new, unbiased
        )
        if fused is not None:
            return fused
    with np.errstate(invalid="ignore", over="ignore"):
        w_old = 1.0 - w_new
        mean = np.asarray(mean, dtype=np.float64)
        var = np.asarray(var, dtype=np.float64)
        if unbiased:
            var = var * count / max(count - 1, 1)
        new_mean = running_mean.astype(np.float64)
        new_mean *= w_old
        new_mean += w_new * mean
        new_var = running_var.astype(np.float64)
        new_var *= w_old
        new_var += w_new * var
        new_mean = new_mean.astype(running_mean.dtype)
        new_var = new_var.astype(running_var.dtype)
    return new_mean, new_var, all_finite(new_mean, new_var)
