"""After training: fold batch norm into the layer before it, and recompute the population
statistics (Ioffe & Szegedy 2015, Algorithm 2)."""

from __future__ import annotations

import copy
import itertools
import types
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..checks import normalize_axis
from ..fold import fold_batchnorm as _fold_arrays
from ..layers import BatchNorm
from .layers import Conv2d, Linear, ReLU

__all__ = ["fold_batchnorm", "recompute_batchnorm_stats"]

# Attributes whose values a copy of a model must share with the original rather than copy: the
# compute backend (compiled kernels), and the reducer and MPI communicator of SyncBatchNorm.
_SHARED_ATTRS = ("backend", "comm", "reducer")


def _walkable(obj: Any) -> bool:
    # User objects (layers, containers); not arrays, modules, classes or functions.
    return hasattr(obj, "__dict__") and not isinstance(
        obj, (type, types.ModuleType, types.FunctionType, types.MethodType, np.ndarray)
    )


def _walk(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """Every layer-like object reachable from `obj` (itself first), depth first, in attribute
    and list order, each once. Batch-norm layers are yielded but not entered."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        children: Iterable[Any] = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif _walkable(obj):
        yield obj
        if isinstance(obj, BatchNorm):
            return
        children = [v for k, v in vars(obj).items() if k not in _SHARED_ATTRS]
    else:
        return
    for child in children:
        yield from _walk(child, seen)


def _copy_model(model: Any) -> Any:
    """A deep copy of `model` that shares the backends and communicators of its layers."""
    memo: dict[int, Any] = {}
    for obj in _walk(model):
        for name in _SHARED_ATTRS:
            value = getattr(obj, name, None)
            if value is not None and not isinstance(value, (str, np.ndarray)):
                memo[id(value)] = value
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------
# folding


def _why_not_foldable(prev: Any, bn: BatchNorm) -> str | None:
    """Why `bn` cannot be folded into `prev` (None when it can)."""
    if type(prev) is Linear:
        ndim, features, what = 2, prev.out_features, "out_features"
    elif type(prev) is Conv2d:
        ndim, features, what = 4, prev.out_channels, "out_channels"
    else:
        return "it is not directly preceded by a Linear or Conv2d layer"
    if not bn.track_running_stats:
        return ("it normalises with batch statistics in eval mode too "
                "(track_running_stats=False), which no fixed weights can do")
    try:
        axis = normalize_axis(bn.axis, ndim)
    except ValueError:
        axis = None
    if axis != 1:
        return (f"its axis {bn.axis} is not the feature axis 1 of the {ndim}-D output of "
                f"{type(prev).__name__}")
    if bn.num_features != features:
        return (f"its num_features {bn.num_features} differs from {type(prev).__name__}'s "
                f"{what} {features}")
    return None


def _folded(prev: Linear | Conv2d, bn: BatchNorm) -> Linear | Conv2d:
    """A new layer computing ``bn(prev(x))`` in eval mode."""
    dtype = prev.W.dtype
    if type(prev) is Linear:
        # batchnorm.nn.Linear computes x @ W + b: W is (in, out), the outputs on axis 1.
        w, b = _fold_arrays(prev.W, prev.b, bn.running_mean, bn.running_var, bn.gamma, bn.beta,
                            bn.eps, out_axis=1)
        new: Linear | Conv2d = Linear(prev.in_features, prev.out_features, weight=w, dtype=dtype)
    else:
        # Conv2d keeps (out_channels, in_channels, k, k).
        w, b = _fold_arrays(prev.W, prev.b, bn.running_mean, bn.running_var, bn.gamma, bn.beta,
                            bn.eps, out_axis=0)
        new = Conv2d(prev.in_channels, prev.out_channels, prev.kernel_size, stride=prev.stride,
                     pad=prev.pad, weight=w, dtype=dtype)
    new.b[...] = b
    return new


def _fold_layers(container: Any, strict: bool, path: str) -> None:
    layers = container.layers
    out: list[Any] = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "layers") and isinstance(layer.layers, list):
            _fold_layers(layer, strict, f"{path}{i}.")
        if isinstance(layer, BatchNorm):
            prev = out[-1] if out else None
            reason = _why_not_foldable(prev, layer)
            if reason is None:
                out[-1] = _folded(prev, layer)
                if layer.activation == "relu":  # the fused ReLU stays, as its own layer
                    out.append(ReLU())
                continue
            if strict:
                raise ValueError(f"cannot fold layer {path}{i} ({layer!r}): {reason}")
        out.append(layer)
    container.layers = out


def fold_batchnorm(model: Any, *, strict: bool = False) -> Any:
    """A copy of `model` for inference, with each batch norm folded into the layer before it.

    Every :class:`~batchnorm.nn.Linear` or :class:`~batchnorm.nn.Conv2d` directly followed by a
    :class:`~batchnorm.BatchNorm` (or ``SyncBatchNorm``) over its output features becomes one
    layer of the same kind whose weights are those of both (see
    :func:`batchnorm.fold_batchnorm`). In eval mode the new model computes what `model`
    computes in eval mode, up to the round-off of the weights' dtype.

    Parameters
    ----------
    model : Sequential
        A toolkit :class:`~batchnorm.nn.Sequential` (nested ones are folded too), or any
        object with a ``layers`` list of toolkit layers.
    strict : bool, default False
        Raise when a batch-norm layer cannot be folded, instead of keeping it.

    Returns
    -------
    model
        A new model (a deep copy: no array is shared with `model`, which is left unchanged), in
        eval mode. It is meant for inference: the folded layers no longer normalise with batch
        statistics, so training it is not training the original network.

    Raises
    ------
    TypeError
        When `model` has no ``layers`` list.
    ValueError
        With ``strict=True``, for the first batch-norm layer that cannot be folded, naming it
        and saying why: not directly after a ``Linear``/``Conv2d``; its axis is not the
        layer's output feature axis (axis 1 of ``Linear``'s (N, out) and ``Conv2d``'s
        (N, C, H, W) output) or its size differs; or ``track_running_stats=False``. Also for a
        running variance with ``running_var + eps <= 0``. `model` is unchanged in every case.

    Notes
    -----
    A batch norm is folded with its ``running_mean`` and ``running_var`` exactly as its eval
    mode uses them (whatever its ``unbiased`` flag), its ``gamma``, ``beta`` and ``eps``.
    Layers that are not folded (and their mode) are kept as copies. Only exact ``Linear`` and
    ``Conv2d`` instances are folded into, not subclasses, which may compute something else.
    A batch norm with a fused activation (``activation="relu"``) becomes the folded layer
    followed by a toolkit ``ReLU``.
    """
    if not (hasattr(model, "layers") and isinstance(model.layers, list)):
        raise TypeError(
            f"expected a Sequential (an object with a 'layers' list), got {type(model).__name__}"
        )
    new = _copy_model(model)
    _fold_layers(new, strict, "")
    if callable(getattr(new, "eval", None)):
        new.eval()
    else:
        for layer in new.layers:
            if callable(getattr(layer, "eval", None)):
                layer.eval()
    return new


# ---------------------------------------------------------------------------------------------
# population statistics


def _forward(model: Any, x: Any) -> Any:
    forward = getattr(model, "forward", None)
    return forward(x) if callable(forward) else model(x)


def recompute_batchnorm_stats(
    model: Any, batches: Iterable[Any], *, num_batches: int | None = None
) -> int:
    """Set the running statistics of every batch norm of `model` to the population estimates
    of Ioffe & Szegedy (2015, Algorithm 2) over `batches`.

    The model runs forward on each batch with its batch-norm layers normalising with batch
    statistics (training mode) and every other layer in eval mode; no parameter changes. Then
    each layer's ``running_mean`` is the count-weighted mean of its batch means and its
    ``running_var`` the pooled within-batch variance (Notes).

    Parameters
    ----------
    model : Sequential, a layer, or an object holding layers
        Walked recursively (attributes, lists, tuples, dicts) for :class:`~batchnorm.BatchNorm`
        and ``SyncBatchNorm`` layers. Those with ``track_running_stats=False`` have no running
        statistics, and frozen ones (:meth:`~batchnorm.BatchNorm.freeze`) normalise with their
        running statistics in training mode too and keep them: both are left alone.
    batches : iterable
        Input arrays, or ``(x, y, ...)`` tuples or lists, of which ``x`` is taken (a data
        loader that yields inputs and labels works as is). Read once, in order.
    num_batches : int, optional
        Use at most this many batches (default: all of them).

    Returns
    -------
    int
        The number of batches used.

    Raises
    ------
    TypeError, ValueError
        For `num_batches` not an int >= 1, for no batch at all, and whatever a forward pass
        raises (e.g. a batch with one value per feature). Nothing is changed then.

    Notes
    -----
    The forward passes run on a copy of `model`: `model` itself (its modes, parameters, the
    caches of its last forward) changes only at the end, when the estimates of every layer are
    copied into its ``running_mean`` and ``running_var`` arrays (in place, so objects sharing
    them see the new values) and ``num_batches_tracked`` is set to the number of batches the
    layer saw. A failed call changes nothing.

    With ``n_k`` values per feature in batch ``k`` (batch size times positions), batch mean
    ``mu_k`` and biased batch variance ``v_k`` (what the layer normalised with), over the ``K``
    batches a layer saw::

        running_mean = sum_k n_k mu_k / sum_k n_k
        running_var  = sum_k n_k v_k / sum_k (n_k - 1)      layers with unbiased=True
        running_var  = sum_k n_k v_k / sum_k n_k            layers with unbiased=False

    With equal batches (``n_k = m``) the first two are exactly Algorithm 2: the mean of the
    batch means and ``m/(m-1)`` times the mean of the batch variances. For unequal batches the
    unbiased variance is the pooled within-batch variance (each batch's unbiased variance
    weighted by its ``n_k - 1``). A layer with ``unbiased=False`` stores biased variances in
    ``running_var`` everywhere else too, and its eval mode uses ``running_var`` as is, so it
    gets the same estimate without the ``m/(m-1)`` factor: with equal batches, what a reset
    layer with ``momentum=None`` (the cumulative average) would hold after these batches.

    The variance is that of the values within a batch, not of the whole data set: the layer
    was trained normalising each batch by its own statistics, and Algorithm 2 keeps that.

    Under MPI a ``SyncBatchNorm`` normalises with the statistics of the global batch (all
    ranks' shards), so the estimates are over all ranks' batches and identical on every rank.
    Every rank must call this function with the same number of batches.

    PyTorch's ``torch.optim.swa_utils.update_bn`` instead resets the layers and runs them with
    ``momentum=None``: the unweighted mean of the batch means and of the unbiased batch
    variances, with the whole model (dropout too) in training mode.
    """
    if num_batches is not None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)):
            raise TypeError(f"expected num_batches to be an int or None, got {num_batches!r}")
        if num_batches < 1:
            raise ValueError(f"expected num_batches >= 1, got {num_batches}")
    layers = [obj for obj in _walk(model) if isinstance(obj, BatchNorm)]
    work = _copy_model(model)
    work_layers = [obj for obj in _walk(work) if isinstance(obj, BatchNorm)]
    if len(work_layers) != len(layers):  # pragma: no cover - a deep copy keeps the structure
        raise RuntimeError(f"the copy of the model has {len(work_layers)} batch-norm layers, "
                           f"expected {len(layers)}")
    # Every other layer in eval mode (containers first: Sequential.train sets its children),
    # then the batch norms in training mode.
    for obj in _walk(work):
        if not isinstance(obj, BatchNorm) and callable(getattr(obj, "train", None)) and hasattr(
            obj, "training"
        ):
            obj.train(False)
    for bn in work_layers:
        bn.train(True)

    c_of = [bn.num_features for bn in work_layers]
    total = [0 for _ in work_layers]  # sum_k n_k
    sum_mean = [np.zeros(c) for c in c_of]  # sum_k n_k mu_k
    sum_m2 = [np.zeros(c) for c in c_of]  # sum_k n_k v_k
    seen = [0 for _ in work_layers]  # K
    used = 0
    stop = None if num_batches is None else int(num_batches)
    for item in itertools.islice(batches, stop):
        x = item[0] if isinstance(item, (tuple, list)) else item
        for bn in work_layers:
            bn._cache = None
        _forward(work, x)
        for k, bn in enumerate(work_layers):
            cache = bn._cache
            if cache is None or not cache.training or not bn.track_running_stats:
                # The layer did not run on this batch, normalised with its running statistics
                # (frozen), or keeps no statistics.
                continue
            n = int(cache.count)
            total[k] += n
            sum_mean[k] += n * np.asarray(cache.mean, dtype=np.float64)
            sum_m2[k] += n * np.asarray(cache.var, dtype=np.float64)
            seen[k] += 1
        used += 1
    if used == 0:
        raise ValueError("expected at least one batch, got an empty iterable; nothing changed")

    # All estimates first, then commit: nothing is half-updated.
    updates = []
    for k, bn in enumerate(layers):
        if not bn.track_running_stats or seen[k] == 0:
            continue
        mean = sum_mean[k] / total[k]
        denom = total[k] - seen[k] if bn.unbiased else total[k]
        var = sum_m2[k] / denom
        updates.append((bn, mean.astype(bn.running_mean.dtype), var.astype(bn.running_var.dtype),
                        seen[k]))
    for bn, mean, var, count in updates:
        np.copyto(bn.running_mean, mean)
        np.copyto(bn.running_var, var)
        bn.num_batches_tracked = count
    return used
