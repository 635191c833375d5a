"""Second-order gradients: the backward of :func:`batchnorm.batch_norm_backward`.

Gradient penalties, Hessian-vector products and meta-learning differentiate a gradient once
more. For batch normalization that means differentiating ``(dx, dgamma, dbeta)`` (the output of
the backward pass) with respect to its inputs ``x``, ``gamma`` and ``dy``.
"""

from __future__ import annotations

import math

import numpy as np

from .checks import compute_dtype
from .functional import BatchNormCache

__all__ = ["batch_norm_double_backward"]


def _as3(a: np.ndarray, cache: BatchNormCache) -> np.ndarray:
    ax = cache.axis
    shape = cache.shape
    return np.asarray(a, dtype=np.float64).reshape(
        math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1 :])
    )


def _check_full(a, name: str, cache: BatchNormCache) -> np.ndarray:
    a = np.asarray(a)
    compute_dtype(a.dtype, name)
    if a.shape != tuple(cache.shape):
        raise ValueError(
            f"expected {name} of shape {tuple(cache.shape)} (the forward input's), got {a.shape}"
        )
    return a


def _check_vec(a, name: str, c: int) -> np.ndarray:
    a = np.asarray(a)
    compute_dtype(a.dtype, name)
    if a.shape != (c,):
        raise ValueError(f"expected {name} of shape ({c},) (one value per feature), got {a.shape}")
    return a.astype(np.float64)


def batch_norm_double_backward(
    cache: BatchNormCache,
    dy: np.ndarray,
    ddx: np.ndarray,
    ddgamma: np.ndarray | None = None,
    ddbeta: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Gradients of ``<dx, ddx> + <dgamma, ddgamma> + <dbeta, ddbeta>`` with respect to ``x``,
    ``gamma`` and ``dy``, where ``(dx, dgamma, dbeta) = batch_norm_backward(dy, cache)``.

    This is the vector-Jacobian product of the backward pass, what PyTorch's autograd gives for
    ``torch.autograd.grad((dx, dgamma, dbeta), (x, gamma, dy), (ddx, ddgamma, ddbeta))`` after
    a first ``grad(..., create_graph=True)``.

    Parameters
    ----------
    cache : BatchNormCache
        From :func:`batchnorm.batch_norm_train` (batch statistics: the second derivative
        through the mean and variance is included) or :func:`batchnorm.batch_norm_inference`
        with ``return_cache=True`` (fixed statistics), any layout and axis.
    dy : ndarray, same shape as the forward input
        The gradient that was (or would be) passed to ``batch_norm_backward``.
    ddx : ndarray, same shape as the forward input
        Weights on ``dx`` (the gradient of the outer loss with respect to ``dx``).
    ddgamma : ndarray of shape (C,) or None
        Weights on ``dgamma``; None for 0. Must be None when the forward had no `gamma`.
    ddbeta : ndarray of shape (C,) or None
        Weights on ``dbeta = sum(dy)`` (over every axis but the feature axis); None for 0.

    Returns
    -------
    gx : ndarray, same shape and dtype as the forward input
    ggamma : ndarray of shape (C,) or None
        None when the forward had no `gamma`.
    gdy : ndarray, same shape as the forward input, dtype of `dy`

    Raises
    ------
    TypeError
        For a `cache` that is not a BatchNormCache, or non-float arrays.
    ValueError
        For arrays of the wrong shape, `ddgamma` given for a forward without `gamma`, or a
        cache whose statistics cover more than its input (``SyncBatchNorm`` over several
        processes).

    Notes
    -----
    Per feature, with ``M`` values, ``s = 1 / sqrt(var + eps)``, ``xh = (x - mean) * s``,
    ``g = gamma`` (1 without), ``u = ddx`` and ``E[.]`` the mean over the ``M`` values.

    Training (batch statistics)::

        dx = g s (dy - E[dy] - xh E[dy xh]),  dgamma = M E[dy xh],  dbeta = M E[dy]
        K      = E[u dy] - E[u] E[dy] - E[u xh] E[dy xh]
        gdy    = g s J(u) + ddgamma xh + ddbeta
        ggamma = M s K
        gx     = s (ddgamma - g s E[u xh]) J(dy) - g s^2 E[dy xh] J(u) - g s^2 K xh

    with ``J(v) = v - E[v] - xh E[v xh]``: ``s J(v)`` is the gradient of ``sum(v * xh)``
    with respect to ``x`` (Ioffe & Szegedy's backward pass applied to ``v``).

    Inference (fixed statistics: ``dx = g s dy``, ``dgamma = sum(dy xh)``)::

        gdy = g s u + ddgamma xh + ddbeta,  ggamma = s sum(u dy),  gx = ddgamma s dy

    Computed in float64 from the cache's input and statistics.
    """
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"expected a BatchNormCache from a forward call, got {type(cache)}")
    if cache.mask is not None or cache.renorm_r is not None:
        raise ValueError(
            "expected a cache of plain batch normalization, got one from a masked or Batch "
            "Renormalization forward (their second derivatives are not implemented)"
        )
    dy = _check_full(dy, "dy", cache)
    ddx = _check_full(ddx, "ddx", cache)
    c = cache.shape[cache.axis]
    has_gamma = cache.gamma is not None
    if ddgamma is not None and not has_gamma:
        raise ValueError(
            "expected ddgamma None for a forward without gamma (it has no dgamma), got an array"
        )
    ddg = np.zeros(c) if ddgamma is None else _check_vec(ddgamma, "ddgamma", c)
    ddb = np.zeros(c) if ddbeta is None else _check_vec(ddbeta, "ddbeta", c)

    x3 = np.asarray(cache.x3, dtype=np.float64)
    m = x3.shape[0] * x3.shape[2]
    if int(cache.count) != m:
        # A SyncBatchNorm cache: its statistics cover every rank's values, its input only
        # this rank's; the second derivative would need the other ranks' sums.
        raise ValueError(
            f"expected a cache whose statistics cover its own input ({m} values per feature), "
            f"got count {cache.count} (statistics over several processes are not supported)"
        )
    s = np.asarray(cache.inv_std, dtype=np.float64)[None, :, None]
    mean = np.asarray(cache.mean, dtype=np.float64)[None, :, None]
    g = np.asarray(cache.gamma, dtype=np.float64)[None, :, None] if has_gamma else np.ones(
        (1, c, 1)
    )
    xh = (x3 - mean) * s
    dy3 = _as3(dy, cache)
    u = _as3(ddx, cache)
    ddg3 = ddg[None, :, None]
    ddb3 = ddb[None, :, None]

    def avg(v: np.ndarray) -> np.ndarray:
        # E[v] per feature, kept as (1, C, 1) for broadcasting.
        return v.sum(axis=(0, 2), keepdims=True) / max(m, 1)

    if cache.training:
        e_dy, e_u = avg(dy3), avg(u)
        e_dy_xh, e_u_xh = avg(dy3 * xh), avg(u * xh)
        k = avg(u * dy3) - e_u * e_dy - e_u_xh * e_dy_xh
        j_u = u - e_u - xh * e_u_xh
        j_dy = dy3 - e_dy - xh * e_dy_xh
        gdy = g * s * j_u + ddg3 * xh + ddb3
        ggamma = m * s * k
        gx = s * (ddg3 - g * s * e_u_xh) * j_dy - g * s * s * (e_dy_xh * j_u + k * xh)
    else:
        gdy = g * s * u + ddg3 * xh + ddb3
        ggamma = s * (u * dy3).sum(axis=(0, 2), keepdims=True)
        gx = ddg3 * s * dy3
        gx = np.broadcast_to(gx, x3.shape)

    gx_out = gx.reshape(cache.shape).astype(cache.dtype)
    gdy_out = np.broadcast_to(gdy, x3.shape).reshape(cache.shape).astype(dy.dtype)
    if not has_gamma:
        return gx_out, None, gdy_out
    gamma_dtype = getattr(cache, "gamma_dtype", None) or cache.gamma.dtype
    return gx_out, ggamma.reshape(c).astype(gamma_dtype), gdy_out
