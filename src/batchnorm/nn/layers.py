"""Layers of the toolkit: affine, activations, convolution, pooling and flatten.

Every layer follows one protocol, which :class:`batchnorm.BatchNorm` follows too, so batch
normalization drops into a network like any other layer:

``forward(x) -> y`` (also ``layer(x)``)
    Computes the output and keeps what ``backward`` needs.
``backward(dy) -> dx``
    Gradient with respect to the last forward's input; fills ``grads``.
``params``, ``grads``
    Dicts of arrays by name (``{}`` for layers without parameters). Optimisers update the arrays
    of ``params`` in place, so the layer sees the new values.
``train()``, ``eval()``
    Switch the mode (only batch normalization behaves differently); both return the layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "Conv2d", "Flatten", "Layer", "Linear", "MaxPool2d", "ReLU", "Sigmoid", "col2im", "im2col",
]


class Layer:
    """Base class: the mode switch, empty ``params``/``grads`` and ``layer(x)``."""

    training: bool = True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Learnable arrays by name."""
        return {}

    @property
    def grads(self) -> dict[str, np.ndarray | None]:
        """Gradients from the last backward, keyed as `params`."""
        return {}

    # state: the learnable arrays, so that a network saves and loads as a whole -------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the layer's ``params``."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy `state` into ``params`` after checking every name, shape and dtype.

        Float arrays of any float dtype are cast to each parameter's dtype.

        Raises
        ------
        KeyError
            For missing or unexpected names.
        TypeError
            For a non-float array.
        ValueError
            For a wrong shape or values that are not finite in the parameter's dtype. Nothing
            is changed then.
        """
        self._commit_state(self._check_state(state))

    def _check_state(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        params = self.params
        if set(state) != set(params):
            raise KeyError(
                f"state_dict keys do not match: missing {sorted(set(params) - set(state))}, "
                f"unexpected {sorted(set(state) - set(params))}"
            )
        new = {}
        for k, p in params.items():
            v = np.asarray(state[k])
            if v.dtype.type not in (np.float16, np.float32, np.float64):
                raise TypeError(f"expected {k} of a float dtype, got {v.dtype}")
            if v.shape != p.shape:
                raise ValueError(f"expected {k} of shape {p.shape}, got {v.shape}")
            with np.errstate(over="ignore"):
                cast = v.astype(p.dtype)
            if not np.isfinite(cast).all():
                raise ValueError(f"expected finite {k} that fits {p.dtype.name}")
            new[k] = cast
        return new

    def _commit_state(self, new: dict[str, np.ndarray]) -> None:
        params = self.params
        for k, v in new.items():
            np.copyto(params[k], v)

    def train(self, mode: bool = True) -> Layer:
        """Training mode. Returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> Layer:
        """Inference mode. Returns self."""
        return self.train(False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _need_forward(cache: Any, name: str) -> None:
    if cache is None:
        raise RuntimeError(f"{name}.backward called before forward: expected a forward call first")


def _check_dy(dy: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    dy = np.asarray(dy)
    if dy.shape != shape:
        raise ValueError(f"{name}: expected dy of shape {shape} (the output's), got {dy.shape}")
    return dy


class _Weighted(Layer):
    """A layer with a weight ``W`` and an optional bias ``b`` (None without one), and their
    gradients ``dW``, ``db``."""

    W: np.ndarray
    b: np.ndarray | None
    dW: np.ndarray | None
    db: np.ndarray | None

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {"W": self.W} if self.b is None else {"W": self.W, "b": self.b}

    @property
    def grads(self) -> dict[str, np.ndarray | None]:
        return {"W": self.dW} if self.b is None else {"W": self.dW, "b": self.db}


class Linear(_Weighted):
    """Affine map ``y = x @ W + b``.

    Parameters
    ----------
    in_features, out_features : int
    weight : ndarray of shape (in_features, out_features), optional
        Initial weights (copied). Default: He initialisation, ``std = sqrt(2 / in_features)``,
        drawn from `rng`.
    bias : bool, default True
        Biases start at zero.
    rng : numpy.random.Generator, optional
        Used only when `weight` is not given; default ``default_rng(0)``.
    dtype : float32 or float64, default float64

    Notes
    -----
    ``x`` has shape (N, in_features); ``y`` has shape (N, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight: np.ndarray | None = None,
        bias: bool = True,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float64,
    ) -> None:
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        shape = (self.in_features, self.out_features)
        if weight is None:
            rng = np.random.default_rng(0) if rng is None else rng
            weight = np.sqrt(2.0 / self.in_features) * rng.standard_normal(shape)
        weight = np.array(weight, dtype=dtype)
        if weight.shape != shape:
            raise ValueError(f"expected weight of shape {shape}, got {weight.shape}")
        self.W = weight
        self.b = np.zeros(self.out_features, dtype) if bias else None
        self.dW: np.ndarray | None = None
        self.db: np.ndarray | None = None
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x`` of shape (N, in_features) -> ``y`` of shape (N, out_features)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Linear: expected x of shape (N, {self.in_features}), got {x.shape}"
            )
        self._x = x
        y = x @ self.W
        if self.b is not None:
            y += self.b
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """``dy`` of shape (N, out_features) -> ``dx`` of shape (N, in_features)."""
        _need_forward(self._x, "Linear")
        dy = _check_dy(dy, (self._x.shape[0], self.out_features), "Linear")
        self.dW = self._x.T @ dy
        if self.b is not None:
            self.db = dy.sum(axis=0)
        return dy @ self.W.T

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features}, bias={self.b is not None})"


class ReLU(Layer):
    """``y = max(x, 0)``, elementwise, any shape. The gradient at exactly 0 is taken as 0."""

    def __init__(self) -> None:
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        self._mask = x > 0
        return np.where(self._mask, x, 0).astype(x.dtype, copy=False)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _need_forward(self._mask, "ReLU")
        dy = _check_dy(dy, self._mask.shape, "ReLU")
        return np.where(self._mask, dy, 0).astype(dy.dtype, copy=False)


class Sigmoid(Layer):
    """``y = 1 / (1 + exp(-x))``, elementwise, any shape."""

    def __init__(self) -> None:
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        # exp(-|x|) never overflows; the two branches are the same function.
        e = np.exp(-np.abs(x))
        y = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
        self._y = y
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _need_forward(self._y, "Sigmoid")
        dy = _check_dy(dy, self._y.shape, "Sigmoid")
        return dy * self._y * (1.0 - self._y)


class Flatten(Layer):
    """(N, *rest) -> (N, prod(rest)); backward restores the shape."""

    def __init__(self) -> None:
        self._shape: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _need_forward(self._shape, "Flatten")
        n = self._shape[0]
        dy = _check_dy(dy, (n, int(np.prod(self._shape[1:], dtype=np.int64))), "Flatten")
        return dy.reshape(self._shape)


# ---------------------------------------------------------------------------------------------
# convolution through im2col


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def im2col(x: np.ndarray, kh: int, kw: int, stride: int = 1, pad: int = 0) -> np.ndarray:
    """Unfold the sliding windows of an image batch into rows.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    kh, kw : int
        Window height and width.
    stride, pad : int
        Step between windows and zero padding on every side.

    Returns
    -------
    cols : ndarray of shape (N * Ho * Wo, C * kh * kw)
        Row ``(n, i, j)`` (in that order) holds the window at output position ``(i, j)`` of
        image ``n``, ordered ``(c, ki, kj)``; ``Ho = (H + 2 pad - kh) // stride + 1``, and so
        for ``Wo``.
    """
    n, c, h, w = x.shape
    ho, wo = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    # (N, C, H', W', kh, kw) view of every window; then keep every stride-th one.
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    win = win[:, :, : (ho - 1) * stride + 1 : stride, : (wo - 1) * stride + 1 : stride]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def col2im(
    cols: np.ndarray,
    shape: tuple[int, int, int, int],
    kh: int,
    kw: int,
    stride: int = 1,
    pad: int = 0,
) -> np.ndarray:
    """The adjoint of :func:`im2col`: add every row back onto its window.

    Parameters
    ----------
    cols : ndarray of shape (N * Ho * Wo, C * kh * kw)
    shape : (N, C, H, W)
        Shape of the image batch that ``im2col`` unfolded.

    Returns
    -------
    x : ndarray of shape (N, C, H, W)
        Overlapping windows add up, which is what the gradient of ``im2col`` needs.
    """
    n, c, h, w = shape
    ho, wo = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    # One copy into (kh, kw, N, Ho, Wo, C) makes every slice below contiguous; the image is
    # accumulated channels-last so that each add writes whole rows of C values.
    blocks = np.ascontiguousarray(cols.reshape(n, ho, wo, c, kh, kw).transpose(4, 5, 0, 1, 2, 3))
    xp = np.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=cols.dtype)
    # One strided add per kernel offset; kh * kw is small, the adds are vectorised.
    for i in range(kh):
        for j in range(kw):
            xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride] += blocks[i, j]
    return xp[:, pad : pad + h, pad : pad + w].transpose(0, 3, 1, 2)


class Conv2d(_Weighted):
    """2-D convolution (cross-correlation, as in every deep-learning library) through im2col.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        Square kernels.
    stride : int, default 1
    pad : int, default 0
        Zero padding on every side.
    weight : ndarray of shape (out_channels, in_channels, k, k), optional
        Initial weights (copied). Default: He initialisation, ``std = sqrt(2 / (C k k))``.
    bias : bool, default True
        Biases start at zero.
    rng : numpy.random.Generator, optional
    dtype : float32 or float64, default float64

    Notes
    -----
    ``x`` of shape (N, C, H, W) gives ``y`` of shape (N, F, Ho, Wo) with
    ``Ho = (H + 2 pad - k) // stride + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        pad: int = 0,
        weight: np.ndarray | None = None,
        bias: bool = True,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float64,
    ) -> None:
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.pad = int(pad)
        if self.stride < 1 or self.pad < 0 or self.kernel_size < 1:
            raise ValueError(
                f"expected kernel_size >= 1, stride >= 1 and pad >= 0, got "
                f"{kernel_size}, {stride}, {pad}"
            )
        k = self.kernel_size
        shape = (self.out_channels, self.in_channels, k, k)
        if weight is None:
            rng = np.random.default_rng(0) if rng is None else rng
            weight = np.sqrt(2.0 / (self.in_channels * k * k)) * rng.standard_normal(shape)
        weight = np.array(weight, dtype=dtype)
        if weight.shape != shape:
            raise ValueError(f"expected weight of shape {shape}, got {weight.shape}")
        self.W = weight
        self.b = np.zeros(self.out_channels, dtype) if bias else None
        self.dW: np.ndarray | None = None
        self.db: np.ndarray | None = None
        self._cache: tuple[tuple[int, ...], np.ndarray, tuple[int, ...]] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x`` of shape (N, C, H, W) -> ``y`` of shape (N, F, Ho, Wo)."""
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Conv2d: expected x of shape (N, {self.in_channels}, H, W), got {x.shape}"
            )
        n, _, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.pad
        ho, wo = _out_size(h, k, s, p), _out_size(w, k, s, p)
        if ho < 1 or wo < 1:
            raise ValueError(f"Conv2d: a {k}x{k} kernel does not fit input of shape {x.shape}")
        cols = im2col(x, k, k, s, p)
        y = cols @ self.W.reshape(self.out_channels, -1).T  # (N*Ho*Wo, F)
        if self.b is not None:
            y += self.b
        out_shape = (n, self.out_channels, ho, wo)
        self._cache = (x.shape, cols, out_shape)
        return y.reshape(n, ho, wo, self.out_channels).transpose(0, 3, 1, 2)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """``dy`` of shape (N, F, Ho, Wo) -> ``dx`` of shape (N, C, H, W)."""
        _need_forward(self._cache, "Conv2d")
        x_shape, cols, out_shape = self._cache
        dy = _check_dy(dy, out_shape, "Conv2d")
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)  # (N*Ho*Wo, F)
        self.dW = (dy2.T @ cols).reshape(self.W.shape)
        if self.b is not None:
            self.db = dy2.sum(axis=0)
        dcols = dy2 @ self.W.reshape(self.out_channels, -1)
        k = self.kernel_size
        return col2im(dcols, x_shape, k, k, self.stride, self.pad)

    def __repr__(self) -> str:
        return (
            f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, pad={self.pad}, bias={self.b is not None})"
        )


class MaxPool2d(Layer):
    """Max pooling over square windows.

    Parameters
    ----------
    kernel_size : int
    stride : int, optional
        Default: `kernel_size` (non-overlapping windows).

    Notes
    -----
    ``x`` of shape (N, C, H, W) gives (N, C, Ho, Wo), ``Ho = (H - k) // stride + 1``. The
    gradient goes to the first maximum of each window (ties are broken towards the top left).
    """

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        self.kernel_size = int(kernel_size)
        self.stride = self.kernel_size if stride is None else int(stride)
        if self.kernel_size < 1 or self.stride < 1:
            raise ValueError(f"expected kernel_size, stride >= 1, got {kernel_size}, {stride}")
        self._cache: tuple[tuple[int, ...], np.ndarray, tuple[int, ...]] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"MaxPool2d: expected x of shape (N, C, H, W), got {x.shape}")
        n, c, h, w = x.shape
        k, s = self.kernel_size, self.stride
        ho, wo = _out_size(h, k, s, 0), _out_size(w, k, s, 0)
        if ho < 1 or wo < 1:
            raise ValueError(f"MaxPool2d: a {k}x{k} window does not fit input of shape {x.shape}")
        if k == s and h == ho * k and w == wo * k:
            # Non-overlapping windows that tile the image: a reshape gives the windows.
            cols = x.reshape(n, c, ho, k, wo, k).transpose(0, 1, 2, 4, 3, 5).reshape(-1, k * k)
        else:
            # Pool every channel as its own image: rows are windows, columns the k*k positions.
            cols = im2col(x.reshape(n * c, 1, h, w), k, k, s, 0)
        arg = cols.argmax(axis=1)
        y = np.take_along_axis(cols, arg[:, None], axis=1)
        self._cache = (x.shape, arg, (n, c, ho, wo))
        return y.reshape(n, c, ho, wo)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _need_forward(self._cache, "MaxPool2d")
        x_shape, arg, out_shape = self._cache
        dy = _check_dy(dy, out_shape, "MaxPool2d")
        n, c, h, w = x_shape
        k = self.kernel_size
        dcols = np.zeros((arg.size, k * k), dtype=dy.dtype)
        np.put_along_axis(dcols, arg[:, None], dy.reshape(-1, 1), axis=1)
        ho, wo = out_shape[2:]
        if k == self.stride and h == ho * k and w == wo * k:
            return dcols.reshape(n, c, ho, wo, k, k).transpose(0, 1, 2, 4, 3, 5).reshape(x_shape)
        return col2im(dcols, (n * c, 1, h, w), k, k, self.stride, 0).reshape(x_shape)

    def __repr__(self) -> str:
        return f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride})"
