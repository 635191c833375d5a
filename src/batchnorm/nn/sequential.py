"""A container that chains layers and gathers their parameters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

__all__ = ["Sequential"]


class Sequential:
    """Layers applied in order; backward runs them in reverse.

    Parameters
    ----------
    layers : iterable of layers
        Anything with ``forward``, ``backward``, ``params``, ``grads``, ``train`` and ``eval``
        (the toolkit's layers and :class:`batchnorm.BatchNorm`).

    Notes
    -----
    ``params`` and ``grads`` prefix each layer's names with its index: ``"0.W"``, ``"1.gamma"``.
    ``params`` holds the layers' own arrays, so an optimiser built on it trains the network.
    """

    def __init__(self, layers: Iterable[Any]) -> None:
        self.layers = list(layers)
        self.training = True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run every layer on the output of the previous one."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Back-propagate `dy` (gradient of the output) to the input; fills every ``grads``."""
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    @property
    def params(self) -> dict[str, np.ndarray]:
        """All learnable arrays, named ``"{index}.{name}"``."""
        return {
            f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.params.items()
        }

    @property
    def grads(self) -> dict[str, np.ndarray | None]:
        """Gradients from the last backward, keyed as `params`."""
        return {
            f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.grads.items()
        }

    def train(self, mode: bool = True) -> Sequential:
        """Put every layer in training mode (or inference mode for ``mode=False``)."""
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self) -> Sequential:
        """Put every layer in inference mode."""
        return self.train(False)

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Class predictions (argmax of the output) in inference mode, in chunks of
        `batch_size` rows; the previous mode is restored.

        Returns
        -------
        labels : ndarray of shape (N,), int64
        """
        was_training = self.training
        self.eval()
        try:
            out = [
                np.argmax(self.forward(x[i : i + batch_size]), axis=1)
                for i in range(0, len(x), batch_size)
            ]
        finally:
            self.train(was_training)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Any:
        return self.layers[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.layers)

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"
