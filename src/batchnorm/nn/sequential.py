"""A container that chains layers and gathers their parameters."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..io import LoadError, read_arrays, write_arrays
from .layers import Layer

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

    ``state_dict`` names the arrays the same way and adds the batch-norm buffers
    (``"1.running_mean"``, ``"1.running_var"``, ``"1.num_batches_tracked"``); ``save`` and
    ``load`` write and read them as ``.npz`` or ``.safetensors`` files, without pickle.
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

    # state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every layer's state, named ``"{index}.{name}"``: ``"0.W"``, ``"0.b"``,
        ``"1.gamma"``, ``"1.running_var"``, ``"1.num_batches_tracked"`` (an int64 scalar)."""
        return {
            f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in _state(layer).items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy `state` (named as :meth:`state_dict` names it) into the layers.

        Every layer checks its part (names, shapes, dtypes, finite values) before any layer
        changes, so a state that does not fit changes nothing.

        Raises
        ------
        KeyError
            For missing or unexpected names; the message names the first layer that differs.
        TypeError, ValueError
            For a wrong dtype, shape or value; the message names the layer.
        """
        self._commit_state(self._check_state(state))

    def _check_state(self, state: Mapping[str, Any]) -> list[Any]:
        parts: list[dict[str, Any]] = [{} for _ in self.layers]
        for key, v in state.items():
            idx, _, sub = str(key).partition(".")
            if not (idx.isdigit() and sub and int(idx) < len(self.layers)):
                raise KeyError(
                    f"unexpected state name {key!r}: expected '<layer index>.<name>' with an "
                    f"index below {len(self.layers)}"
                )
            parts[int(idx)][sub] = v
        checked = []
        for i, (layer, part) in enumerate(zip(self.layers, parts, strict=True)):
            try:
                checked.append(_check_state(layer, part))
            except (KeyError, TypeError, ValueError) as err:
                msg = err.args[0] if isinstance(err, KeyError) and err.args else err
                raise type(err)(f"layer {i} ({_short(layer)}): {msg}") from err
        return checked

    def _commit_state(self, checked: list[Any]) -> None:
        for layer, new in zip(self.layers, checked, strict=True):
            _commit_state(layer, new)

    def _describe(self, key: str) -> str:
        idx, _, sub = key.partition(".")
        if idx.isdigit() and int(idx) < len(self.layers):
            return f"layer {idx} ({_short(self.layers[int(idx)])}), {sub!r}"
        return repr(key)

    def _file_config(self) -> dict[str, Any]:
        return {"format": "batchnorm.nn.Sequential",
                "layers": [type(layer).__name__ for layer in self.layers]}

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to `path`, atomically and without pickle.

        ``*.safetensors`` writes a safetensors file (the ``io`` extra), any other name an
        ``.npz`` archive. The file holds the arrays and the layers' class names, not their
        hyperparameters: :meth:`load` reads it into a model built the same way.
        """
        write_arrays(path, self.state_dict(), self._file_config())

    def load(self, path: str | os.PathLike) -> Sequential:
        """Read a file written by :meth:`save` into this model (built like the saved one).

        The layers' class names and every array's name, shape and dtype are checked against
        this model before any data is read, and the values before anything changes.

        Returns
        -------
        self

        Raises
        ------
        FileNotFoundError
            When `path` does not exist.
        batchnorm.LoadError
            (a ValueError) naming the file, and the first layer that differs, when the file
            does not fit this model or is not a saved model.
        """
        name = os.fspath(path)
        mine = self._file_config()["layers"]
        spec = {
            k: (v.shape, "i" if v.dtype.kind in "iu" else "f")
            for k, v in self.state_dict().items()
        }

        def make_spec(config: dict[str, Any]) -> dict[str, Any]:
            if config.get("format") != "batchnorm.nn.Sequential":
                raise LoadError(
                    f"{name!r} is not a saved model (a single BatchNorm layer's file loads with "
                    "batchnorm.load)"
                )
            theirs = config.get("layers")
            if not isinstance(theirs, list):
                raise LoadError(f"{name!r}: expected a list of layers in its configuration")
            for i, (a, b) in enumerate(zip(theirs, mine, strict=False)):
                if a != b:
                    raise LoadError(f"{name!r}: layer {i} is a {a} in the file, a {b} here")
            if len(theirs) != len(mine):
                raise LoadError(
                    f"{name!r} holds {len(theirs)} layers, this model has {len(mine)}"
                )
            return spec

        arrays = read_arrays(name, make_spec, self._describe)
        try:
            self.load_state_dict(arrays)
        except (KeyError, TypeError, ValueError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise LoadError(f"{name!r}: {msg}") from err
        return self

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


def _state(layer: Any) -> dict[str, np.ndarray]:
    if hasattr(layer, "state_dict"):
        return layer.state_dict()
    return Layer.state_dict(layer)  # any object with ``params``


def _check_state(layer: Any, part: dict[str, Any]) -> Any:
    if hasattr(layer, "_check_state"):
        return layer._check_state(part)
    return Layer._check_state(layer, part)


def _commit_state(layer: Any, new: Any) -> None:
    if hasattr(layer, "_commit_state"):
        layer._commit_state(new)
    else:
        Layer._commit_state(layer, new)


def _short(layer: Any) -> str:
    """A layer's repr, or its class name when the repr spans lines (a nested Sequential)."""
    text = repr(layer)
    return type(layer).__name__ if "\n" in text else text
