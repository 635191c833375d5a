"""Compute backends: the four per-element primitives every batch-norm path is built from.

Every layout is first viewed as a 3-D array ``x3`` of shape ``(A, C, B)``: ``C`` is the feature
axis, ``A`` the product of the axes before it and ``B`` the product of the axes after it. So
``(N, C)`` is ``(N, C, 1)``, ``(N, C, H, W)`` is ``(N, C, H*W)`` and channels-last
``(N, H, W, C)`` is ``(N*H*W, C, 1)``. A backend reduces over axes 0 and 2.

All per-feature arithmetic (inverse standard deviation, coefficients of the backward pass) is
done by the caller in float64 on arrays of length ``C``. A backend only does the passes over the
data, which is where the time goes:

``moments(x3) -> (mean, var)``
    Per-feature mean and biased variance, float64, exact for data with a large mean.
``affine(x3, center, scale, shift, *, relu=False, out=None) -> y3``
    ``y = (x - center) * scale + shift``; with ``relu``, ``max(y, 0)`` (NaN stays NaN).
``grad_sums(dy3, x3, center, *, mask=None) -> (sum_dy, sum_dy_xc)``
    ``sum(dy)`` and ``sum(dy * (x - center))`` per feature, float64.
``grad_input(dy3, x3, center, p, q, r, *, mask=None, out=None) -> dx3``
    ``dx = p * dy + q * (x - center) + r``.

The fused activation: ``relu=True`` writes ``relu(y)``; ``mask`` is that output (shape of
``x3``), and ``grad_sums`` and ``grad_input`` then use ``dy * (mask > 0)`` in place of ``dy``,
the gradient through the ReLU (0 where the output is 0, as PyTorch's and the toolkit's ReLU),
without forming it. ``out`` is where to write the result: a C-contiguous array of the shape
and dtype of ``x3`` that shares no memory with the inputs (the caller checks); None allocates.

Three optional fused methods let a backend do more in one call where per-call work dominates
(small inputs). Each returns None to leave the input to the generic code, which is what the
base class :class:`Backend` does:

``normalize(x3, mean, var, gamma, beta, eps, *, relu, out) -> (y3, center, inv_std) | None``
    All of :func:`batchnorm.functional.normalize_with_stats` (per-feature coefficients and
    ``affine``), bit for bit as the generic code would.
``train_forward(x3, gamma, beta, eps, *, relu, out)``
    ``-> (y3, mean, var, center, inv_std, finite) | None``: ``moments`` followed by
    ``normalize``: the whole training forward of a local batch; ``finite`` tells whether
    ``mean`` and ``var`` are all finite.
``backward(dy3, x3, center, mean, inv_std, gamma, count, training, *, mask, out)``
    ``-> (dx3, dgamma, dbeta) | None``: ``grad_sums``, the parameter gradients (float64) and
    ``grad_input`` of a local batch.
``copy(x3) -> private copy | None``
    The copy of the input that a training cache keeps, made faster (several threads).
``running_update(running_mean, running_var, mean, var, count, w_new, unbiased)``
    ``-> (new_mean, new_var, finite) | None``:
    What :func:`batchnorm.functional.update_running_stats` computes, bit for bit, and whether
    the new statistics are finite in their dtype.

``center``, ``scale``, ``shift``, ``p``, ``q`` and ``r`` have length ``C`` and the dtype of ``x3``
(float32 or float64; float16 never reaches a backend). Subtracting ``center`` before scaling keeps
float32 exact when the mean is large: ``x - center`` is exact when ``x`` is near ``center``
(Sterbenz), and the caller folds the part of the mean that ``center`` cannot hold into ``shift``
and ``r``.
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["Backend", "NumpyBackend", "available_backends", "get_backend"]

ENV_VAR = "BATCHNORM_BACKEND"


class Backend:
    """The interface of a compute backend, and the base class of every backend (see the module
    docstring): the four primitives are required, the fused methods optional."""

    name: str = "abstract"

    def moments(self, x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

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
        raise NotImplementedError

    def grad_sums(
        self,
        dy3: np.ndarray,
        x3: np.ndarray,
        center: np.ndarray,
        *,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

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
        raise NotImplementedError

    # optional fused methods: None means "not here, use the primitives"
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
        return None

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
        return None

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
        return None

    def copy(self, x3: np.ndarray) -> np.ndarray | None:
        return None

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
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _col(v: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, 1)


# Values per float64 block of the reductions: the block stays in cache, and the loop costs
# nothing next to the pass (as fast as one float32 temporary of the whole input, or faster).
_BLOCK = 1 << 16


def _blocks(x3: np.ndarray):
    """Consecutive slices of ``x3`` along its first axis, about ``_BLOCK`` values each."""
    step = max(1, _BLOCK // max(1, x3.shape[1] * x3.shape[2]))
    for a in range(0, x3.shape[0], step):
        yield x3[a : a + step]


# NaN and Inf propagate through the kernels by design (the layers decide what to do with
# them), so NumPy's warnings about them are noise here.
_quiet = np.errstate(invalid="ignore", over="ignore")


class NumpyBackend(Backend):
    """Vectorised NumPy: the reference every other backend is tested against."""

    name = "numpy"

    @_quiet
    def moments(self, x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = x3.shape[0] * x3.shape[2]
        # Corrected two-pass algorithm: centre on the (rounded) mean, then remove what is left
        # of the mean from the second moment. The deviations and their squares are formed in
        # float64, block by block: in float32 the square of a finite deviation overflows above
        # 1.8e19 (and underflows below 1e-23), and a float32 difference can overflow too.
        mean = x3.sum(axis=(0, 2), dtype=np.float64) / count
        center = _col(mean.astype(x3.dtype).astype(np.float64))
        s1 = np.zeros(x3.shape[1])
        s2 = np.zeros(x3.shape[1])
        for block in _blocks(x3):
            d = block.astype(np.float64)
            d -= center
            s1 += d.sum(axis=(0, 2))
            d *= d
            s2 += d.sum(axis=(0, 2))
        s1 /= count
        s2 /= count
        var = np.maximum(s2 - s1 * s1, 0.0)
        return center.ravel() + s1, var

    @_quiet
    def affine(self, x3, center, scale, shift, *, relu=False, out=None):
        y = np.subtract(x3, _col(center), out=out)
        y *= _col(scale)
        y += _col(shift)
        if relu:
            np.maximum(y, 0, out=y)  # NaN stays NaN, as in PyTorch's relu
        return y

    @staticmethod
    def _masked(dy3, mask):
        """``dy * (mask > 0)``: the gradient through a ReLU whose output is `mask`."""
        return dy3 if mask is None else np.where(mask > 0, dy3, dy3.dtype.type(0))

    @_quiet
    def grad_sums(self, dy3, x3, center, *, mask=None):
        dy3 = self._masked(dy3, mask)
        xc = x3 - _col(center)
        xc *= dy3
        sdy = dy3.sum(axis=(0, 2), dtype=np.float64)
        sdx = xc.sum(axis=(0, 2), dtype=np.float64)
        # One cheap test (a dot product of the sums is finite only if all of them are, or
        # spuriously overflows, which costs only the redo): float32 products dy * (x - center)
        # overflow above 3.4e38 where the sums may be finite, so then once more with float64
        # products, block by block (NaN or Inf in the data come out as before).
        if x3.dtype != np.float64 and not math.isfinite(np.dot(sdy, sdx)):
            cen = _col(np.asarray(center, dtype=np.float64))
            sdy[:] = 0.0
            sdx[:] = 0.0
            for g, xb in zip(_blocks(dy3), _blocks(x3), strict=True):
                g = g.astype(np.float64)
                d = xb.astype(np.float64)
                d -= cen
                d *= g
                sdy += g.sum(axis=(0, 2))
                sdx += d.sum(axis=(0, 2))
        return sdy, sdx

    @_quiet
    def grad_input(self, dy3, x3, center, p, q, r, *, mask=None, out=None):
        dy3 = self._masked(dy3, mask)
        dx = np.subtract(x3, _col(center), out=out)
        dx *= _col(q)
        dx += _col(p) * dy3
        dx += _col(r)
        return dx


_CACHE: dict[str, Backend] = {}


def _load(name: str) -> Backend:
    if name not in _CACHE:
        if name == "numpy":
            _CACHE[name] = NumpyBackend()
        elif name == "numba":
            try:
                from ._numba import NumbaBackend
            except ImportError as err:
                raise ImportError(
                    "backend 'numba' was requested but numba is not importable "
                    f"({err}); install it with: pip install 'batchnorm[fast]'"
                ) from err
            _CACHE[name] = NumbaBackend()
        else:
            raise ValueError(f"expected backend 'auto', 'numpy' or 'numba', got {name!r}")
    return _CACHE[name]


def available_backends() -> list[str]:
    """Names of the backends that can be loaded here, the reference first."""
    names = ["numpy"]
    try:
        _load("numba")
    except ImportError:
        pass
    else:
        names.append("numba")
    return names


def get_backend(backend: str | Backend | None = None) -> Backend:
    """Resolve a backend name (or pass a backend object through).

    Parameters
    ----------
    backend : {"auto", "numpy", "numba"}, Backend or None
        ``None`` reads the environment variable ``BATCHNORM_BACKEND`` and falls back to
        ``"auto"``, which is numba when it is importable and NumPy otherwise.

    Raises
    ------
    ValueError
        For an unknown name (naming the environment variable when it came from there).
    TypeError
        For anything else than a name, a :class:`Backend` or None.
    ImportError
        When ``"numba"`` is asked for and numba cannot be imported.
    """
    source = None
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        source = ENV_VAR
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(
            f"expected backend 'auto', 'numpy', 'numba', a Backend or None, got {backend!r}"
        )
    name = backend.strip().lower()
    try:
        if name == "auto":
            try:
                return _load("numba")
            except ImportError:
                return _load("numpy")
        return _load(name)
    except ValueError as err:
        if source is None:
            raise
        raise ValueError(f"environment variable {source}={backend!r}: {err}") from None
