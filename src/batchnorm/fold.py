"""Folding batch normalization into the affine or convolution layer before it, for inference.

In inference a batch-normalization layer is a fixed affine map per feature, so it can be merged
into the weights of the layer that produces its input: the merged layer costs nothing extra.
"""

from __future__ import annotations

import numpy as np

from .checks import normalize_axis

__all__ = ["fold_batchnorm"]

_FLOATS = (np.float16, np.float32, np.float64)


def _float_array(v, name: str) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.type not in _FLOATS:
        raise TypeError(f"expected {name} of dtype float16, float32 or float64, got {v.dtype}")
    return v


def _vector(v, name: str, size: int, weight_shape: tuple[int, ...], out_axis: int) -> np.ndarray:
    v = _float_array(v, name)
    if v.shape != (size,):
        raise ValueError(
            f"expected {name} of shape ({size},) (weight.shape[{out_axis}] of weight with shape "
            f"{weight_shape}), got shape {v.shape}"
        )
    return v.astype(np.float64)


def fold_batchnorm(
    weight: np.ndarray,
    bias: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    *,
    out_axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights of one layer equal to a linear layer followed by batch norm in inference mode.

    For a layer ``z = W x + b`` with ``C`` output features and a batch norm
    ``y = gamma * (z - mean) / sqrt(var + eps) + beta`` over those features, returns ``W'``,
    ``b'`` with ``y = W' x + b'``.

    Parameters
    ----------
    weight : ndarray, any shape, with the ``C`` output features on `out_axis`
        ``(out, in)`` for PyTorch's ``Linear`` (``out_axis=0``, the default);
        ``(out, in, kh, kw)`` for a convolution (``batchnorm.nn.Conv2d`` too: ``out_axis=0``);
        ``(in, out)`` for ``batchnorm.nn.Linear`` and the book's ``Affine`` layer, which
        compute ``x @ W + b`` (``out_axis=1``).
    bias : ndarray of shape (C,) or None
        None for a layer without bias (taken as 0).
    mean, var : ndarray of shape (C,)
        The statistics batch norm normalises with in inference (its running mean and running
        variance, exactly as the layer stores and uses them).
    gamma, beta : ndarray of shape (C,) or None
        Scale and shift; None for a layer without them (1 and 0).
    eps : float
        The batch-norm layer's ``eps``.
    out_axis : int, default 0
        The axis of `weight` that indexes the output features; negative counts from the end.

    Returns
    -------
    weight : ndarray, same shape and dtype as `weight`
    bias : ndarray of shape (C,), dtype of `weight`
        Always an array: the folded layer has a bias even when the original had none.

    Raises
    ------
    TypeError
        For non-float arrays.
    ValueError
        For a 0-d `weight`, `out_axis` out of range, vectors whose size is not
        ``weight.shape[out_axis]``, a non-positive or non-finite `eps`, or ``var + eps`` not
        positive (NaN included).

    Notes
    -----
    With ``s = gamma / sqrt(var + eps)`` (per output feature, float64)::

        W' = W * s        (scaling the slice of W that produces each output feature)
        b' = (b - mean) * s + beta

    Everything is computed in float64 and rounded once to the weight's dtype. This is the
    algebra of PyTorch's ``torch.nn.utils.fusion.fuse_linear_bn_weights`` and
    ``fuse_conv_bn_weights``; PyTorch takes the layer's ``running_var`` (which it stores
    unbiased), and so does this function: pass the variance the layer normalises with.

    Examples
    --------
    >>> import numpy as np
    >>> W, b = np.ones((3, 2)), np.zeros(2)   # x @ W + b with 2 outputs: out_axis=1
    >>> mean, var = np.array([1.0, 2.0]), np.array([4.0, 1.0])
    >>> Wf, bf = fold_batchnorm(W, b, mean, var, None, None, 1e-5, out_axis=1)
    >>> x = np.ones((5, 3))
    >>> np.allclose(x @ Wf + bf, (x @ W + b - mean) / np.sqrt(var + 1e-5))
    True
    """
    w = _float_array(weight, "weight")
    if w.ndim == 0:
        raise ValueError("expected weight with at least 1 dim (the output features), got 0-D")
    ax = normalize_axis(out_axis, w.ndim)
    eps = float(eps)
    if not (eps > 0 and np.isfinite(eps)):
        raise ValueError(f"expected eps > 0, got {eps}")
    c = w.shape[ax]
    mean64 = _vector(mean, "mean", c, w.shape, out_axis)
    var64 = _vector(var, "var", c, w.shape, out_axis)
    b64 = np.zeros(c) if bias is None else _vector(bias, "bias", c, w.shape, out_axis)
    g64 = np.ones(c) if gamma is None else _vector(gamma, "gamma", c, w.shape, out_axis)
    beta64 = np.zeros(c) if beta is None else _vector(beta, "beta", c, w.shape, out_axis)
    denom = var64 + eps
    if not np.all(denom > 0):  # also False for NaN
        bad = np.flatnonzero(~(denom > 0))
        raise ValueError(
            f"expected var + eps > 0 for every feature, got {denom[bad[0]]} at feature "
            f"{bad[0]} ({bad.size} feature(s) in all)"
        )
    scale = g64 / np.sqrt(denom)
    shape = [1] * w.ndim
    shape[ax] = c
    w_folded = w.astype(np.float64) * scale.reshape(shape)
    b_folded = (b64 - mean64) * scale + beta64
    return w_folded.astype(w.dtype), b_folded.astype(w.dtype)
