"""Optimisers: SGD, momentum and Adam. Each updates the arrays of a ``params`` dict in place."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["SGD", "Adam", "Momentum", "Optimizer"]


class Optimizer:
    """Base class.

    Parameters
    ----------
    params : mapping of str to ndarray
        The arrays to update (a network's ``params``). They are changed in place, so the layers
        that own them see the new values.
    lr : float
        Learning rate.
    """

    def __init__(self, params: Mapping[str, np.ndarray], lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"expected a learning rate > 0, got {lr}")
        self.params = dict(params)
        self.lr = float(lr)

    def _checked(self, grads: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        missing = sorted(k for k in self.params if grads.get(k) is None)
        if missing:
            raise ValueError(
                f"no gradient for parameter(s) {missing}: expected a backward call before step"
            )
        return {k: grads[k] for k in self.params}

    def step(self, grads: Mapping[str, np.ndarray | None]) -> None:
        """Update every parameter from its gradient (same keys as ``params``)."""
        raise NotImplementedError  # pragma: no cover

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr}, {len(self.params)} arrays)"


class SGD(Optimizer):
    """``p -= lr * g``."""

    def step(self, grads: Mapping[str, np.ndarray | None]) -> None:
        for k, g in self._checked(grads).items():
            self.params[k] -= self.lr * g


class Momentum(Optimizer):
    """Heavy-ball momentum: ``v = momentum * v - lr * g;  p += v``.

    Parameters
    ----------
    momentum : float, default 0.9
    """

    def __init__(
        self, params: Mapping[str, np.ndarray], lr: float, momentum: float = 0.9
    ) -> None:
        super().__init__(params, lr)
        self.momentum = float(momentum)
        self.v = {k: np.zeros_like(p) for k, p in self.params.items()}

    def step(self, grads: Mapping[str, np.ndarray | None]) -> None:
        for k, g in self._checked(grads).items():
            v = self.v[k]
            v *= self.momentum
            v -= self.lr * g
            self.params[k] += v


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias-corrected moment estimates.

    Parameters
    ----------
    lr : float, default 1e-3
    beta1, beta2 : float, default 0.9, 0.999
    eps : float, default 1e-8
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.t = 0
        self.m = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: np.zeros_like(p) for k, p in self.params.items()}

    def step(self, grads: Mapping[str, np.ndarray | None]) -> None:
        grads = self._checked(grads)
        self.t += 1
        c1 = 1.0 - self.beta1**self.t
        c2 = 1.0 - self.beta2**self.t
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m += (1.0 - self.beta1) * (g - m)
            v += (1.0 - self.beta2) * (g * g - v)
            self.params[k] -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
