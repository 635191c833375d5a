"""Reducers: where the statistics and gradient sums of a training step are combined.

Every training step of every layer goes through one orchestration in
:mod:`batchnorm.functional`: batch moments, the normalize pass, the per-feature gradient sums
and the input gradient. The reducer is the one place where that path asks "over which values?":

``moments(backend, x3, *, check_finite, shape) -> (count, mean, var)``
    The batch statistics of the step: values per feature, mean and biased variance (float64,
    shape (C,)). :class:`LocalReducer` takes them from ``x3`` alone; the MPI reducer of
    :class:`batchnorm.distributed.SyncBatchNorm` merges every rank's. With ``check_finite`` a
    non-finite statistic is a ValueError (on every rank, for the MPI reducer).
``grad_sums(sum_dy, sum_dy_xc) -> (sum_dy, sum_dy_xc)``
    The per-feature sums ``sum(dy)`` and ``sum(dy * (x - center))`` that the input gradient of
    a training step needs, over the same values as the statistics.
``guard(phase)``
    A context manager around the checks a caller makes before ``moments`` (``phase="forward"``)
    or ``grad_sums`` (``"backward"``). A reducer that communicates uses it to take part in the
    collective with a failure code when a check raises on its process, so that the other
    processes raise too instead of waiting for it.
``local``
    True when the statistics are this call's own: the orchestration may then use a backend's
    fused kernels, which compute statistics and output in one call.

A local reducer is stateless, so one object serves any number of layers. The MPI reducer holds
its communicator, its layer's settings, its creation index on the communicator ("layer #k") and
a count of its collectives, which it compares across ranks in every collective: one per layer
(copies of a layer share it).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import numpy as np

from .backends import Backend

__all__ = ["LOCAL", "LocalReducer", "Reducer", "nonfinite_error"]


class Reducer(Protocol):
    """The interface of a reducer (see the module docstring)."""

    local: bool

    def moments(
        self, backend: Backend, x3: np.ndarray, *, check_finite: bool, shape: tuple[int, ...]
    ) -> tuple[int, np.ndarray, np.ndarray]: ...

    def grad_sums(
        self, sum_dy: np.ndarray, sum_dy_xc: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def guard(self, phase: str) -> contextlib.AbstractContextManager: ...


def nonfinite_error(mean: np.ndarray, var: np.ndarray, shape: tuple[int, ...]) -> ValueError:
    """The error for a training batch whose statistics are NaN or infinite."""
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    shown = ", ".join(str(i) for i in bad[:8]) + (", ..." if bad.size > 8 else "")
    return ValueError(
        f"expected finite values in the training batch, got NaN or Inf in {bad.size} "
        f"feature(s) [{shown}] of x with shape {shape}; nothing was updated"
    )


def all_finite(mean: np.ndarray, var: np.ndarray) -> bool:
    """Whether every value of the float vectors `mean` and `var` is finite."""
    return bool(np.isfinite(mean).all() and np.isfinite(var).all())


_NULL = contextlib.nullcontext()


class LocalReducer:
    """Statistics and gradient sums of this call's batch alone (the default)."""

    local = True

    def moments(self, backend, x3, *, check_finite, shape):
        count = x3.shape[0] * x3.shape[2]
        if count == 0:  # the caller raises, naming x's shape
            return 0, None, None
        mean, var = backend.moments(x3)
        if check_finite and not all_finite(mean, var):
            raise nonfinite_error(mean, var, shape)
        return count, mean, var

    def grad_sums(self, sum_dy, sum_dy_xc):
        return sum_dy, sum_dy_xc

    def guard(self, phase):
        return _NULL

    def __deepcopy__(self, memo) -> LocalReducer:
        return self  # stateless: copies of a layer share it

    def __repr__(self) -> str:
        return "LocalReducer()"


LOCAL = LocalReducer()
"""The shared local reducer."""
