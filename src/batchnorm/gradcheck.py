"""Central finite differences for checking a layer's backward pass.

Each check projects the layer's output on a fixed random array ``r`` (a scalar loss
``L = sum(r * layer(x))``), so ``backward(r)`` must give ``dL/dx`` and the parameter gradients.
Central differences in float64 with ``h = 1e-5`` are accurate to about 1e-10 relative, so a
correct backward pass shows errors far below the 1e-6 tolerance, and a wrong one far above it.

These helpers are used by the test suite and by the ``batchnorm gradcheck`` command
(:mod:`batchnorm.apps.gradcheck`), which runs :func:`check_layer` on every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CheckResult", "check_layer", "numerical_gradient", "relative_error"]

TOLERANCE = 1e-6
# Relative to the largest gradient of a check, below which an array counts as zero.
FLOOR = 1e-3


def numerical_gradient(f: Callable[[], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central-difference gradient of a scalar function with respect to the array `x`.

    Parameters
    ----------
    f : callable with no arguments returning a float
        Reads `x` (and whatever else it closes over) each time it is called.
    x : ndarray, float64, any memory order
        Changed in place, one element at a time, and restored exactly.
    h : float, default 1e-5
        Step.

    Returns
    -------
    grad : ndarray of the shape of `x`, float64
        ``(f(x + h e_i) - f(x - h e_i)) / (2 h)`` for every element ``i``.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    for i in np.ndindex(x.shape):  # by index, so Fortran-ordered and strided arrays work too
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2.0 * h)
    return grad


def relative_error(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """``max |a - b|`` relative to the larger of ``max |a|``, ``max |b|`` and `floor`.

    Scaling by the largest entry, not entry by entry, keeps entries that are nearly zero in both
    (common: batch norm's ``dx`` sums to zero per feature) from dominating with pure noise.
    `floor` does the same for a whole array that is zero (the bias of an affine layer followed
    by batch norm gets no gradient): its numerical noise is measured against `floor`.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"expected arrays of the same shape, got {a.shape} and {b.shape}")
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), floor)
    if scale == 0.0:
        return 0.0
    return float(np.abs(a - b).max() / scale)


@dataclass
class CheckResult:
    """Relative errors of one check: ``errors["dx"]``, ``errors["dgamma"]``, ...

    Attributes
    ----------
    name : str
    errors : dict of str to float
    """

    name: str
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def passed(self, tol: float = TOLERANCE) -> bool:
        # NaN compares False, so a NaN error fails.
        return all(e <= tol for e in self.errors.values())


def check_layer(
    layer: Any,
    x: np.ndarray,
    *,
    name: str | None = None,
    seed: int = 0,
    h: float = 1e-5,
    check_params: bool = True,
) -> CheckResult:
    """Finite-difference check of ``layer.backward`` for input `x`.

    Parameters
    ----------
    layer : object with ``forward(x)``, ``backward(dy)`` and optionally ``params``/``grads``
        Put it in the mode to check (``train()`` or ``eval()``) first. Its parameters must be
        float64 arrays; they are perturbed in place and restored.
    x : ndarray, float64
    name : str, optional
        Label of the result; default ``repr(layer)``.
    seed : int
        Seed of the projection ``r``.
    h : float
        Finite-difference step.
    check_params : bool, default True
        Also check every gradient in ``layer.grads``.

    Returns
    -------
    CheckResult
        Keys ``"dx"`` and ``"d" + param_name`` for each parameter: the
        :func:`relative_error` of each gradient, with a floor of ``FLOOR`` (1e-3) times the
        largest analytic gradient of the check.
    """
    x = np.array(x, dtype=np.float64)
    out = np.asarray(layer.forward(x))
    # A stream of its own: with r drawn like x, r could be parallel to the output at x, where
    # sum(r * BN(x)) is stationary and every gradient vanishes.
    r = np.random.default_rng([seed, 0x5EED]).standard_normal(out.shape)
    analytic = {"dx": np.asarray(layer.backward(r.copy()), dtype=np.float64)}
    params = dict(getattr(layer, "params", {})) if check_params else {}
    grads = getattr(layer, "grads", {})
    for k in params:
        analytic["d" + k] = np.array(grads[k], dtype=np.float64)

    def loss() -> float:
        return float(np.sum(r * layer.forward(x)))

    numeric = {"dx": numerical_gradient(loss, x, h)}
    for k, p in params.items():
        if p.dtype != np.float64:
            raise TypeError(f"expected float64 parameter {k!r}, got {p.dtype}")
        numeric["d" + k] = numerical_gradient(loss, p, h)
    # Arrays that are zero by design are judged against the check's gradient scale.
    floor = FLOOR * max(np.abs(v).max(initial=0.0) for v in analytic.values())
    result = CheckResult(name or repr(layer))
    for k in analytic:
        result.errors[k] = relative_error(analytic[k], numeric[k], floor)
    return result
