"""Batch Renormalization (Ioffe 2017): :class:`BatchRenorm`, its ramp schedule and helpers.

Batch normalization trains on the statistics of the batch and infers with the running averages;
with small or non-i.i.d. batches the two differ and the network learns to rely on the batch.
Batch Renormalization corrects the training output towards the running statistics with
``r = sigma_B / sigma`` and ``d = (mu_B - mu) / sigma``, clipped to ``[1/rmax, rmax]`` and
``[-dmax, dmax]`` and treated as constants in backward (Algorithm 1 of the paper). The
training step is :func:`batchnorm.functional.train_forward` with ``renorm=``; everything else
(running update, inference, masks, ghost batches, reducers) is :class:`~batchnorm.BatchNorm`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .backends import Backend
from .functional import check_renorm_bounds
from .layers import BatchNorm
from .reducers import Reducer

__all__ = ["BatchRenorm", "Ramp", "renorm_schedule"]

Bound = float | Callable[[int], float]


class Ramp:
    """A value that stays at `start` until step `begin`, then moves linearly to `end`, reached
    at step `stop` and kept after it.

    ``Ramp(start, end, begin, stop)(step)``; `step` is the number of training batches seen
    before the current one (``num_batches_tracked``). Saved with a layer (unlike an arbitrary
    function).

    Raises
    ------
    ValueError
        For ``stop < begin``, a negative step or a non-finite value.
    """

    def __init__(self, start: float, end: float, begin: int, stop: int) -> None:
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
                raise TypeError(f"expected {name} to be a float, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"expected a finite {name}, got {v}")
        for name, v in (("begin", begin), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"expected {name} to be an int, got {v!r}")
            if v < 0:
                raise ValueError(f"expected {name} >= 0, got {v}")
        if stop < begin:
            raise ValueError(f"expected stop >= begin, got begin={begin}, stop={stop}")
        self.start, self.end = float(start), float(end)
        self.begin, self.stop = int(begin), int(stop)

    def __call__(self, step: int) -> float:
        if step <= self.begin:
            return self.start
        if step >= self.stop:
            return self.end
        t = (step - self.begin) / (self.stop - self.begin)
        return self.start + t * (self.end - self.start)

    def to_config(self) -> list[float]:
        return [self.start, self.end, self.begin, self.stop]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ramp) and self.to_config() == other.to_config()

    def __hash__(self) -> int:
        return hash(tuple(self.to_config()))

    def __repr__(self) -> str:
        return f"Ramp({self.start}, {self.end}, begin={self.begin}, stop={self.stop})"


def renorm_schedule(
    *,
    warmup: int = 5000,
    rmax: float = 3.0,
    rmax_step: int = 40000,
    dmax: float = 5.0,
    dmax_step: int = 25000,
) -> tuple[Ramp, Ramp]:
    """The paper's schedule of ``(rmax, dmax)``, for ``BatchRenorm(C, rmax=..., dmax=...)``.

    Ioffe (2017), Section 4: ``rmax = 1`` and ``dmax = 0`` (batch normalization) for the first
    5000 training steps, then relaxed gradually to reach ``rmax = 3`` at step 40k and
    ``dmax = 5`` at step 25k. The paper does not say how; this ramp is linear.

    Parameters
    ----------
    warmup : int, default 5000
        Steps of plain batch normalization.
    rmax, rmax_step : float, int
        Final `rmax` and the step it is reached at.
    dmax, dmax_step : float, int
        Final `dmax` and the step it is reached at.

    Returns
    -------
    rmax, dmax : Ramp
        Callables of the number of batches seen.

    Examples
    --------
    >>> rmax, dmax = renorm_schedule(warmup=100, rmax_step=800, dmax_step=500)
    >>> layer = BatchRenorm(16, rmax=rmax, dmax=dmax)
    """
    return Ramp(1.0, rmax, warmup, rmax_step), Ramp(0.0, dmax, warmup, dmax_step)


def _check_bound(value: Any, name: str) -> Bound:
    if callable(value):
        _evaluate(value, name, 0)  # fail at construction rather than at the first forward
        return value
    return _evaluate(value, name, 0)


def _evaluate(bound: Bound, name: str, step: int) -> float:
    """The value of `bound` at `step`, checked: rmax >= 1, dmax >= 0."""
    v = bound(step) if callable(bound) else bound
    try:
        if name == "rmax":
            return check_renorm_bounds(v, 0.0)[0]
        return check_renorm_bounds(1.0, v)[1]
    except (TypeError, ValueError) as err:
        if not callable(bound):
            raise
        raise type(err)(f"{name}({step}) of {bound!r}: {err}") from None


def bound_to_config(bound: Bound, name: str) -> float | dict[str, list[float]]:
    """`rmax` or `dmax` as saved in a layer file: a float or ``{"ramp": [start, end, begin,
    stop]}``; a TypeError for another callable (it cannot be saved without pickle)."""
    if isinstance(bound, Ramp):
        return {"ramp": bound.to_config()}
    if callable(bound):
        raise TypeError(
            f"expected {name} to be a float or a batchnorm.renorm.Ramp to save the layer, got "
            f"{bound!r} (a function cannot be saved without pickle); nothing was written"
        )
    return float(bound)


def bound_from_config(value: Any, name: str) -> Bound:
    """The inverse of :func:`bound_to_config`."""
    if isinstance(value, dict):
        if set(value) != {"ramp"} or len(value["ramp"]) != 4:
            raise ValueError(f"expected {name} as a float or {{'ramp': [4 values]}}, got {value}")
        start, end, begin, stop = value["ramp"]
        return Ramp(start, end, int(begin), int(stop))
    return value


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017): batch normalization whose training output is
    corrected towards the running statistics.

    Parameters
    ----------
    num_features : int
    rmax : float >= 1 or callable, default 3.0
        Bound of ``r``: clipped to ``[1/rmax, rmax]``. A callable gets ``num_batches_tracked``
        (batches seen before this one) and returns the bound; :func:`renorm_schedule` gives
        the paper's ramp.
    dmax : float >= 0 or callable, default 5.0
        Bound of ``d``: clipped to ``[-dmax, dmax]``.
    axis, eps, momentum, affine, unbiased, dtype, backend, reducer, activation, reuse_outputs,
    virtual_batch_size
        As in :class:`~batchnorm.BatchNorm`; ``track_running_stats`` must stay True (the
        correction needs the running statistics).

    Notes
    -----
    In training, with the batch mean ``mu_B`` and biased variance ``var_B`` (over every
    process's batch with a reducer that communicates, over the masked-in values with a mask,
    per virtual batch with ``virtual_batch_size``)::

        sigma_B = sqrt(var_B + eps),   sigma = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1/rmax, rmax),   d = clip((mu_B - running_mean) / sigma,
                                                            -dmax, dmax)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    with the running statistics from before this step. ``r`` and ``d`` are constants in
    backward (the paper's stop-gradient). The running mean and variance are then updated as in
    :class:`~batchnorm.BatchNorm`, and inference is BatchNorm's. ``rmax=1, dmax=0`` gives
    BatchNorm's outputs, gradients and running statistics exactly.

    Differences from the paper and from Keras: the paper keeps a moving average of ``sigma``,
    this layer (like BatchNorm) one of the variance, so ``sigma = sqrt(running_var + eps)``;
    Keras's ``renorm=True`` keeps separate moving mean and standard deviation for ``r`` and
    ``d``, updated with ``renorm_momentum``.

    Raises
    ------
    TypeError, ValueError
        For a bad `rmax`/`dmax` (also when a callable returns one; the forward then changes
        nothing), ``track_running_stats=False`` and everything BatchNorm refuses.
    """

    def __init__(
        self,
        num_features: int,
        *,
        rmax: Bound = 3.0,
        dmax: Bound = 5.0,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.9,
        affine: bool = True,
        track_running_stats: bool = True,
        unbiased: bool = False,
        dtype: Any = np.float32,
        backend: str | Backend | None = None,
        reducer: Reducer | None = None,
        activation: str | None = None,
        reuse_outputs: bool = False,
        virtual_batch_size: int | None = None,
    ) -> None:
        if track_running_stats is not True:
            raise ValueError(
                "expected track_running_stats=True: Batch Renormalization corrects the batch "
                f"statistics towards the running ones, got {track_running_stats!r}"
            )
        rmax = _check_bound(rmax, "rmax")
        dmax = _check_bound(dmax, "dmax")
        super().__init__(
            num_features, axis=axis, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=True, unbiased=unbiased, dtype=dtype, backend=backend,
            reducer=reducer, activation=activation, reuse_outputs=reuse_outputs,
            virtual_batch_size=virtual_batch_size,
        )
        self.rmax = rmax
        self.dmax = dmax

    def current_bounds(self) -> tuple[float, float]:
        """``(rmax, dmax)`` for the next training step."""
        step = self.num_batches_tracked
        return _evaluate(self.rmax, "rmax", step), _evaluate(self.dmax, "dmax", step)

    def _renorm(self):
        rmax, dmax = self.current_bounds()
        return self.running_mean, self.running_var, rmax, dmax

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax!r}, dmax={self.dmax!r}"

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["rmax"] = bound_to_config(self.rmax, "rmax")
        config["dmax"] = bound_to_config(self.dmax, "dmax")
        return config
