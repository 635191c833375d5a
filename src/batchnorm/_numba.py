"""Numba backend: fused, multi-threaded passes over the ``(A, C, B)`` view.

The four primitives of :mod:`batchnorm.backends`, each one pass over the data (``affine`` and
``grad_input`` read the inputs once and write the output once; ``moments`` and ``grad_sums``
only read). There are two kernels per primitive, chosen by memory layout:

``B == 1`` ("rows": ``(N, D)`` and channels-last)
    The feature axis is contiguous. Each thread takes a block of rows of ``A`` and keeps
    partial sums of length ``C``; the inner loop runs along a row, so it is contiguous and
    vectorises, and there is no reduction inside it. The partials are merged at the end.
``B > 1`` ("planes": ``(N, C, *spatial)``)
    Each ``(a, c)`` row of ``B`` values is contiguous. The work items are the features (or
    ``(chunk of A, feature)`` pairs when there are few features, so both threads have work),
    and the inner loop reduces a contiguous row.

Exact statistics: ``moments`` never forms the unshifted ``E[x^2] - E[x]^2``. It sums
``d = x - K`` and ``d**2`` in float64 in one pass, with ``K`` the feature's first value, which
bounds the loss of precision by the number of values (see the comment above the kernels).

Elementwise passes (``affine``, ``grad_input``) stay in the dtype of the data, as in the NumPy
reference; sums are accumulated in float64 (``moments`` adds every value in float64; the row
kernel of ``grad_sums`` first adds eight rows in the data's dtype, in which the products
``dy * (x - center)`` are rounded anyway; float32 sums that overflow are computed again in
float64, as in the NumPy reference).

The kernels compile on first use with ``cache=True``, so the machine code is stored next to
this file (or in ``NUMBA_CACHE_DIR``) and a second process loads it instead of compiling. Small
inputs run on one thread: waking the thread pool costs more than the work.
"""

from __future__ import annotations

import math
import os
import threading

import numba
import numpy as np
from numba import njit, prange

from .backends import Backend

__all__ = ["NumbaBackend", "kernels"]

# Reassociation lets LLVM vectorise the float64 reductions (it may sum in another order, which
# is as exact). No "nnan"/"ninf": NaN and inf in the data must propagate as in NumPy. The
# two-pass statistics were checked with these flags on large-mean data (tests/test_numba.py).
_FM = {"reassoc", "contract", "nsz", "arcp"}

# Below this many elements a call runs on the calling thread only.
_SERIAL_BELOW = 1 << 15


@njit(cache=True)
def _split(n, parts):
    """(items per part, number of parts) for splitting ``n`` items into at most ``parts``."""
    parts = max(1, min(parts, n))
    per = max(1, (n + parts - 1) // parts)
    return per, max(1, (n + per - 1) // per)


@njit(cache=True)
def _plane_parts(a_len, c_len, nthreads):
    """Split A as well as C when there are too few features to keep every thread busy."""
    want = 1 if c_len >= 4 * nthreads else (4 * nthreads + c_len - 1) // c_len
    return _split(a_len, want)


@njit(cache=True)
def _finish(shift, s1, s2, n):
    """Mean and biased variance from the sums of ``d = x - shift`` and of ``d**2``."""
    c_len = shift.shape[0]
    mean = np.empty(c_len)
    var = np.empty(c_len)
    for c in range(c_len):
        m1 = s1[c] / n
        mean[c] = shift[c] + m1
        v = s2[c] / n - m1 * m1
        # Clamp rounding below zero, but let NaN through (a NaN test is False both ways).
        var[c] = 0.0 if v < 0.0 else v
    return mean, var


# ---------------------------------------------------------------------------------------------
# moments
#
# Every primitive has a serial "part" function (the loop over one share of the work) and two
# drivers that call it: ``*_par`` splits the work with prange, ``*_ser`` runs it all on the
# calling thread (small inputs, where waking the pool costs more than the work). The thread
# count comes from Python: numba's thread functions inside a kernel would stop it from being
# cached on disk.
#
# Statistics are shifted sums in float64: with ``d = x - K``, ``mean = K + sum(d)/n`` and
# ``var = sum(d**2)/n - (sum(d)/n)**2``. ``K`` is a value of the feature itself (its first
# one), so ``|mean - K| <= std * sqrt(n)`` and the subtraction loses at most a factor ``n`` of
# float64's precision: relative error about ``n * 1e-16`` in the worst case, and none of the
# catastrophic loss of the unshifted ``E[x^2] - E[x]^2`` (data with mean 1e4 and std 1 in
# float32 come out exact to ~1e-12). One pass, and every part uses the same ``K``, so the
# partial sums of the threads just add up. ``d`` is formed in float64, where the difference of
# two float32 values is exact. Reassociation (fastmath) may reorder the sums, which is as
# exact; it cannot expand ``d * d``.


@njit(cache=True, fastmath=_FM)
def _rows_moments_part(x, shift, a0, a1, s1, s2):
    """Add the shifted sums of rows ``a0:a1`` of ``x`` (A, C) into ``s1``, ``s2``."""
    c_len = x.shape[1]
    a = a0
    # Eight rows per sweep: the partial sums are loaded and stored once per eight values
    # (every value is still added in float64).
    while a + 8 <= a1:
        r0 = x[a]
        r1 = x[a + 1]
        r2 = x[a + 2]
        r3 = x[a + 3]
        r4 = x[a + 4]
        r5 = x[a + 5]
        r6 = x[a + 6]
        r7 = x[a + 7]
        for c in range(c_len):
            k = shift[c]
            d0 = r0[c] - k
            d1 = r1[c] - k
            d2 = r2[c] - k
            d3 = r3[c] - k
            d4 = r4[c] - k
            d5 = r5[c] - k
            d6 = r6[c] - k
            d7 = r7[c] - k
            s1[c] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            s2[c] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + (
                (d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)
            )
        a += 8
    while a < a1:
        r0 = x[a]
        for c in range(c_len):
            d0 = r0[c] - shift[c]
            s1[c] += d0
            s2[c] += d0 * d0
        a += 1


@njit(cache=True, parallel=True)
def _rows_moments_par(x, nthreads):
    a_len, c_len = x.shape
    shift = x[0].astype(np.float64)
    per, parts = _split(a_len, nthreads)
    s1 = np.zeros((parts, c_len))
    s2 = np.zeros((parts, c_len))
    for k in prange(parts):
        _rows_moments_part(x, shift, k * per, min(a_len, (k + 1) * per), s1[k], s2[k])
    for k in range(1, parts):
        s1[0] += s1[k]
        s2[0] += s2[k]
    return _finish(shift, s1[0], s2[0], float(a_len))


@njit(cache=True)
def _rows_moments_ser(x):
    c_len = x.shape[1]
    shift = x[0].astype(np.float64)
    s1 = np.zeros(c_len)
    s2 = np.zeros(c_len)
    _rows_moments_part(x, shift, 0, x.shape[0], s1, s2)
    return _finish(shift, s1, s2, float(x.shape[0]))


@njit(cache=True, fastmath=_FM)
def _planes_moments_part(x, c, k, a0, a1):
    """Shifted sums of feature ``c`` over the contiguous rows ``x[a0:a1, c]``."""
    b_len = x.shape[2]
    t1 = 0.0
    t2 = 0.0
    for a in range(a0, a1):
        row = x[a, c]
        for b in range(b_len):
            d = row[b] - k
            t1 += d
            t2 += d * d
    return t1, t2


@njit(cache=True, parallel=True)
def _planes_moments_par(x, nthreads):
    a_len, c_len, b_len = x.shape
    shift = x[0, :, 0].astype(np.float64)
    per, parts = _plane_parts(a_len, c_len, nthreads)
    s1 = np.empty((parts, c_len))
    s2 = np.empty((parts, c_len))
    for u in prange(parts * c_len):
        k = u // c_len
        c = u - k * c_len
        a1 = min(a_len, (k + 1) * per)
        s1[k, c], s2[k, c] = _planes_moments_part(x, c, shift[c], k * per, a1)
    for k in range(1, parts):
        s1[0] += s1[k]
        s2[0] += s2[k]
    return _finish(shift, s1[0], s2[0], float(a_len * b_len))


@njit(cache=True)
def _planes_moments_ser(x):
    a_len, c_len, b_len = x.shape
    shift = x[0, :, 0].astype(np.float64)
    s1 = np.empty(c_len)
    s2 = np.empty(c_len)
    for c in range(c_len):
        s1[c], s2[c] = _planes_moments_part(x, c, shift[c], 0, a_len)
    return _finish(shift, s1, s2, float(a_len * b_len))


# ---------------------------------------------------------------------------------------------
# affine: y = (x - center) * scale + shift (rows a0:a1, or (a, c) rows u0:u1 of the planes)


@njit(cache=True, fastmath=_FM)
def _rows_affine_part(x, center, scale, shift, y, a0, a1, relu):
    """``y = (x - center) * scale + shift``, or ``relu`` of it (NaN stays NaN, as in PyTorch)."""
    c_len = x.shape[1]
    z = y.dtype.type(0)
    for a in range(a0, a1):
        xr = x[a]
        yr = y[a]
        if relu:
            for c in range(c_len):
                v = (xr[c] - center[c]) * scale[c] + shift[c]
                yr[c] = z if v <= z else v
        else:
            for c in range(c_len):
                yr[c] = (xr[c] - center[c]) * scale[c] + shift[c]


@njit(cache=True, fastmath=_FM)
def _planes_affine_part(x, center, scale, shift, y, u0, u1, relu):
    c_len, b_len = x.shape[1], x.shape[2]
    z = y.dtype.type(0)
    a = u0 // c_len
    c = u0 - a * c_len
    for _ in range(u0, u1):  # (a, c) steps through u0:u1 without a division per row
        xr = x[a, c]
        yr = y[a, c]
        m = center[c]
        s = scale[c]
        t = shift[c]
        if relu:
            for b in range(b_len):
                v = (xr[b] - m) * s + t
                yr[b] = z if v <= z else v
        else:
            for b in range(b_len):
                yr[b] = (xr[b] - m) * s + t
        c += 1
        if c == c_len:
            c = 0
            a += 1


@njit(cache=True, parallel=True)
def _rows_affine_par(x, center, scale, shift, y, nthreads, relu):
    per, parts = _split(x.shape[0], nthreads)
    for k in prange(parts):
        a1 = min(x.shape[0], (k + 1) * per)
        _rows_affine_part(x, center, scale, shift, y, k * per, a1, relu)


@njit(cache=True)
def _rows_affine_ser(x, center, scale, shift, y, relu):
    _rows_affine_part(x, center, scale, shift, y, 0, x.shape[0], relu)


@njit(cache=True, parallel=True)
def _planes_affine_par(x, center, scale, shift, y, nthreads, relu):
    n = x.shape[0] * x.shape[1]
    per, parts = _split(n, nthreads)
    for k in prange(parts):
        _planes_affine_part(x, center, scale, shift, y, k * per, min(n, (k + 1) * per), relu)


@njit(cache=True)
def _planes_affine_ser(x, center, scale, shift, y, relu):
    _planes_affine_part(x, center, scale, shift, y, 0, x.shape[0] * x.shape[1], relu)


# ---------------------------------------------------------------------------------------------
# normalize (small inputs): the per-feature coefficients of functional.normalize_with_stats and
# the affine pass in one compiled call. On a small input the dozen tiny NumPy operations of the
# coefficients cost more than the pass itself.


@njit(cache=True)
def _coefs(mean, var, gamma, beta, eps, center, scale, shift, inv_std):
    """The float64 operations of ``normalize_with_stats``, in its order (no fastmath: the
    results are bit for bit NumPy's). ``gamma`` / ``beta`` may be None."""
    for c in range(mean.shape[0]):
        m = np.float64(mean[c])
        s = 1.0 / np.sqrt(np.float64(var[c]) + eps)
        g = s if gamma is None else s * np.float64(gamma[c])
        center[c] = m  # rounds to the data's dtype
        t = -((m - np.float64(center[c])) * g)
        if beta is not None:
            t += np.float64(beta[c])
        scale[c] = g
        shift[c] = t
        inv_std[c] = s


@njit(cache=True)
def _rows_normalize_ser(x, mean, var, gamma, beta, eps, y, center, inv_std, relu):
    c_len = x.shape[1]
    scale = np.empty(c_len, x.dtype)
    shift = np.empty(c_len, x.dtype)
    _coefs(mean, var, gamma, beta, eps, center, scale, shift, inv_std)
    _rows_affine_part(x, center, scale, shift, y, 0, x.shape[0], relu)


@njit(cache=True)
def _planes_normalize_ser(x, mean, var, gamma, beta, eps, y, center, inv_std, relu):
    c_len = x.shape[1]
    scale = np.empty(c_len, x.dtype)
    shift = np.empty(c_len, x.dtype)
    _coefs(mean, var, gamma, beta, eps, center, scale, shift, inv_std)
    _planes_affine_part(x, center, scale, shift, y, 0, x.shape[0] * x.shape[1], relu)


def _rows_normalize_par(x, mean, var, gamma, beta, eps, y, center, inv_std, nthreads, relu):
    """The coefficients, then the multi-threaded pass (large inputs: two calls cost nothing)."""
    scale = np.empty(x.shape[1], x.dtype)
    shift = np.empty(x.shape[1], x.dtype)
    _coefs(mean, var, gamma, beta, eps, center, scale, shift, inv_std)
    _rows_affine_par(x, center, scale, shift, y, nthreads, relu)


def _planes_normalize_par(x, mean, var, gamma, beta, eps, y, center, inv_std, nthreads, relu):
    scale = np.empty(x.shape[1], x.dtype)
    shift = np.empty(x.shape[1], x.dtype)
    _coefs(mean, var, gamma, beta, eps, center, scale, shift, inv_std)
    _planes_affine_par(x, center, scale, shift, y, nthreads, relu)


# ---------------------------------------------------------------------------------------------
# grad_sums: sum(dy), sum(dy * (x - center)), accumulated in float64


@njit(cache=True, fastmath=_FM)
def _rows_grad_sums_part(dy, x, center, a0, a1, sdy, sdx, t1, t2):
    """Add the sums of rows ``a0:a1`` into ``sdy``, ``sdx`` (float64).

    Eight rows at a time are first summed in the data's dtype (in ``t1``, ``t2``), then added
    to the float64 sums: the products ``dy * (x - center)`` are rounded to that dtype anyway,
    and a sum of eight of them adds rounding of the same order,
    while converting each value to float64 would cost more than the pass reads.
    """
    c_len = x.shape[1]
    a = a0
    while a + 8 <= a1:
        g0 = dy[a]
        g1 = dy[a + 1]
        g2 = dy[a + 2]
        g3 = dy[a + 3]
        x0 = x[a]
        x1 = x[a + 1]
        x2 = x[a + 2]
        x3 = x[a + 3]
        for c in range(c_len):
            m = center[c]
            t1[c] = (g0[c] + g1[c]) + (g2[c] + g3[c])
            t2[c] = (g0[c] * (x0[c] - m) + g1[c] * (x1[c] - m)) + (
                g2[c] * (x2[c] - m) + g3[c] * (x3[c] - m)
            )
        g0 = dy[a + 4]
        g1 = dy[a + 5]
        g2 = dy[a + 6]
        g3 = dy[a + 7]
        x0 = x[a + 4]
        x1 = x[a + 5]
        x2 = x[a + 6]
        x3 = x[a + 7]
        for c in range(c_len):
            m = center[c]
            u1 = t1[c] + ((g0[c] + g1[c]) + (g2[c] + g3[c]))
            u2 = t2[c] + (
                (g0[c] * (x0[c] - m) + g1[c] * (x1[c] - m))
                + (g2[c] * (x2[c] - m) + g3[c] * (x3[c] - m))
            )
            sdy[c] += u1
            sdx[c] += u2
        a += 8
    while a < a1:
        g0 = dy[a]
        x0 = x[a]
        for c in range(c_len):
            sdy[c] += g0[c]
            sdx[c] += g0[c] * (x0[c] - center[c])
        a += 1


@njit(cache=True, fastmath=_FM)
def _rows_grad_sums_mpart(dy, x, ym, center, a0, a1, sdy, sdx, t1, t2):
    """:func:`_rows_grad_sums_part` of the masked ``dy * (ym > 0)`` (the gradient through a
    ReLU whose output is ``ym``; 0 where ``ym`` is 0 or NaN), four rows at a time."""
    c_len = x.shape[1]
    z = dy.dtype.type(0)
    a = a0
    while a + 4 <= a1:
        g0 = dy[a]
        g1 = dy[a + 1]
        g2 = dy[a + 2]
        g3 = dy[a + 3]
        x0 = x[a]
        x1 = x[a + 1]
        x2 = x[a + 2]
        x3 = x[a + 3]
        y0 = ym[a]
        y1 = ym[a + 1]
        y2 = ym[a + 2]
        y3 = ym[a + 3]
        for c in range(c_len):
            m = center[c]
            d0 = g0[c] if y0[c] > z else z
            d1 = g1[c] if y1[c] > z else z
            d2 = g2[c] if y2[c] > z else z
            d3 = g3[c] if y3[c] > z else z
            t1[c] = (d0 + d1) + (d2 + d3)
            t2[c] = (d0 * (x0[c] - m) + d1 * (x1[c] - m)) + (d2 * (x2[c] - m) + d3 * (x3[c] - m))
        for c in range(c_len):
            sdy[c] += t1[c]
            sdx[c] += t2[c]
        a += 4
    while a < a1:
        g0 = dy[a]
        x0 = x[a]
        y0 = ym[a]
        for c in range(c_len):
            d0 = g0[c] if y0[c] > z else z
            sdy[c] += d0
            sdx[c] += d0 * (x0[c] - center[c])
        a += 1


@njit(cache=True, parallel=True)
def _rows_grad_sums_par(dy, x, center, nthreads, ym):
    a_len, c_len = x.shape
    per, parts = _split(a_len, nthreads)
    sdy = np.zeros((parts, c_len))
    sdx = np.zeros((parts, c_len))
    for k in prange(parts):
        t1 = np.empty(c_len, x.dtype)
        t2 = np.empty(c_len, x.dtype)
        a1 = min(a_len, (k + 1) * per)
        if ym is None:
            _rows_grad_sums_part(dy, x, center, k * per, a1, sdy[k], sdx[k], t1, t2)
        else:
            _rows_grad_sums_mpart(dy, x, ym, center, k * per, a1, sdy[k], sdx[k], t1, t2)
    for k in range(1, parts):
        sdy[0] += sdy[k]
        sdx[0] += sdx[k]
    return sdy[0].copy(), sdx[0].copy()


@njit(cache=True)
def _rows_grad_sums_ser(dy, x, center, ym):
    c_len = x.shape[1]
    sdy = np.zeros(c_len)
    sdx = np.zeros(c_len)
    t1 = np.empty(c_len, x.dtype)
    t2 = np.empty(c_len, x.dtype)
    if ym is None:
        _rows_grad_sums_part(dy, x, center, 0, x.shape[0], sdy, sdx, t1, t2)
    else:
        _rows_grad_sums_mpart(dy, x, ym, center, 0, x.shape[0], sdy, sdx, t1, t2)
    return sdy, sdx


@njit(cache=True, fastmath=_FM)
def _planes_grad_sums_part(dy, x, center, c, a0, a1):
    b_len = x.shape[2]
    m = center[c]
    t1 = 0.0
    t2 = 0.0
    for a in range(a0, a1):
        g = dy[a, c]
        xr = x[a, c]
        for b in range(b_len):
            t1 += g[b]
            t2 += g[b] * (xr[b] - m)
    return t1, t2


@njit(cache=True, fastmath=_FM)
def _planes_grad_sums_mpart(dy, x, ym, center, c, a0, a1):
    """:func:`_planes_grad_sums_part` of the masked ``dy * (ym > 0)``."""
    b_len = x.shape[2]
    m = center[c]
    z = dy.dtype.type(0)
    t1 = 0.0
    t2 = 0.0
    for a in range(a0, a1):
        g = dy[a, c]
        xr = x[a, c]
        yr = ym[a, c]
        for b in range(b_len):
            d = g[b] if yr[b] > z else z
            t1 += d
            t2 += d * (xr[b] - m)
    return t1, t2


@njit(cache=True)
def _planes_grad_sums_any(dy, x, center, c, a0, a1, ym):
    if ym is None:
        return _planes_grad_sums_part(dy, x, center, c, a0, a1)
    return _planes_grad_sums_mpart(dy, x, ym, center, c, a0, a1)


@njit(cache=True, parallel=True)
def _planes_grad_sums_par(dy, x, center, nthreads, ym):
    a_len, c_len, b_len = x.shape
    per, parts = _plane_parts(a_len, c_len, nthreads)
    sdy = np.empty((parts, c_len))
    sdx = np.empty((parts, c_len))
    for u in prange(parts * c_len):
        k = u // c_len
        c = u - k * c_len
        a1 = min(a_len, (k + 1) * per)
        sdy[k, c], sdx[k, c] = _planes_grad_sums_any(dy, x, center, c, k * per, a1, ym)
    for k in range(1, parts):
        sdy[0] += sdy[k]
        sdx[0] += sdx[k]
    return sdy[0].copy(), sdx[0].copy()


@njit(cache=True)
def _planes_grad_sums_ser(dy, x, center, ym):
    c_len = x.shape[1]
    sdy = np.empty(c_len)
    sdx = np.empty(c_len)
    for c in range(c_len):
        sdy[c], sdx[c] = _planes_grad_sums_any(dy, x, center, c, 0, x.shape[0], ym)
    return sdy, sdx


# ---------------------------------------------------------------------------------------------
# grad_input: dx = p * dy + q * (x - center) + r


@njit(cache=True, fastmath=_FM)
def _rows_grad_input_part(dy, x, center, p, q, r, dx, a0, a1, ym):
    """``dx = p * dy + q * (x - center) + r``, with ``dy`` masked by ``ym > 0`` unless ``ym``
    is None."""
    c_len = x.shape[1]
    z = dy.dtype.type(0)
    for a in range(a0, a1):
        g = dy[a]
        xr = x[a]
        out = dx[a]
        if ym is None:
            for c in range(c_len):
                out[c] = p[c] * g[c] + q[c] * (xr[c] - center[c]) + r[c]
        else:
            yr = ym[a]
            for c in range(c_len):
                gm = g[c] if yr[c] > z else z
                out[c] = p[c] * gm + q[c] * (xr[c] - center[c]) + r[c]


@njit(cache=True, fastmath=_FM)
def _planes_grad_input_part(dy, x, center, p, q, r, dx, u0, u1, ym):
    c_len, b_len = x.shape[1], x.shape[2]
    z = dy.dtype.type(0)
    a = u0 // c_len
    c = u0 - a * c_len
    for _ in range(u0, u1):
        g = dy[a, c]
        xr = x[a, c]
        out = dx[a, c]
        m = center[c]
        pc = p[c]
        qc = q[c]
        rc = r[c]
        if ym is None:
            for b in range(b_len):
                out[b] = pc * g[b] + qc * (xr[b] - m) + rc
        else:
            yr = ym[a, c]
            for b in range(b_len):
                gm = g[b] if yr[b] > z else z
                out[b] = pc * gm + qc * (xr[b] - m) + rc
        c += 1
        if c == c_len:
            c = 0
            a += 1


@njit(cache=True, parallel=True)
def _rows_grad_input_par(dy, x, center, p, q, r, dx, nthreads, ym):
    per, parts = _split(x.shape[0], nthreads)
    for k in prange(parts):
        a1 = min(x.shape[0], (k + 1) * per)
        _rows_grad_input_part(dy, x, center, p, q, r, dx, k * per, a1, ym)


@njit(cache=True)
def _rows_grad_input_ser(dy, x, center, p, q, r, dx, ym):
    _rows_grad_input_part(dy, x, center, p, q, r, dx, 0, x.shape[0], ym)


@njit(cache=True, parallel=True)
def _planes_grad_input_par(dy, x, center, p, q, r, dx, nthreads, ym):
    n = x.shape[0] * x.shape[1]
    per, parts = _split(n, nthreads)
    for k in prange(parts):
        a1 = min(n, (k + 1) * per)
        _planes_grad_input_part(dy, x, center, p, q, r, dx, k * per, a1, ym)


@njit(cache=True)
def _planes_grad_input_ser(dy, x, center, p, q, r, dx, ym):
    _planes_grad_input_part(dy, x, center, p, q, r, dx, 0, x.shape[0] * x.shape[1], ym)


# ---------------------------------------------------------------------------------------------
# fused small-input steps: a whole local training forward (moments, coefficients, affine) or a
# whole backward (sums, parameter gradients, coefficients, dx) in one serial compiled call. On a
# small input, the calls and per-feature NumPy operations between the passes cost more than the
# passes themselves.


@njit(cache=True)
def _all_finite(mean, var):
    for c in range(mean.shape[0]):
        if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            return False
    return True


@njit(cache=True)
def _rows_train_ser(x, gamma, beta, eps, y, center, inv_std, relu):
    mean, var = _rows_moments_ser(x)
    c_len = x.shape[1]
    scale = np.empty(c_len, x.dtype)
    shift = np.empty(c_len, x.dtype)
    _coefs(mean, var, gamma, beta, eps, center, scale, shift, inv_std)
    _rows_affine_part(x, center, scale, shift, y, 0, x.shape[0], relu)
    return mean, var, _all_finite(mean, var)


@njit(cache=True)
def _planes_train_ser(x, gamma, beta, eps, y, center, inv_std, relu):
    mean, var = _planes_moments_ser(x)
    c_len = x.shape[1]
    scale = np.empty(c_len, x.dtype)
    shift = np.empty(c_len, x.dtype)
    _coefs(mean, var, gamma, beta, eps, center, scale, shift, inv_std)
    _planes_affine_part(x, center, scale, shift, y, 0, x.shape[0] * x.shape[1], relu)
    return mean, var, _all_finite(mean, var)


@njit(cache=True)
def _backward_coefs(sdy, sdx, center, mean, inv_std, gamma, count, training, p, q, r, dgamma):
    """The float64 operations of ``functional.param_grads`` and ``functional.input_grad``, in
    their order (no fastmath)."""
    for c in range(mean.shape[0]):
        lo = mean[c] - np.float64(center[c])
        dg = inv_std[c] * (sdx[c] - lo * sdy[c])
        dgamma[c] = dg
        k = inv_std[c] * np.float64(gamma[c])
        p[c] = k
        if training:
            qc = -k * inv_std[c] * dg / count
            q[c] = qc
            r[c] = -k * sdy[c] / count - qc * lo
        else:
            q[c] = 0.0
            r[c] = 0.0


@njit(cache=True)
def _rows_backward_ser(dy, x, center, mean, inv_std, gamma, count, training, dx, dgamma, ym):
    sdy, sdx = _rows_grad_sums_ser(dy, x, center, ym)
    c_len = x.shape[1]
    p = np.empty(c_len, x.dtype)
    q = np.empty(c_len, x.dtype)
    r = np.empty(c_len, x.dtype)
    _backward_coefs(sdy, sdx, center, mean, inv_std, gamma, count, training, p, q, r, dgamma)
    _rows_grad_input_part(dy, x, center, p, q, r, dx, 0, x.shape[0], ym)
    return sdy


@njit(cache=True)
def _planes_backward_ser(
    dy, x, center, mean, inv_std, gamma, count, training, dx, dgamma, ym
):
    sdy, sdx = _planes_grad_sums_ser(dy, x, center, ym)
    c_len = x.shape[1]
    p = np.empty(c_len, x.dtype)
    q = np.empty(c_len, x.dtype)
    r = np.empty(c_len, x.dtype)
    _backward_coefs(sdy, sdx, center, mean, inv_std, gamma, count, training, p, q, r, dgamma)
    _planes_grad_input_part(dy, x, center, p, q, r, dx, 0, x.shape[0] * x.shape[1], ym)
    return sdy


@njit(cache=True)
def _running_update(rm, rv, mean, var, count, w_new, unbiased, new_m, new_v):
    """The float64 operations of ``functional.update_running_stats``, in its order; True when
    the new statistics are finite in their dtype."""
    w_old = 1.0 - w_new
    d = max(count - 1.0, 1.0)
    for c in range(mean.shape[0]):
        v = var[c] * count / d if unbiased else var[c]
        new_m[c] = np.float64(rm[c]) * w_old + w_new * mean[c]
        new_v[c] = np.float64(rv[c]) * w_old + w_new * v
    return _all_finite(new_m, new_v)


@njit(cache=True)
def _copy_ser(src, dst):
    dst[:] = src


@njit(cache=True, parallel=True)
def _copy_par(src, dst, nthreads):
    """``dst[:] = src`` for flat contiguous arrays, in `nthreads` parts: each thread also
    first-touches its part of the fresh destination."""
    per, parts = _split(src.shape[0], nthreads)
    for k in prange(parts):
        dst[k * per : min(src.shape[0], (k + 1) * per)] = src[
            k * per : min(src.shape[0], (k + 1) * per)
        ]


kernels = (
    _rows_moments_par,
    _rows_moments_ser,
    _planes_moments_par,
    _planes_moments_ser,
    _rows_affine_par,
    _rows_affine_ser,
    _planes_affine_par,
    _planes_affine_ser,
    _coefs,
    _rows_normalize_ser,
    _planes_normalize_ser,
    _rows_grad_sums_par,
    _rows_grad_sums_ser,
    _planes_grad_sums_par,
    _planes_grad_sums_ser,
    _rows_grad_input_par,
    _rows_grad_input_ser,
    _planes_grad_input_par,
    _planes_grad_input_ser,
    _rows_train_ser,
    _planes_train_ser,
    _rows_backward_ser,
    _planes_backward_ser,
    _running_update,
    _copy_ser,
    _copy_par,
)
"""The compiled entry points (for ``batchnorm info`` and the cache test)."""


# ---------------------------------------------------------------------------------------------
# the backend


def _data(x3: np.ndarray) -> np.ndarray:
    if x3.dtype.type not in _VEC_TYPES or not x3.dtype.isnative:
        raise TypeError(f"the numba backend takes float32 or float64 data, got {x3.dtype}")
    # Copies only what is not C-contiguous (Fortran order, strided slices, broadcasts): the
    # kernels index rows directly, and one layout per dtype keeps the compiled set small.
    return x3 if x3.flags.c_contiguous else np.ascontiguousarray(x3)


# Checked by scalar type (and native byte order): `dtype in tuple` compares dtypes with ==,
# which costs more than the whole check on the small inputs where it matters.
_VEC_TYPES = (np.float32, np.float64)


def _vec(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=dtype)


def _new(x3: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """A new output like `x3`, or `out`: a C-contiguous array of x3's shape and dtype that the
    caller checked (it shares no memory with the inputs)."""
    return np.empty_like(x3) if out is None else out


def _mask(mask: np.ndarray | None, x3: np.ndarray) -> np.ndarray | None:
    """The ReLU output that masks ``dy`` (in x3's dtype and layout), or None."""
    if mask is None:
        return None
    return _data(mask if mask.dtype is x3.dtype else mask.astype(x3.dtype))


# ---------------------------------------------------------------------------------------------
# choosing the serial or the parallel driver: threads and fork
#
# numba's threading layers differ in what they survive (numba's "threading layer" docs):
# workqueue aborts the process ("Concurrent access has been detected") when two Python
# threads run parallel kernels at once; GNU OpenMP ("omp" on Linux) kills a forked child that
# starts a parallel region ("fork() called from a process already using GNU OpenMP"), and a
# child forked by multiprocessing then leaves its parent waiting forever. So:
#
# * one parallel kernel at a time per process: the caller that gets ``_POOL`` runs the
#   parallel driver, any other thread runs the serial one at the same time instead of waiting
#   (which also keeps two thread teams from fighting over the cores under omp and tbb);
# * a forked child runs the serial drivers only, whatever the layer: they never touch it.
#
# Every call of a parallel driver goes through ``_run``; a new pair of drivers must too (the
# fused small-input steps are serial only).

_POOL = threading.Lock()
_serial_after_fork = False


def _threads(size: int) -> int:
    """Threads wanted for a call on ``size`` elements; 1 means the serial driver.

    The one policy for all drivers (tests replace this function to force the serial drivers,
    or a split into a given number of parts, on any input size).
    """
    if size < _SERIAL_BELOW or _serial_after_fork:
        return 1
    return numba.get_num_threads()


def _run(size: int, ser, par, *args, after: tuple = ()):
    """``ser(*args, *after)``, or ``par(*args, nthreads, *after)`` when :func:`_threads` wants
    several threads and no other thread of this process is in a parallel driver (see the
    comment above)."""
    nthreads = _threads(size)
    if nthreads > 1 and _POOL.acquire(blocking=False):
        try:
            return par(*args, nthreads, *after)
        finally:
            _POOL.release()
    return ser(*args, *after)


def _after_fork_in_child() -> None:
    global _POOL, _serial_after_fork
    _serial_after_fork = True
    # The thread that held the lock in the parent does not exist in the child.
    _POOL = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


class NumbaBackend(Backend):
    """Fused, multi-threaded numba kernels (see the module docstring).

    Threads: ``numba.set_num_threads`` or the environment variable ``NUMBA_NUM_THREADS``.
    Calls from several Python threads at once are safe under every threading layer, and a
    forked child process runs the serial kernels (see :func:`_run`).
    Outputs are allocated by NumPy, not inside the kernels: NumPy asks Linux for transparent
    huge pages on large arrays, which makes first-touching a fresh output several times
    cheaper (benchmarks/README.md has the numbers).
    """

    name = "numba"

    def moments(self, x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x3 = _data(x3)
        a_len, c_len, b_len = x3.shape
        if x3.size == 0:
            raise ValueError(f"expected at least one value per feature, got shape {x3.shape}")
        if b_len == 1:
            x2 = x3.reshape(a_len, c_len)
            return _run(x3.size, _rows_moments_ser, _rows_moments_par, x2)
        return _run(x3.size, _planes_moments_ser, _planes_moments_par, x3)

    def affine(
        self,
        x3: np.ndarray,
        center: np.ndarray,
        scale: np.ndarray,
        shift: np.ndarray,
        *,
        relu: bool = False,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        x3 = _data(x3)
        y = _new(x3, out)
        if x3.size == 0:
            return y
        dt = x3.dtype
        args = (_vec(center, dt), _vec(scale, dt), _vec(shift, dt))
        after = (bool(relu),)
        a_len, c_len, b_len = x3.shape
        if b_len == 1:
            x2, y2 = x3.reshape(a_len, c_len), y.reshape(a_len, c_len)
            _run(x3.size, _rows_affine_ser, _rows_affine_par, x2, *args, y2, after=after)
        else:
            _run(x3.size, _planes_affine_ser, _planes_affine_par, x3, *args, y, after=after)
        return y

    def normalize(
        self,
        x3: np.ndarray,
        mean: np.ndarray,
        var: np.ndarray,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
        eps: float,
        *,
        relu: bool = False,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``functional.normalize_with_stats`` in compiled code: the per-feature coefficients
        and the ``affine`` pass (small inputs: one call for both).

        Returns ``(y3, center, inv_std)``, bit for bit what the generic code gives, or None
        where it does not apply (empty input, float16 or non-array vectors): the caller then
        does the generic computation.
        """
        if x3.size == 0:
            return None
        vecs = (mean, var, gamma, beta)
        for v in vecs:
            if v is not None and not _vec_ok(v):
                return None
        x3 = _data(x3)
        y = _new(x3, out)
        relu = bool(relu)
        a_len, c_len, b_len = x3.shape
        # Allocated here: handing new arrays back from a compiled call costs more.
        center = np.empty(c_len, x3.dtype)
        inv_std = np.empty(c_len)
        if b_len == 1:
            x2, y2 = x3.reshape(a_len, c_len), y.reshape(a_len, c_len)
            args = (x2, *vecs, float(eps), y2, center, inv_std)
            _run(x3.size, _rows_normalize_ser, _rows_normalize_par, *args, after=(relu,))
        else:
            args = (x3, *vecs, float(eps), y, center, inv_std)
            _run(x3.size, _planes_normalize_ser, _planes_normalize_par, *args, after=(relu,))
        return y, center, inv_std

    def grad_sums(
        self,
        dy3: np.ndarray,
        x3: np.ndarray,
        center: np.ndarray,
        *,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        x3 = _data(x3)
        dy3 = _data(dy3.astype(x3.dtype, copy=False))
        a_len, c_len, b_len = x3.shape
        if x3.size == 0:
            return np.zeros(c_len), np.zeros(c_len)
        ym = _mask(mask, x3)
        cen = _vec(center, x3.dtype)
        if b_len == 1:
            shape = (a_len, c_len)
            ym = None if ym is None else ym.reshape(shape)
            args = (dy3.reshape(shape), x3.reshape(shape), cen)
            sdy, sdx = _run(x3.size, _rows_grad_sums_ser, _rows_grad_sums_par, *args,
                            after=(ym,))
        else:
            args = (dy3, x3, cen)
            sdy, sdx = _run(x3.size, _planes_grad_sums_ser, _planes_grad_sums_par, *args,
                            after=(ym,))
        if x3.dtype == np.float32 and not math.isfinite(np.dot(sdy, sdx)):
            # The float32 products dy * (x - center) overflow above 3.4e38 where the sums may
            # be finite: once more in float64 (NaN or Inf in the data come out as before). The
            # dot product of the sums is finite only if all of them are (or it overflows, which
            # costs only the redo); one cheap test.
            x64, dy64 = x3.astype(np.float64), dy3.astype(np.float64)
            return self.grad_sums(dy64, x64, center, mask=mask)
        return sdy, sdx

    def grad_input(
        self,
        dy3: np.ndarray,
        x3: np.ndarray,
        center: np.ndarray,
        p: np.ndarray,
        q: np.ndarray,
        r: np.ndarray,
        *,
        mask: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        x3 = _data(x3)
        dy3 = _data(dy3.astype(x3.dtype, copy=False))
        dx = _new(x3, out)
        if x3.size == 0:
            return dx
        ym = _mask(mask, x3)
        dt = x3.dtype
        vecs = (_vec(center, dt), _vec(p, dt), _vec(q, dt), _vec(r, dt))
        a_len, c_len, b_len = x3.shape
        if b_len == 1:
            shape = (a_len, c_len)
            ym = None if ym is None else ym.reshape(shape)
            args = (dy3.reshape(shape), x3.reshape(shape), *vecs, dx.reshape(shape))
            _run(x3.size, _rows_grad_input_ser, _rows_grad_input_par, *args, after=(ym,))
        else:
            args = (dy3, x3, *vecs, dx)
            _run(x3.size, _planes_grad_input_ser, _planes_grad_input_par, *args, after=(ym,))
        return dx

    def train_forward(
        self,
        x3: np.ndarray,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
        eps: float,
        *,
        relu: bool = False,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool] | None:
        """``moments`` and ``normalize`` in one serial call, for small inputs (None for the
        others, and for float16 or non-array vectors)."""
        size = x3.size
        if size == 0 or size >= _SERIAL_BELOW or not (
            _vec_ok(gamma) and _vec_ok(beta)
        ):
            return None
        x3 = _data(x3)
        a_len, c_len, b_len = x3.shape
        dt = x3.dtype
        # Ones and zeros give the same values as no scale or shift, with half the compiled
        # variants.
        gamma = np.ones(c_len, dt) if gamma is None else gamma
        beta = np.zeros(c_len, dt) if beta is None else beta
        y = _new(x3, out)
        center = np.empty(c_len, dt)
        inv_std = np.empty(c_len)
        relu = bool(relu)
        if b_len == 1:
            mean, var, finite = _rows_train_ser(
                x3.reshape(a_len, c_len), gamma, beta, float(eps), y.reshape(a_len, c_len),
                center, inv_std, relu,
            )
        else:
            mean, var, finite = _planes_train_ser(
                x3, gamma, beta, float(eps), y, center, inv_std, relu
            )
        return y, mean, var, center, inv_std, finite

    def backward(
        self,
        dy3: np.ndarray,
        x3: np.ndarray,
        center: np.ndarray,
        mean: np.ndarray,
        inv_std: np.ndarray,
        gamma: np.ndarray | None,
        count: int,
        training: bool,
        *,
        mask: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``grad_sums``, the parameter gradients and ``grad_input`` in one serial call, for
        small inputs (None for the others)."""
        size = x3.size
        if size == 0 or size >= _SERIAL_BELOW or not _vec_ok(gamma):
            return None
        x3 = _data(x3)
        dt = x3.dtype
        dy3 = _data(dy3 if dy3.dtype is dt else dy3.astype(dt))
        ym = _mask(mask, x3)
        a_len, c_len, b_len = x3.shape
        gamma = np.ones(c_len, dt) if gamma is None else gamma
        dx = _new(x3, out)
        dgamma = np.empty(c_len)
        args = (center, mean, inv_std, gamma, float(count), bool(training))
        if b_len == 1:
            shape = (a_len, c_len)
            ym = None if ym is None else ym.reshape(shape)
            dbeta = _rows_backward_ser(
                dy3.reshape(shape), x3.reshape(shape), *args, dx.reshape(shape), dgamma, ym
            )
        else:
            dbeta = _planes_backward_ser(dy3, x3, *args, dx, dgamma, ym)
        if dt == np.float32 and not math.isfinite(np.dot(dgamma, dbeta)):
            # A float32 sum overflowed (see ``grad_sums``, which redoes it in float64) or the
            # data are not finite: the generic path gives the right result in both cases.
            return None
        return dx, dgamma, dbeta

    def running_update(
        self,
        running_mean: np.ndarray,
        running_var: np.ndarray,
        mean: np.ndarray,
        var: np.ndarray,
        count: int,
        w_new: float,
        unbiased: bool,
    ) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """``functional.update_running_stats`` in one compiled call (float32/float64 running
        statistics and float64 batch statistics; None for the others)."""
        if not (
            _vec_ok(running_mean) and _vec_ok(running_var)
            # `.type`: arrays made by compiled code carry an equal but not identical dtype
            and mean.dtype.type is np.float64 and var.dtype.type is np.float64
        ):
            return None
        new_m = np.empty_like(running_mean)
        new_v = np.empty_like(running_var)
        finite = _running_update(
            running_mean, running_var, mean, var, float(count), float(w_new), bool(unbiased),
            new_m, new_v,
        )
        return new_m, new_v, finite



    def copy(self, x3: np.ndarray) -> np.ndarray | None:
        """A private C-contiguous copy of `x3`, made by several threads where :func:`_run`
        allows (large contiguous float32/float64 inputs; None for the others)."""
        size = x3.size
        if (
            size < _SERIAL_BELOW or not x3.flags.c_contiguous
            or x3.dtype.type not in _VEC_TYPES or not x3.dtype.isnative
        ):
            return None
        out = np.empty_like(x3)
        _run(size, _copy_ser, _copy_par, x3.reshape(-1), out.reshape(-1))
        return out


def _vec_ok(v) -> bool:
    """A per-feature vector the compiled code takes: None, or a float32/float64 ndarray."""
    return v is None or (
        type(v) is np.ndarray and v.dtype.type in _VEC_TYPES and v.dtype.isnative
    )
