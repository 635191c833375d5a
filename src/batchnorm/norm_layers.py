"""Layers for group, instance and layer normalization (PyTorch's semantics).

They hold the affine parameters and the last forward's cache and leave the arithmetic to
:func:`batchnorm.group_norm` and :func:`batchnorm.layer_norm`. Unlike batch normalization they
have no running statistics: every sample is normalised with its own statistics, the same way in
training and in eval mode (``train()``/``eval()`` exist for the common layer protocol).

A call that raises changes nothing: the new cache and gradients are computed into locals first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .backends import Backend, get_backend
from .groupnorm import (
    GroupNormCache,
    _check_eps,
    _check_int,
    _compute_dtype,
    _normalized_shape,
    group_norm,
    group_norm_backward,
    layer_norm,
    layer_norm_backward,
)

__all__ = ["GroupNorm", "LayerNorm"]


class _AffineNorm:
    """Parameters of shape ``_param_shape``, mode, repr and (de)serialisation."""

    _param_shape: tuple[int, ...]

    def _init_params(self, affine: bool, eps: float, dtype: Any, backend) -> None:
        dtype = np.dtype(dtype)
        _compute_dtype(dtype, "dtype")
        self.eps = _check_eps(eps)
        self.dtype = dtype
        self.backend = get_backend(backend)
        self.training = True
        on = bool(affine)
        self.gamma = np.ones(self._param_shape, dtype) if on else None
        self.beta = np.zeros(self._param_shape, dtype) if on else None
        self.dgamma: np.ndarray | None = None
        self.dbeta: np.ndarray | None = None
        self._cache: GroupNormCache | None = None

    @property
    def _affine(self) -> bool:
        return self.gamma is not None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    # mode: no running statistics, so both modes compute the same -----------------------------
    def train(self, mode: bool = True):
        """Set the mode flag (it changes nothing here: no running statistics). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Same as ``train(False)``. Returns self."""
        return self.train(False)

    # parameters -------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """The learnable arrays by name, for optimisers that update them in place."""
        return {"gamma": self.gamma, "beta": self.beta} if self._affine else {}

    @property
    def grads(self) -> dict[str, np.ndarray | None]:
        """Gradients from the last backward, keyed as `params`."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self._affine else {}

    def reset_parameters(self) -> None:
        """gamma to 1 and beta to 0."""
        if self._affine:
            self.gamma.fill(1)
            self.beta.fill(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    # state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of ``gamma`` and ``beta`` (an empty dict without affine parameters)."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy `state` into the layer after checking every name, shape and dtype.

        Float arrays of any float dtype are cast to the layer's dtype. Raises (KeyError,
        ValueError or TypeError) and changes nothing when anything does not fit.
        """
        expected = set(self.params)
        got = set(state)
        if got != expected:
            raise KeyError(
                f"state_dict keys do not match: missing {sorted(expected - got)}, "
                f"unexpected {sorted(got - expected)}"
            )
        new = {}
        for k in sorted(expected):
            v = np.asarray(state[k])
            if v.dtype.type not in (np.float16, np.float32, np.float64):
                raise TypeError(f"expected {k} of a float dtype, got {v.dtype}")
            if v.shape != self._param_shape:
                raise ValueError(f"expected {k} of shape {self._param_shape}, got {v.shape}")
            with np.errstate(over="ignore"):
                cast = v.astype(self.dtype)
            if not np.isfinite(cast).all():
                raise ValueError(
                    f"expected finite {k} that fits {self.dtype.name}, got {v.dtype} values "
                    f"with min {v.min()} and max {v.max()}"
                )
            new[k] = cast
        for k, v in new.items():
            np.copyto(getattr(self, k), v)

    # forward / backward -----------------------------------------------------------------------
    def _check_params(self) -> None:
        """The public arrays (which a user may have replaced) still fit the layer."""
        if not self._affine:
            return
        for name in ("gamma", "beta"):
            v = getattr(self, name)
            if not isinstance(v, np.ndarray) or v.shape != self._param_shape:
                got = f"shape {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
                raise ValueError(f"expected {name} of shape {self._param_shape}, got {got}")

    def _backward_kernel(self, dy: np.ndarray, cache: GroupNormCache):  # pragma: no cover
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient with respect to the last forward's input; sets `dgamma` and `dbeta`.

        Parameters
        ----------
        dy : ndarray, same shape as the last forward's `x`

        Returns
        -------
        dx : ndarray, same shape and dtype as the last forward's `x`

        Raises
        ------
        RuntimeError
            Before any forward call.
        TypeError, ValueError
            For a non-float `dy` or one of another shape than the forward's `x`.
        """
        if self._cache is None:
            raise RuntimeError("backward called before forward: expected a forward call first")
        dx, dgamma, dbeta = self._backward_kernel(dy, self._cache)
        if self._affine:
            self.dgamma = dgamma.astype(self.dtype, copy=False)
            self.dbeta = dbeta.astype(self.dtype, copy=False)
        return dx


class GroupNorm(_AffineNorm):
    """Group normalization (Wu & He 2018): each sample's channels normalised in groups.

    ``GroupNorm(C, C)`` is instance normalization (one channel per group) with a per-channel
    affine, ``GroupNorm(1, C)`` normalises each sample over all its values.

    Parameters
    ----------
    num_groups : int
        ``G``; must divide `num_channels`.
    num_channels : int
        ``C``, the size of the channel axis.
    eps : float, default 1e-5
    affine : bool, default True
        Learnable per-channel ``gamma`` (ones) and ``beta`` (zeros), shape (C,).
    axis : int, default 1
        The channel axis; ``-1`` for channels-last ``(N, *spatial, C)`` (computed on a
        channels-first copy). Axis 0 is always the batch axis.
    dtype : float16, float32 or float64, default float32
        Of the parameters.
    backend : {"auto", "numpy", "numba"} or None

    Notes
    -----
    Input ``(N, C)`` or ``(N, C, *spatial)`` (or channels on `axis`), output of the same shape
    and dtype: ``y = gamma_c * (x - mean_ng) / sqrt(var_ng + eps) + beta_c`` with the mean and
    biased variance of sample ``n``'s group ``g`` of ``C/G`` channels over all positions.
    Equal to ``torch.nn.GroupNorm(G, C, eps, affine)``. No running statistics: train and eval
    mode compute the same.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        axis: int = 1,
        dtype: Any = np.float32,
        backend: str | Backend | None = None,
    ) -> None:
        g = _check_int(num_groups, "num_groups")
        c = _check_int(num_channels, "num_channels")
        if c % g:
            raise ValueError(
                f"expected num_groups to divide num_channels, got num_groups={g} and "
                f"num_channels={c}"
            )
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"expected axis to be an int, got {axis!r}")
        if axis == 0:
            raise ValueError("expected the channel axis to be 1 or later (axis 0 is the batch "
                             "axis), got axis=0")
        self.num_groups = g
        self.num_channels = c
        self.axis = int(axis)
        self.affine = bool(affine)
        self._param_shape = (c,)
        self._init_params(affine, eps, dtype, backend)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"axis={self.axis}, dtype={self.dtype.name}, backend={self.backend.name!r}"
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalise `x`.

        Parameters
        ----------
        x : ndarray with ``x.shape[axis] == num_channels`` and at least 2 dims

        Returns
        -------
        y : ndarray, same shape and dtype as `x`

        Raises
        ------
        TypeError
            For a non-float `x`.
        ValueError
            For fewer than 2 dims, an empty `x`, an axis out of range or a channel-count
            mismatch.
        """
        x = np.asarray(x)
        if x.ndim >= 2 and -x.ndim <= self.axis < x.ndim:
            if x.shape[self.axis] != self.num_channels:
                raise ValueError(
                    f"expected x.shape[{self.axis}] == num_channels == {self.num_channels}, "
                    f"got x of shape {x.shape}"
                )
        self._check_params()
        y, cache = group_norm(
            x, self.num_groups, self.gamma, self.beta,
            axis=self.axis, eps=self.eps, backend=self.backend,
        )
        self._cache = cache
        return y

    def _backward_kernel(self, dy, cache):
        return group_norm_backward(dy, cache)


class LayerNorm(_AffineNorm):
    """Layer normalization (Ba, Kiros & Hinton 2016) over the trailing dims.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The last dims of the input, over which each sample is normalised.
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        Learnable per-element ``gamma`` (ones) and ``beta`` (zeros) of shape
        `normalized_shape`.
    dtype : float16, float32 or float64, default float32
        Of the parameters.
    backend : {"auto", "numpy", "numba"} or None

    Notes
    -----
    Input ``(*leading, *normalized_shape)``, output of the same shape and dtype:
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the mean and biased variance of
    each leading index over the normalised dims. Equal to
    ``torch.nn.LayerNorm(normalized_shape, eps, elementwise_affine)``. No running statistics:
    train and eval mode compute the same.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        dtype: Any = np.float32,
        backend: str | Backend | None = None,
    ) -> None:
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.elementwise_affine = bool(elementwise_affine)
        self._param_shape = self.normalized_shape
        self._init_params(elementwise_affine, eps, dtype, backend)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, dtype={self.dtype.name}, "
            f"backend={self.backend.name!r}"
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalise `x`.

        Parameters
        ----------
        x : ndarray of shape (*leading, *normalized_shape)

        Returns
        -------
        y : ndarray, same shape and dtype as `x`

        Raises
        ------
        TypeError
            For a non-float `x`.
        ValueError
            For an empty `x` or one whose trailing dims are not `normalized_shape`.
        """
        self._check_params()
        y, cache = layer_norm(
            x, self.normalized_shape, self.gamma, self.beta, eps=self.eps, backend=self.backend
        )
        self._cache = cache
        return y

    def _backward_kernel(self, dy, cache):
        return layer_norm_backward(dy, cache)
