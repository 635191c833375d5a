"""Weights between a PyTorch ``nn.Sequential`` and a toolkit :class:`Sequential`, without
pickle and without needing PyTorch installed.

The two models must be built alike, layer for layer: PyTorch's module ``i`` is the toolkit's
layer ``i`` (``Linear``, ``Conv2d``, ``BatchNorm1d/2d`` -> :class:`batchnorm.BatchNorm`, and
activations, pooling and flatten, which hold no state).

Conventions converted (see the docs page on saving and loading):

- ``Linear.weight`` is (out, in) in PyTorch and ``W`` is (in, out) here: transposed.
- ``Conv2d.weight`` is (out, in, k, k) in both: copied.
- ``GroupNorm``, ``LayerNorm``: ``weight``/``bias`` are ``gamma``/``beta``.
- ``BatchNorm*d``: ``weight``/``bias`` are ``gamma``/``beta``; ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` are copied as they are. PyTorch's
  ``running_var`` is the running average of the UNBIASED batch variance, and both libraries
  use the stored array as it is at inference, so eval outputs agree; a toolkit layer that
  keeps training it should be ``BatchNorm(unbiased=True)`` to keep averaging the same
  quantity. ``momentum`` and ``eps`` are configuration, not state: PyTorch's ``momentum=m`` is
  ``BatchNorm(momentum=1 - m)`` here, and ``eps`` must be set alike when the models are built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..io import _ST_KINDS, LoadError, _import_safetensors, _sniff
from ..layers import _NormBase
from ..norm_layers import _AffineNorm
from .layers import Conv2d, Linear
from .sequential import Sequential, _short

__all__ = ["export_torch_state", "load_torch_state"]

Declared = Mapping[str, tuple[tuple[int, ...], str]]  # torch name -> (shape, kind)


def _torch_names(layer: Any) -> dict[str, tuple[str, tuple[int, ...], str]] | None:
    """PyTorch name -> (toolkit name, PyTorch shape, kind) for one layer; None when the layer
    has state but no PyTorch counterpart."""
    if isinstance(layer, Linear):
        out = {"weight": ("W", (layer.out_features, layer.in_features), "f")}
        if layer.b is not None:
            out["bias"] = ("b", layer.b.shape, "f")
        return out
    if isinstance(layer, Conv2d):
        out = {"weight": ("W", layer.W.shape, "f")}
        if layer.b is not None:
            out["bias"] = ("b", layer.b.shape, "f")
        return out
    if isinstance(layer, _NormBase):
        c = (layer.num_features,)
        out = {}
        if layer.affine:
            out |= {"weight": ("gamma", c, "f"), "bias": ("beta", c, "f")}
        if layer.track_running_stats:
            out |= {
                "running_mean": ("running_mean", c, "f"),
                "running_var": ("running_var", c, "f"),
                "num_batches_tracked": ("num_batches_tracked", (), "i"),
            }
        return out
    if isinstance(layer, _AffineNorm):  # GroupNorm, LayerNorm: affine parameters only
        if layer.gamma is None:
            return {}
        return {"weight": ("gamma", layer.gamma.shape, "f"),
                "bias": ("beta", layer.beta.shape, "f")}
    has_state = hasattr(layer, "state_dict") and layer.state_dict() or getattr(layer, "params", {})
    return None if has_state else {}


def _fmt(entries: Mapping[str, tuple[tuple[int, ...], str]]) -> str:
    if not entries:
        return "no state"
    return ", ".join(f"{k} {tuple(shape)}" for k, (shape, _) in entries.items())


def _plan(model: Sequential, declared: Declared) -> list[tuple[str, str, bool]]:
    """Check `declared` against `model` layer by layer; returns (torch name, toolkit name,
    transpose) for every array. Raises ValueError naming the first layer that differs."""
    parts: dict[int, dict[str, tuple[tuple[int, ...], str]]] = {}
    for key, value in declared.items():
        idx, _, sub = key.partition(".")
        if not (idx.isdigit() and sub and "." not in sub):
            raise ValueError(
                f"expected the state of a PyTorch nn.Sequential (names like '0.weight'), got "
                f"{key!r}"
            )
        parts.setdefault(int(idx), {})[sub] = value
    plan = []
    for i in range(max(len(model), max(parts, default=-1) + 1)):
        theirs = parts.get(i, {})
        if i >= len(model):
            if not theirs:
                continue
            raise ValueError(
                f"layer {i} differs: PyTorch has {_fmt(theirs)}, the model has only "
                f"{len(model)} layers"
            )
        layer = model[i]
        mine = _torch_names(layer)
        if mine is None:
            raise ValueError(
                f"layer {i} differs: {_short(layer)} has state but no PyTorch counterpart this "
                "mapping knows (Linear, Conv2d, BatchNorm, GroupNorm, LayerNorm)"
            )
        wanted = {k: (shape, kind) for k, (_, shape, kind) in mine.items()}
        got = dict(theirs)
        if (isinstance(layer, _NormBase) and "running_mean" in wanted
                and "num_batches_tracked" not in got):
            # States saved by PyTorch before 0.4.1 have no counter; PyTorch starts it at 0 too.
            wanted.pop("num_batches_tracked")
        same = set(wanted) == set(got) and all(
            tuple(got[k][0]) == tuple(wanted[k][0]) and got[k][1] == wanted[k][1] for k in wanted
        )
        if not same:
            kinds = "" if all(got[k][1] == wanted[k][1] for k in set(got) & set(wanted)) else (
                " (float arrays, and an integer num_batches_tracked)"
            )
            raise ValueError(
                f"layer {i} differs: PyTorch has {_fmt(got)}, the model's {_short(layer)} expects "
                f"{_fmt(wanted)}{kinds}"
            )
        for k in wanted:
            transpose = isinstance(layer, Linear) and k == "weight"
            plan.append((f"{i}.{k}", f"{i}.{mine[k][0]}", transpose))
    return plan


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, converted without importing torch here
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()  # NumPy has no bfloat16; float32 holds every bfloat16 exactly
        return t.numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"expected {name!r} to be a numeric array or tensor, got {arr.dtype}")
    return arr


def _kind(dtype: np.dtype) -> str:
    if dtype.type in (np.float16, np.float32, np.float64):
        return "f"
    return "i" if dtype.kind in "iu" else "?"


def _read_torch_safetensors(path: str, model: Sequential) -> tuple[dict, list]:
    st = _import_safetensors()
    try:
        with st.safe_open(path, framework="np") as f:
            return _read_torch_open(path, f, model)
    except st.SafetensorError as err:
        raise LoadError(f"{path!r} is not a valid .safetensors file: {err}") from err


def _read_torch_open(path: str, f: Any, model: Sequential) -> tuple[dict, list]:
    declared = {}
    for k in f.keys():
        sl = f.get_slice(k)
        dtype = sl.get_dtype()
        declared[k] = (tuple(sl.get_shape()), _ST_KINDS.get(dtype, "?"))
        if dtype == "BF16":
            raise LoadError(
                f"{path!r}: {k!r} is bfloat16, which NumPy cannot read; save the state as "
                "float32 (model.float()) before safetensors.torch.save_file"
            )
    try:
        plan = _plan(model, declared)
    except ValueError as err:
        raise LoadError(f"{path!r}: {err}") from err
    return {k: np.array(f.get_tensor(k)) for k in declared}, plan


def load_torch_state(model: Sequential, state: Mapping[str, Any] | str | os.PathLike) -> Sequential:
    """Load the state of a PyTorch ``nn.Sequential`` into a toolkit model built alike.

    Parameters
    ----------
    model : Sequential
        Layer ``i`` corresponds to PyTorch's module ``i``: ``Linear`` to ``nn.Linear`` (with or
        without bias), ``Conv2d`` to ``nn.Conv2d`` (square kernel, no groups or dilation),
        :class:`batchnorm.BatchNorm` to ``nn.BatchNorm1d/2d`` (same ``affine`` and
        ``track_running_stats``), :class:`batchnorm.GroupNorm` / :class:`batchnorm.LayerNorm`
        to ``nn.GroupNorm`` / ``nn.LayerNorm``, stateless layers to stateless modules.
    state : mapping or path
        ``torch_model.state_dict()`` (tensors or arrays), or the path of a ``.safetensors``
        file written by ``safetensors.torch.save_file(torch_model.state_dict(), path)``.

    Returns
    -------
    model
        The same model, its arrays replaced.

    Raises
    ------
    ValueError
        Naming the first layer whose names or shapes differ (a :class:`batchnorm.LoadError`
        for a file), or for values the layers refuse; nothing is changed then.
    batchnorm.LoadError
        For a ``.pt``/``.pth`` file or any pickle: they are refused, never unpickled.
    TypeError
        For non-numeric values.

    Notes
    -----
    Only weights and buffers move: strides, padding, ``eps`` and ``momentum`` are the
    toolkit model's own (PyTorch ``momentum=m`` is ``BatchNorm(momentum=1 - m)`` here).
    ``running_var`` is copied as it is (PyTorch's unbiased running average), so eval outputs
    agree.
    """
    if isinstance(state, (str, os.PathLike)):
        path = os.fspath(state)
        if _sniff(path) != "safetensors":
            raise LoadError(
                f"{path!r}: expected a .safetensors file written by safetensors.torch.save_file"
            )
        arrays, plan = _read_torch_safetensors(path, model)
    else:
        arrays = {str(k): _as_numpy(str(k), v) for k, v in state.items()}
        plan = _plan(model, {k: (v.shape, _kind(v.dtype)) for k, v in arrays.items()})
    new = {mine: (arrays[theirs].T if transpose else arrays[theirs])
           for theirs, mine, transpose in plan}
    # Layers whose counter PyTorch did not store start at 0, as in PyTorch.
    for i, layer in enumerate(model):
        if isinstance(layer, _NormBase) and layer.track_running_stats:
            new.setdefault(f"{i}.num_batches_tracked", np.array(0, np.int64))
    model.load_state_dict(new)
    return model


def export_torch_state(model: Sequential, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """The model's state under PyTorch's names and layouts, as NumPy arrays.

    Parameters
    ----------
    model : Sequential
        Of ``Linear``, ``Conv2d``, :class:`batchnorm.BatchNorm` and stateless layers.
    dtype : float dtype, optional
        Cast the float arrays to it (PyTorch models are float32 by default; ``load_state_dict``
        casts anyway).

    Returns
    -------
    state : dict of str to ndarray
        ``{"0.weight": ..., "1.running_var": ..., "1.num_batches_tracked": int64 scalar}``;
        ``torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})``
        loads it, and ``safetensors.numpy.save_file(state, path)`` writes a file that
        ``safetensors.torch.load_file`` reads.

    Raises
    ------
    ValueError
        Naming the first layer that has state but no PyTorch counterpart.
    """
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(model):
        mine = _torch_names(layer)
        if mine is None:
            raise ValueError(
                f"layer {i} ({_short(layer)}) has state but no PyTorch counterpart this mapping "
                "knows (Linear, Conv2d, BatchNorm, GroupNorm, LayerNorm)"
            )
        state = layer.state_dict() if mine else {}
        for theirs, (ours, _, kind) in mine.items():
            v = state[ours]
            if isinstance(layer, Linear) and theirs == "weight":
                v = v.T
            if kind == "f" and dtype is not None:
                v = v.astype(dtype)
            out[f"{i}.{theirs}"] = np.array(v, order="C")  # a copy, 0-d stays 0-d
    return out
