"""Argument checks, in one place and one message style: ``expected ..., got ...``.

Every kernel and layer validates through these functions, so a given mistake gets the same
exception and message wherever it is made. The common cases (a float32 or float64 ndarray, an
int axis in range) are decided in a few attribute tests: layers call these on every step.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "check_bool",
    "check_dy",
    "check_eps",
    "check_input",
    "check_int",
    "check_mask",
    "check_momentum",
    "check_state_vector",
    "check_vector",
    "compute_dtype",
    "normalize_axis",
]

_FLOATS = (np.float16, np.float32, np.float64)
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_F16_COMPUTE = np.dtype(np.float32)


def compute_dtype(dtype: np.dtype, what: str = "x") -> np.dtype:
    """The dtype a kernel computes in for data of `dtype` (float16 -> float32), or a TypeError
    for a non-float dtype."""
    if dtype is _F32 or dtype is _F64:  # the usual case, without building a dtype
        return dtype
    dtype = np.dtype(dtype)
    if dtype.type not in _FLOATS:
        raise TypeError(f"expected {what} of dtype float16, float32 or float64, got {dtype}")
    # Native byte order: a byte-swapped '>f4' array is computed as float32 like any other.
    return _F16_COMPUTE if dtype.type is np.float16 else np.dtype(dtype.type)


def normalize_axis(axis: int, ndim: int) -> int:
    """`axis` as a non-negative index into `ndim` dims; TypeError or ValueError otherwise."""
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


def check_input(x, axis: int) -> tuple[np.ndarray, int]:
    """`x` as a float array with at least 2 dims, and `axis` as an index into it."""
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
    """`v` (a kernel argument: any float sequence) as a float vector of `size` values, or an
    error naming both shapes."""
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


def check_state_vector(v, name: str, size: int, what: str) -> None:
    """A layer's own public array `v` must still be a float ndarray of shape ``(size,)``: it
    could have been replaced, and a fast kernel trusts its length."""
    if type(v) is np.ndarray and v.shape == (size,) and v.dtype.type in _FLOATS:
        return
    if not isinstance(v, np.ndarray) or v.shape != (size,):
        got = f"shape {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
        raise ValueError(f"expected {name} of shape ({size},) ({what}), got {got}")
    compute_dtype(v.dtype, name)


def check_dy(dy, shape: tuple[int, ...], name: str = "dy") -> np.ndarray:
    """The upstream gradient as a float array of the forward input's `shape`."""
    if type(dy) is not np.ndarray:
        dy = np.asarray(dy)
    if dy.shape != shape:
        raise ValueError(
            f"expected {name} of shape {shape} (the forward input's), got {dy.shape}"
        )
    compute_dtype(dy.dtype, name)
    return dy


def check_eps(eps) -> float:
    """`eps` as a positive finite float."""
    if isinstance(eps, (str, bytes, bool)) or not isinstance(eps, (int, float, np.number)):
        raise TypeError(f"expected eps to be a positive float, got {eps!r}")
    eps = float(eps)
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"expected eps > 0, got {eps}")
    return eps


def check_momentum(momentum, allow_none: bool = True) -> float | None:
    """`momentum` as a float in [0, 1] (or None where that is allowed)."""
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        raise TypeError(f"expected momentum to be a float in [0, 1], got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"expected momentum in [0, 1], got {momentum}")
    return float(momentum)


def check_bool(value, name: str) -> bool:
    """`value` as a bool: True, False or a NumPy bool (a string like "no" is an error)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"expected {name} to be True or False, got {value!r}")
    return bool(value)


def check_int(value, name: str, minimum: int) -> int:
    """`value` as an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"expected {name} to be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {value}")
    return int(value)


def check_mask(mask, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """`mask` for input of `shape` with features on `axis` (non-negative), as a read-only bool
    array with x's dims and size 1 on `axis`.

    Accepted: a bool array of x's shape without the feature axis (``(N, L)`` for ``(N, C, L)``
    input; dims of size 1 broadcast), or one with x's dims, size 1 on the feature axis, that
    broadcasts to x.
    """
    if type(mask) is not np.ndarray:
        mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(
            f"expected mask of dtype bool (True marks the values that count), got {mask.dtype}"
        )
    want = shape[:axis] + (1,) + shape[axis + 1 :]
    without = shape[:axis] + shape[axis + 1 :]
    expected = (
        f"expected mask of shape {without} (x's shape without the feature axis {axis}) or "
        f"broadcastable to {want}"
    )
    if mask.ndim == len(shape) - 1:
        m = np.expand_dims(mask, axis)
    elif mask.ndim == len(shape) and mask.shape[axis] == 1:
        m = mask
    else:
        raise ValueError(f"{expected}, got shape {mask.shape} for x of shape {shape}")
    try:
        return np.broadcast_to(m, want)
    except ValueError:
        raise ValueError(f"{expected}, got shape {mask.shape} for x of shape {shape}") from None
