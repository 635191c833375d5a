"""Group, layer and instance normalization as batch normalization over a regrouped view.

Group normalization (Wu & He 2018) of ``x`` of shape ``(N, C, *spatial)`` with ``G`` groups
normalises each sample's ``C/G`` channels of a group together, over those channels and every
spatial position. Viewed as ``(1, N*G, (C/G)*S)``, with the ``N*G`` (sample, group) pairs as the
features, that is exactly batch normalization without affine parameters. So these kernels call
:func:`batchnorm.batch_norm_train` and :func:`batchnorm.batch_norm_backward` on that view, and
the backend's ``affine`` and ``grad_sums`` passes for the per-channel affine step: the moments,
the normalisation and the gradient through the statistics are the batch-norm ones, with their
exactness for data with a large mean and their float16-in-float32 rule, on either backend.

Layer normalization (Ba, Kiros & Hinton 2016) over the last ``k`` dims is the same with the view
``(1, prod(leading dims), prod(normalized_shape))`` and one affine parameter per normalised
element. Instance normalization is group normalization with ``G = C``.

Notes
-----
With ``M`` values per group and ``x_hat`` the group-normalised input (float64 statistics)::

    mean_ng = sum(x_ng) / M,   var_ng = sum((x_ng - mean_ng)**2) / M          (biased)
    x_hat = (x - mean_ng) / sqrt(var_ng + eps),   y = gamma_c * x_hat + beta_c

Backward: ``dbeta_c = sum(dy)`` and ``dgamma_c = sum(dy * x_hat)`` over the batch and the
positions; ``dx`` is the batch-norm input gradient of the view for ``dx_hat = gamma_c * dy``
(without parameters): ``dx = inv_std / M * (M * dx_hat - sum(dx_hat) - x_hat *
sum(dx_hat * x_hat))``, sums over each group.

Layouts: for ``axis=1`` (``(N, C, *spatial)``, C-contiguous) the grouped view is a reshape, no
copy. Channels-last input (``axis=-1``, or any axis other than 1) puts ``(sample, group)``
pairs on strided, non-adjacent memory, which no reshape can make one axis: the kernels then
work on a channels-first copy of ``x`` (and of ``dy`` in backward) and return the output in
the input's layout (a second copy). The result is the same as for the channels-first layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .backends import Backend, get_backend
from .functional import BatchNormCache, batch_norm_backward, batch_norm_train

__all__ = [
    "GroupNormCache",
    "group_norm",
    "group_norm_backward",
    "layer_norm",
    "layer_norm_backward",
]

_FLOATS = (np.float16, np.float32, np.float64)


@dataclass
class GroupNormCache:
    """What :func:`group_norm_backward` / :func:`layer_norm_backward` need from a forward call.

    Attributes
    ----------
    mean, var : ndarray, float64
        The statistics of each group: shape ``(N, G)`` for :func:`group_norm`, the leading
        dims of `x` for :func:`layer_norm` (``()`` when there are none). Biased variance.
    count : int
        Values per group (``M``).
    kind : {"group", "layer"}
        Which forward made the cache.

    Notes
    -----
    Memory: the cache holds the batch-norm cache of the grouped view (which references `x`
    itself when it is a C-contiguous channels-first float32/float64 array, and otherwise
    a compute-dtype copy of it) and, only when there is a `gamma`, ``x_hat`` in the compute
    dtype (one more array of the size of `x`, needed for ``dgamma``). Keeping ``x_hat``
    instead of recomputing it saves backward a pass over the data.
    """

    mean: np.ndarray
    var: np.ndarray
    count: int
    kind: str
    stats: BatchNormCache = field(repr=False)
    x_hat: np.ndarray | None = field(repr=False)  # affine view (A, P, B), compute dtype
    gamma: np.ndarray | None = field(repr=False)  # flat, compute dtype
    gamma_dtype: np.dtype | None = field(repr=False)
    beta_dtype: np.dtype | None = field(repr=False)
    param_shape: tuple[int, ...] = field(repr=False)
    compute_dtype: np.dtype = field(default=np.dtype(np.float64), repr=False)
    shape: tuple[int, ...] = ()  # of x
    dtype: np.dtype = np.dtype(np.float64)  # of x
    axis: int = 1  # of x's channels; the view works channels-first
    backend: Backend | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# validation


def _compute_dtype(dtype: np.dtype, what: str) -> np.dtype:
    if dtype.type not in _FLOATS:
        raise TypeError(f"expected {what} of dtype float16, float32 or float64, got {dtype}")
    return np.dtype(np.float32) if dtype.type is np.float16 else np.dtype(dtype.type)


def _check_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"expected {name} to be an int, got {v!r}")
    if v < 1:
        raise ValueError(f"expected {name} >= 1, got {v}")
    return int(v)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"expected eps to be a float, got {eps!r}")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"expected eps > 0, got {eps}")
    return eps


def _check_param(v, name: str, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    if v is None:
        return None
    v = np.asarray(v)
    if v.dtype.type not in _FLOATS:
        raise TypeError(f"expected {name} of dtype float16, float32 or float64, got {v.dtype}")
    if v.shape != shape:
        raise ValueError(f"expected {name} of shape {shape} ({what}), got shape {v.shape}")
    return v


def _check_x(x, min_ndim: int) -> tuple[np.ndarray, np.dtype]:
    x = np.asarray(x)
    dtype = _compute_dtype(x.dtype, "x")
    if x.ndim < min_ndim:
        raise ValueError(f"expected x with at least {min_ndim} dims, got {x.ndim}-D of shape "
                         f"{x.shape}")
    if x.size == 0:
        raise ValueError(f"expected a non-empty x, got shape {x.shape}")
    return x, dtype


def _channel_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"expected axis to be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for x with {ndim} dims "
                         f"(expected {-ndim} <= axis < {ndim})")
    ax = int(axis) % ndim
    if ax == 0:
        raise ValueError("expected the channel axis to be 1 or later (axis 0 is the batch "
                         f"axis), got axis={axis}")
    return ax


# ---------------------------------------------------------------------------------------------
# the shared computation


def _forward(
    xs: np.ndarray,
    groups: int,
    affine_shape: tuple[int, int, int],
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    be: Backend,
) -> tuple[np.ndarray, BatchNormCache, np.ndarray]:
    """Normalise the rows of ``xs`` (C-contiguous, compute dtype) in `groups` groups, then
    apply the affine map per feature of the ``(A, P, B)`` view `affine_shape` of the result.

    Returns ``(y, stats_cache, x_hat)``, `y` and `x_hat` in the shape `affine_shape`.
    """
    view = xs.reshape(1, groups, -1)
    x_hat, stats = batch_norm_train(view, None, None, axis=1, eps=eps, backend=be)
    x_hat = x_hat.reshape(affine_shape)
    if gamma is None and beta is None:
        return x_hat, stats, x_hat
    dt = x_hat.dtype
    p = affine_shape[1]
    scale = np.ones(p, dt) if gamma is None else gamma.reshape(p).astype(dt)
    shift = np.zeros(p, dt) if beta is None else beta.reshape(p).astype(dt)
    return be.affine(x_hat, np.zeros(p, dt), scale, shift), stats, x_hat


def _backward(dys: np.ndarray, cache: GroupNormCache):
    """``(dx_s, dgamma, dbeta)`` for `dys` in the cache's ``(A, P, B)`` affine view."""
    be = cache.backend
    p = dys.shape[1]
    zeros = np.zeros(p, dys.dtype)
    dgamma = dbeta = None
    if cache.gamma is not None:
        dbeta, dgamma = be.grad_sums(dys, cache.x_hat, zeros)
        dx_hat = dys * cache.gamma.reshape(1, p, 1)
    else:
        if cache.beta_dtype is not None:
            dbeta = dys.sum(axis=(0, 2), dtype=np.float64)
        dx_hat = dys
    dx, _, _ = batch_norm_backward(dx_hat.reshape(1, cache.stats.mean.size, -1), cache.stats)
    shape = cache.param_shape
    if dgamma is not None:
        dgamma = dgamma.reshape(shape).astype(cache.gamma_dtype)
    if cache.beta_dtype is not None:
        dbeta = dbeta.reshape(shape).astype(cache.beta_dtype)
    else:
        dbeta = None
    return dx, dgamma, dbeta


def _make_cache(kind, stats, x_hat, gamma, beta, param_shape, stat_shape, x, axis, be):
    return GroupNormCache(
        mean=stats.mean.reshape(stat_shape),
        var=stats.var.reshape(stat_shape),
        count=stats.count,
        kind=kind,
        stats=stats,
        x_hat=None if gamma is None else x_hat,
        gamma=None if gamma is None else gamma.reshape(-1).astype(x_hat.dtype),
        gamma_dtype=None if gamma is None else gamma.dtype,
        beta_dtype=None if beta is None else beta.dtype,
        param_shape=param_shape,
        compute_dtype=x_hat.dtype,
        shape=x.shape,
        dtype=x.dtype,
        axis=axis,
        backend=be,
    )


def _check_dy(dy, cache: GroupNormCache, kind: str) -> np.ndarray:
    if not isinstance(cache, GroupNormCache):
        raise TypeError(f"expected a GroupNormCache from {kind}_norm, got {type(cache).__name__}")
    if cache.kind != kind:
        raise ValueError(f"expected a cache from {kind}_norm, got one from {cache.kind}_norm")
    dy = np.asarray(dy)
    _compute_dtype(dy.dtype, "dy")
    if dy.shape != cache.shape:
        raise ValueError(
            f"expected dy of shape {cache.shape} (the forward input's), got {dy.shape}"
        )
    return dy


# ---------------------------------------------------------------------------------------------
# group normalization


def group_norm(
    x: np.ndarray,
    num_groups: int,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    backend: str | Backend | None = None,
) -> tuple[np.ndarray, GroupNormCache]:
    """Group normalization: each sample's channels in `num_groups` groups, normalised per group.

    ``num_groups=1`` normalises each sample over all its values (layer normalization with one
    scale per channel); ``num_groups=C`` is instance normalization.

    Parameters
    ----------
    x : ndarray of shape (N, C) or (N, C, *spatial), or channels on `axis`
        float16, float32 or float64. Axis 0 is the batch axis.
    num_groups : int
        ``G``; must divide ``C = x.shape[axis]``.
    gamma, beta : ndarray of shape (C,) or None
        Per-channel scale and shift; ``None`` means no scale (1) or no shift (0).
    axis : int, default 1
        The channel axis; ``-1`` for channels-last ``(N, *spatial, C)`` (computed on a
        channels-first copy, see the module notes).
    eps : float, default 1e-5
        Added to the variance.
    backend : {"auto", "numpy", "numba"}, Backend or None
        See :func:`batchnorm.get_backend`.

    Returns
    -------
    y : ndarray, same shape and dtype as `x` (C-contiguous)
    cache : GroupNormCache
        For :func:`group_norm_backward`; ``cache.mean`` and ``cache.var`` have shape (N, G).

    Raises
    ------
    TypeError
        For a non-float `x`, `gamma` or `beta`, or a non-integer `num_groups` or `axis`.
    ValueError
        For fewer than 2 dims, an empty `x`, `axis` 0 or out of range, `num_groups` that does
        not divide the channels, `gamma`/`beta` of another shape than (C,), or `eps` <= 0.

    Notes
    -----
    ``y = gamma_c * (x - mean_ng) / sqrt(var_ng + eps) + beta_c``, with the mean and biased
    variance of sample ``n``'s group ``g`` (channels ``g*C/G`` to ``(g+1)*C/G - 1``, every
    position). Equal to ``torch.nn.functional.group_norm(x, G, gamma, beta, eps)`` for
    ``axis=1``.
    """
    x, cdt = _check_x(x, 2)
    ax = _channel_axis(axis, x.ndim)
    g = _check_int(num_groups, "num_groups")
    c = x.shape[ax]
    if c % g:
        raise ValueError(
            f"expected num_groups to divide the {c} channels of x with shape {x.shape} "
            f"(axis {axis}), got num_groups={g}"
        )
    gamma = _check_param(gamma, "gamma", (c,), f"one per channel of x with shape {x.shape}")
    beta = _check_param(beta, "beta", (c,), f"one per channel of x with shape {x.shape}")
    eps = _check_eps(eps)
    be = get_backend(backend)
    n = x.shape[0]
    # Channels first, C-contiguous, compute dtype: a view for axis=1 input that already is.
    xs = np.ascontiguousarray(np.moveaxis(x, ax, 1), dtype=cdt)
    y, stats, x_hat = _forward(xs, n * g, (n, c, -1), gamma, beta, eps, be)
    x_hat = x_hat.reshape(n, c, -1)
    cache = _make_cache("group", stats, x_hat, gamma, beta, (c,), (n, g), x, ax, be)
    return _to_layout(y, xs.shape, ax, x.dtype), cache


def _to_layout(y: np.ndarray, cf_shape: tuple[int, ...], ax: int, dtype) -> np.ndarray:
    """From the channels-first work array back to the input's layout and dtype."""
    y = y.reshape(cf_shape)
    if ax != 1:
        y = np.ascontiguousarray(np.moveaxis(y, 1, ax))
    return y.astype(dtype, copy=False)


def group_norm_backward(
    dy: np.ndarray, cache: GroupNormCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of a :func:`group_norm` call with respect to its input and parameters.

    Parameters
    ----------
    dy : ndarray, same shape as the forward's `x`
    cache : GroupNormCache
        From :func:`group_norm`.

    Returns
    -------
    dx : ndarray, same shape and dtype as the forward's `x`
        Includes the gradient through the group statistics.
    dgamma, dbeta : ndarray of shape (C,) or None
        ``None`` where the forward had no `gamma` / `beta`; otherwise in their dtype.

    Raises
    ------
    TypeError
        For a non-float `dy` or a cache of another kind.
    ValueError
        For `dy` of another shape than the forward's `x`, or a cache from :func:`layer_norm`.
    """
    dy = _check_dy(dy, cache, "group")
    ax = cache.axis
    n, c = cache.shape[0], cache.shape[ax]
    dys = np.ascontiguousarray(np.moveaxis(dy, ax, 1), dtype=cache.compute_dtype)
    dx, dgamma, dbeta = _backward(dys.reshape(n, c, -1), cache)
    return _to_layout(dx, dys.shape, ax, cache.dtype), dgamma, dbeta


# ---------------------------------------------------------------------------------------------
# layer normalization


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, Sequence) or isinstance(normalized_shape, str):
        raise TypeError(
            f"expected normalized_shape to be an int or a sequence of ints, "
            f"got {normalized_shape!r}"
        )
    if len(normalized_shape) == 0:
        raise ValueError("expected normalized_shape with at least one dim, got ()")
    return tuple(_check_int(d, "each dim of normalized_shape") for d in normalized_shape)


def layer_norm(
    x: np.ndarray,
    normalized_shape: int | Sequence[int],
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    *,
    eps: float = 1e-5,
    backend: str | Backend | None = None,
) -> tuple[np.ndarray, GroupNormCache]:
    """Layer normalization: each sample normalised over its last ``len(normalized_shape)`` dims.

    Parameters
    ----------
    x : ndarray of shape (*leading, *normalized_shape)
        float16, float32 or float64; there may be no leading dims.
    normalized_shape : int or sequence of int
        The trailing dims to normalise over, ``x.shape[-k:]``.
    gamma, beta : ndarray of shape `normalized_shape` or None
        Per-element scale and shift; ``None`` means no scale (1) or no shift (0).
    eps : float, default 1e-5
    backend : {"auto", "numpy", "numba"}, Backend or None

    Returns
    -------
    y : ndarray, same shape and dtype as `x`
    cache : GroupNormCache
        For :func:`layer_norm_backward`; ``cache.mean`` and ``cache.var`` have the shape of the
        leading dims.

    Raises
    ------
    TypeError
        For a non-float `x`, `gamma` or `beta`, or a `normalized_shape` that is not ints.
    ValueError
        For an empty `x` or `normalized_shape`, a `normalized_shape` that is not the end of
        ``x.shape``, `gamma`/`beta` of another shape, or `eps` <= 0.

    Notes
    -----
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the mean and biased variance of
    each leading index over the normalised dims; equal to
    ``torch.nn.functional.layer_norm(x, normalized_shape, gamma, beta, eps)``.
    """
    ns = _normalized_shape(normalized_shape)
    x, cdt = _check_x(x, len(ns))
    if x.shape[x.ndim - len(ns) :] != ns:
        raise ValueError(
            f"expected x whose last {len(ns)} dim(s) are normalized_shape {ns}, "
            f"got x of shape {x.shape}"
        )
    what = "normalized_shape"
    gamma = _check_param(gamma, "gamma", ns, what)
    beta = _check_param(beta, "beta", ns, what)
    eps = _check_eps(eps)
    be = get_backend(backend)
    lead = x.shape[: x.ndim - len(ns)]
    rows, e = math.prod(lead), math.prod(ns)
    xs = np.ascontiguousarray(x, dtype=cdt)
    # Rows of e values: the groups for the statistics, and as (rows, e, 1) the per-element
    # affine view (features contiguous, the backend's "rows" layout).
    y, stats, x_hat = _forward(xs, rows, (rows, e, 1), gamma, beta, eps, be)
    cache = _make_cache("layer", stats, x_hat, gamma, beta, ns, lead, x, 1, be)
    return y.reshape(x.shape).astype(x.dtype, copy=False), cache


def layer_norm_backward(
    dy: np.ndarray, cache: GroupNormCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of a :func:`layer_norm` call with respect to its input and parameters.

    Parameters
    ----------
    dy : ndarray, same shape as the forward's `x`
    cache : GroupNormCache
        From :func:`layer_norm`.

    Returns
    -------
    dx : ndarray, same shape and dtype as the forward's `x`
    dgamma, dbeta : ndarray of shape `normalized_shape` or None
        ``None`` where the forward had no `gamma` / `beta`; otherwise in their dtype.

    Raises
    ------
    TypeError
        For a non-float `dy` or a cache of another kind.
    ValueError
        For `dy` of another shape than the forward's `x`, or a cache from :func:`group_norm`.
    """
    dy = _check_dy(dy, cache, "layer")
    e = math.prod(cache.param_shape)
    dys = np.ascontiguousarray(dy, dtype=cache.compute_dtype).reshape(-1, e, 1)
    dx, dgamma, dbeta = _backward(dys, cache)
    return dx.reshape(cache.shape).astype(cache.dtype, copy=False), dgamma, dbeta
