"""Stateful layers: they hold parameters, running statistics and the last forward's cache, and
leave all arithmetic to :mod:`batchnorm.functional`.

A call that raises changes nothing: every layer computes into locals first and only then
assigns its new state.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np

from . import functional as F
from .backends import Backend, get_backend
from .checks import (
    check_bool,
    check_dy,
    check_eps,
    check_input,
    check_int,
    check_mask,
    check_momentum,
    check_state_vector,
    compute_dtype,
)
from .io import save_layer
from .reducers import LOCAL, Reducer

# num_batches_tracked is stored as int64.
_MAX_BATCHES_TRACKED = 2**63 - 1

__all__ = ["BatchNorm", "BatchNormalization"]


def _float_vector(v, name: str, size: int) -> np.ndarray:
    """A running statistic given to the book layer: a float array of `size` finite values."""
    v = np.asarray(v)
    if v.dtype.type not in (np.float16, np.float32, np.float64):
        raise TypeError(
            f"expected {name} of dtype float16, float32 or float64, got {v.dtype} (an integer "
            "array would truncate the running averages)"
        )
    if v.size != size:
        raise ValueError(f"expected {name} with {size} values (gamma's size), got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"expected finite {name}, got {v.ravel()[~np.isfinite(v.ravel())][:4]}")
    if name == "running_var" and (v < 0).any():
        raise ValueError(f"expected running_var >= 0, got min {v.min()}")
    return v


def _check_writeable(layer, names: tuple[str, ...]) -> None:
    """The arrays a training step writes must be writeable, checked before anything changes."""
    for name in names:
        if not getattr(layer, name).flags.writeable:
            raise ValueError(
                f"expected a writeable {name} (a training step updates it in place), got a "
                "read-only array; nothing was updated"
            )


# ---------------------------------------------------------------------------------------------
# the book's interface, fixed


class BatchNormalization:
    """The layer of the book "Deep Learning from Scratch", with its interface, fixed.

    Parameters
    ----------
    gamma, beta : ndarray of shape (D,)
        Scale and shift. The layer keeps these very arrays, so an optimiser that updates them
        in place (``params["gamma1"] -= lr * grads["gamma1"]``) changes what it computes.
    momentum : float, default 0.9
        Weight of the OLD running value: ``running = momentum * running + (1 - momentum) * stat``.
    running_mean, running_var : ndarray of shape (D,) or None
        Created on the first forward as zeros and ones (in ``gamma``'s dtype) when None.
    eps : float, default 1e-6
        The book writes ``10e-7``, which is 1e-6.
    backend : {"auto", "numpy", "numba"} or None

    Notes
    -----
    ``x`` of shape (N, D) normalises each of the D features. For (N, C, *spatial) input the size
    of ``gamma`` decides: C values normalise per channel over (N, *spatial); ``C*H*W`` values
    normalise per activation, as the book does by flattening the input to (N, C*H*W).

    A training batch with one value per feature gives a UserWarning (its variance is 0, so the
    output is ``beta`` and ``dx`` is 0); the book's own gradient check runs one.

    After ``forward(x, train_flg=False)``, ``backward`` gives the gradient of the inference
    transform (the layer frozen) and still sets ``dgamma`` and ``dbeta``.
    """

    def __init__(
        self,
        gamma: np.ndarray,
        beta: np.ndarray,
        momentum: float = 0.9,
        running_mean: np.ndarray | None = None,
        running_var: np.ndarray | None = None,
        eps: float = 1e-6,
        *,
        backend: str | Backend | None = None,
    ) -> None:
        gamma = gamma if isinstance(gamma, np.ndarray) else np.asarray(gamma, dtype=np.float64)
        beta = beta if isinstance(beta, np.ndarray) else np.asarray(beta, dtype=np.float64)
        compute_dtype(gamma.dtype, "gamma")
        compute_dtype(beta.dtype, "beta")
        if gamma.size != beta.size:
            raise ValueError(
                f"expected gamma and beta of the same size, got {gamma.shape} and {beta.shape}"
            )
        self.momentum = check_momentum(momentum, allow_none=False)
        self.eps = check_eps(eps)
        size = gamma.size
        if running_mean is not None:
            running_mean = _float_vector(running_mean, "running_mean", size)
        if running_var is not None:
            running_var = _float_vector(running_var, "running_var", size)
        self.gamma = gamma
        self.beta = beta
        self.running_mean = running_mean
        self.running_var = running_var
        self.backend = get_backend(backend)
        self.dgamma: np.ndarray | None = None
        self.dbeta: np.ndarray | None = None
        self._cache: F.BatchNormCache | None = None

    def _layout(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """``x`` (reshaped for the per-activation mode) and its feature axis."""
        if type(x) is not np.ndarray:
            x = np.asarray(x)
        compute_dtype(x.dtype)
        size = self.gamma.size
        if self.beta.size != size:
            raise ValueError(
                f"expected beta with {size} values (gamma's size), got shape {self.beta.shape}"
            )
        for name in ("running_mean", "running_var"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, np.ndarray) or v.size != size:
                    got = f"shape {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
                    raise ValueError(
                        f"expected {name} with {size} values (gamma's size), got {got}"
                    )
                compute_dtype(v.dtype, name)
        if x.ndim == 2:
            if x.shape[1] != size:
                raise ValueError(
                    f"expected x of shape (N, {size}) for gamma of shape {self.gamma.shape}, "
                    f"got {x.shape}"
                )
            return x, 1
        if not 3 <= x.ndim <= 5:
            raise ValueError(
                f"expected input with 2 to 5 dims, got {x.ndim}-D of shape {x.shape}"
            )
        if x.shape[1] == size:
            return x, 1
        if math.prod(x.shape[1:]) == size:
            return x.reshape(x.shape[0], size), 1
        raise ValueError(
            f"gamma of shape {self.gamma.shape} fits neither per-channel nor per-activation "
            f"normalisation of x with shape {x.shape}: expected {x.shape[1]} "
            f"or {math.prod(x.shape[1:])} values"
        )

    def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
        """Normalise `x`: batch statistics when `train_flg`, running statistics otherwise.

        Parameters
        ----------
        x : ndarray of shape (N, D) or (N, C, *spatial) with 1 to 3 spatial dims
        train_flg : bool, default True

        Returns
        -------
        out : ndarray, same shape and dtype as `x`
        """
        x2, axis = self._layout(x)
        size = self.gamma.size
        gamma = self.gamma.reshape(size)
        beta = self.beta.reshape(size)
        dtype = self.gamma.dtype
        rmean = np.zeros(size, dtype) if self.running_mean is None else self.running_mean
        rvar = np.ones(size, dtype) if self.running_var is None else self.running_var
        if train_flg:
            if self.running_mean is not None and self.running_var is not None:
                _check_writeable(self, ("running_mean", "running_var"))
            out, cache = F.train_forward(
                x2, axis, gamma, beta, self.eps, self.backend, check_finite=True
            )
            if cache.count == 1:
                warnings.warn(
                    f"training batch of shape {np.shape(x)} has one value per feature: its "
                    "variance is 0, the output is beta and dx is 0",
                    UserWarning,
                    stacklevel=2,
                )
            new_mean, new_var, fits = F.running_step(
                rmean.reshape(size), rvar.reshape(size), cache.mean, cache.var, cache.count,
                momentum=self.momentum, num_batches_tracked=1, backend=self.backend,
            )
            if not fits:
                raise _overflow_error(new_var, rmean.dtype)
        else:
            out, cache = F.inference_forward(
                x2, axis, gamma, beta, rmean.reshape(size), rvar.reshape(size), self.eps,
                self.backend,
            )
        # Nothing above changed the layer; now commit.
        self.running_mean, self.running_var = rmean, rvar
        if train_flg:
            np.copyto(rmean, new_mean.reshape(rmean.shape))
            np.copyto(rvar, new_var.reshape(rvar.shape))
        self._cache = cache
        self._input_shape = np.shape(x)
        return out.reshape(self._input_shape)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Gradient with respect to the last forward's input; sets `dgamma` and `dbeta`.

        Parameters
        ----------
        dout : ndarray, same shape as the last forward's `x`

        Returns
        -------
        dx : ndarray, same shape and dtype as the last forward's `x`
        """
        if self._cache is None:
            raise RuntimeError(
                "backward called before forward: expected a forward call first (each forward "
                "allows one backward, which releases what the forward kept)"
            )
        dout = check_dy(dout, self._input_shape, "dout")
        dx, dgamma, dbeta = F.backward(dout.reshape(self._cache.shape), self._cache)
        self.dgamma = dgamma.astype(self.gamma.dtype).reshape(self.gamma.shape)
        self.dbeta = dbeta.astype(self.beta.dtype).reshape(self.beta.shape)
        self._cache = None  # release the input it kept
        return dx.reshape(self._input_shape)

    def __repr__(self) -> str:
        return (
            f"BatchNormalization(features={self.gamma.size}, momentum={self.momentum}, "
            f"eps={self.eps}, backend={self.backend.name!r})"
        )


# ---------------------------------------------------------------------------------------------
# the modern layer


def _overflow_error(new_var: np.ndarray, dtype: np.dtype) -> ValueError:
    """New running statistics that do not fit the running statistics' dtype (float16, or
    float32 for data near 1e20): the step raises and changes nothing."""
    finite = new_var[np.isfinite(new_var)]
    return ValueError(
        f"expected new running statistics that fit {np.dtype(dtype).name}, got a running "
        f"mean or variance that overflows it (finite running variances up to "
        f"{float(finite.max(initial=0)):.3g}); use a wider dtype for the layer; nothing was "
        "updated"
    )


class _NormBase:
    """Parameters, running statistics, reset, repr and (de)serialisation."""

    def __init__(
        self,
        num_features: int,
        *,
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
        self.num_features = check_int(num_features, "num_features", 1)
        if virtual_batch_size is not None:
            virtual_batch_size = check_int(virtual_batch_size, "virtual_batch_size", 1)
            if reducer is not None and not reducer.local:
                raise ValueError(
                    "expected virtual_batch_size=None with a reducer that communicates: "
                    "virtual batches are parts of this process's batch, got "
                    f"virtual_batch_size={virtual_batch_size} and {reducer!r}"
                )
        self.virtual_batch_size = virtual_batch_size
        self.activation = activation
        self.reuse_outputs = check_bool(reuse_outputs, "reuse_outputs")
        self._y_buf: np.ndarray | None = None
        self._dx_buf: np.ndarray | None = None
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"expected axis to be an int, got {axis!r}")
        self.axis = int(axis)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = check_bool(affine, "affine")
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats")
        self.unbiased = check_bool(unbiased, "unbiased")
        dtype = np.dtype(dtype)
        compute_dtype(dtype, "dtype")
        self.dtype = dtype
        self.backend = get_backend(backend)
        self.reducer = LOCAL if reducer is None else reducer
        self.training = True
        self.frozen = False
        self.trainable_affine = True
        c = self.num_features
        self.gamma = np.ones(c, dtype) if self.affine else None
        self.beta = np.zeros(c, dtype) if self.affine else None
        self.dgamma: np.ndarray | None = None
        self.dbeta: np.ndarray | None = None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, dtype)
            self.running_var = np.ones(c, dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self._cache: F.BatchNormCache | None = None

    @property
    def activation(self) -> str | None:
        """The activation fused into the layer: None or ``"relu"`` (settable; a forward already
        made keeps the activation it was made with, for its backward)."""
        return self._activation

    @activation.setter
    def activation(self, value: str | None) -> None:
        self._activation = F.check_activation(value)

    def _buffer(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype, *reads
    ) -> np.ndarray | None:
        """The layer's output array `name` for this call with ``reuse_outputs`` (None without):
        the previous call's when it fits and shares no memory with the arrays the call reads,
        else a new one, kept for the next call."""
        if not self.reuse_outputs:
            return None
        buf = getattr(self, name)
        if (
            buf is None or buf.shape != shape or buf.dtype != dtype
            or any(r is not None and F._overlap(buf, r) for r in reads)
        ):
            buf = np.empty(shape, dtype)
            setattr(self, name, buf)
        return buf

    # mode ------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Training mode (batch statistics, running averages updated). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Inference mode (running statistics). Returns self."""
        return self.train(False)

    def freeze(self, trainable_affine: bool = False):
        """Freeze the layer for fine-tuning (torchvision's ``FrozenBatchNorm2d``). Returns self.

        A frozen layer normalises with its running statistics in training mode too and never
        updates them; its backward is the gradient of that fixed transform. ``gamma`` and
        ``beta`` leave :attr:`params` (so optimisers stop updating them) unless
        `trainable_affine`. The frozen state is saved with the layer.

        Raises
        ------
        ValueError
            For a layer without running statistics (``track_running_stats=False``).
        """
        trainable_affine = check_bool(trainable_affine, "trainable_affine")
        if not self.track_running_stats:
            raise ValueError(
                "expected a layer with running statistics to freeze, got "
                "track_running_stats=False"
            )
        self.frozen = True
        self.trainable_affine = trainable_affine
        return self

    def unfreeze(self):
        """Undo :meth:`freeze`: batch statistics in training mode again. Returns self."""
        self.frozen = False
        self.trainable_affine = True
        return self

    # parameters ------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """The learnable arrays by name, for optimisers that update them in place (none for a
        layer without affine, or frozen without ``trainable_affine``)."""
        if not self.affine or (self.frozen and not self.trainable_affine):
            return {}
        return {"gamma": self.gamma, "beta": self.beta}

    @property
    def grads(self) -> dict[str, np.ndarray | None]:
        """Gradients from the last backward, keyed as `params`."""
        if not self.affine or (self.frozen and not self.trainable_affine):
            return {}
        return {"gamma": self.dgamma, "beta": self.dbeta}

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics, gamma to 1 and beta to 0."""
        self.reset_running_stats()
        if self.affine:
            self.gamma.fill(1)
            self.beta.fill(0)

    def extra_repr(self) -> str:
        extra = "" if self.activation is None else f", activation={self.activation!r}"
        if self.reuse_outputs:
            extra += ", reuse_outputs=True"
        if self.virtual_batch_size is not None:
            extra += f", virtual_batch_size={self.virtual_batch_size}"
        return (
            f"{self.num_features}, axis={self.axis}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"unbiased={self.unbiased}, dtype={self.dtype.name}, backend={self.backend.name!r}"
            f"{extra}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    # state -----------------------------------------------------------------------------------
    def _state_keys(self) -> tuple[str, ...]:
        keys = ("gamma", "beta") if self.affine else ()
        if self.track_running_stats:
            keys += ("running_mean", "running_var", "num_batches_tracked")
        return keys

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the layer's arrays: ``gamma, beta, running_mean, running_var,
        num_batches_tracked`` (those the layer has)."""
        out = {}
        for k in self._state_keys():
            v = getattr(self, k)
            if k == "num_batches_tracked":
                # The count saturates at the int64 maximum (after a loaded near-maximal count),
                # so that every state can be saved and loaded again; 1/count is 0 either way.
                out[k] = np.array(min(v, _MAX_BATCHES_TRACKED), dtype=np.int64)
            else:
                out[k] = v.copy()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy `state` into the layer after checking every name, shape and dtype.

        Float arrays of any float dtype are cast to the layer's dtype; ``num_batches_tracked``
        must be an integer scalar that fits int64, ``[0, 2**63 - 1]``.

        Raises
        ------
        KeyError
            For missing or unexpected names.
        TypeError
            For a non-float array or a non-integer ``num_batches_tracked``.
        ValueError
            For a wrong shape, values that are not finite in the layer's dtype, a negative
            variance or ``num_batches_tracked`` out of range. Nothing is changed then.
        """
        self._commit_state(self._check_state(state))

    def _check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The new state, checked and cast, from `state` (see `load_state_dict`); changes
        nothing."""
        expected = set(self._state_keys())
        got = set(state)
        if got != expected:
            raise KeyError(
                f"state_dict keys do not match: missing {sorted(expected - got)}, "
                f"unexpected {sorted(got - expected)}"
            )
        new = {}
        for k in self._state_keys():
            v = np.asarray(state[k])
            if k == "num_batches_tracked":
                if v.shape != () or not np.issubdtype(v.dtype, np.integer):
                    raise TypeError(
                        f"expected num_batches_tracked to be an integer scalar, "
                        f"got {v.dtype} of shape {v.shape}"
                    )
                n = int(v)
                if not 0 <= n <= _MAX_BATCHES_TRACKED:
                    raise ValueError(
                        f"expected num_batches_tracked in [0, 2**63 - 1] (int64), got {n}"
                    )
                new[k] = n
                continue
            if v.dtype.type not in (np.float16, np.float32, np.float64):
                raise TypeError(f"expected {k} of a float dtype, got {v.dtype}")
            if v.shape != (self.num_features,):
                raise ValueError(f"expected {k} of shape ({self.num_features},), got {v.shape}")
            with np.errstate(over="ignore"):
                cast = v.astype(self.dtype)
            if not np.isfinite(cast).all():
                raise ValueError(
                    f"expected finite {k} that fits {self.dtype.name}, got {v.dtype} values "
                    f"with min {v.min()} and max {v.max()}"
                )
            if k == "running_var" and (cast < 0).any():
                raise ValueError(f"expected running_var >= 0, got min {v.min()}")
            new[k] = cast
        return new

    def _commit_state(self, new: dict[str, Any]) -> None:
        for k, v in new.items():
            if k == "num_batches_tracked":
                self.num_batches_tracked = v
            else:
                np.copyto(getattr(self, k), v, casting="unsafe")

    def _config(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "num_features": self.num_features,
            "axis": self.axis,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "unbiased": self.unbiased,
            "dtype": self.dtype.name,
            "frozen": self.frozen,
            "trainable_affine": self.trainable_affine,
            "activation": self.activation,
            "virtual_batch_size": self.virtual_batch_size,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the configuration and state to `path`, atomically and without pickle.

        ``*.safetensors`` writes a safetensors file (the ``io`` extra), any other name an
        ``.npz`` archive; :func:`batchnorm.load` reads both. See :mod:`batchnorm.io`.

        Raises
        ------
        OSError
            When writing fails; a file already at `path` is then unchanged.
        ImportError
            For ``.safetensors`` without the ``safetensors`` package.
        """
        save_layer(self, path)


class BatchNorm(_NormBase):
    """Batch normalization over any layout: the modern layer.

    Parameters
    ----------
    num_features : int
        Size ``C`` of the feature axis.
    axis : int, default 1
        The feature axis of the input; ``-1`` for channels-last. Every other axis is reduced.
    eps : float, default 1e-5
    momentum : float in [0, 1] or None, default 0.9
        Weight of the OLD running value (the book's, Keras', Flax's and Chainer's convention;
        PyTorch's ``momentum=m`` is ours ``1 - m``). None: cumulative average of all batches.
    affine : bool, default True
        Learnable ``gamma`` (ones) and ``beta`` (zeros).
    track_running_stats : bool, default True
        False: no running statistics; batch statistics in eval mode too.
    unbiased : bool, default False
        Store the ``M/(M-1)``-corrected batch variance in ``running_var`` (as PyTorch does).
    dtype : float16, float32 or float64, default float32
        Of parameters and running statistics.
    backend : {"auto", "numpy", "numba"} or None
    activation : {None, "relu"}, default None
        ``"relu"``: the layer is batch norm followed by a ReLU, fused: the forward writes
        ``max(y, 0)`` in its normalize pass and the backward applies the ReLU's mask inside its
        own passes (no separate ReLU pass, no intermediate array). The same values as
        ``BatchNorm`` followed by ``ReLU``, in every mode (training, eval, frozen).
    reuse_outputs : bool, default False
        Write every forward's output into the same array (and every backward's ``dx`` into
        another one) instead of a new array per call, which saves the page faults of fresh
        memory on large inputs. Aliasing: the array a call returns is overwritten by the next
        call (a forward's by the next forward, a backward's by the next backward), so copy
        what you keep; and with an activation the backward reads the forward's output, which
        must not be changed before it. A new array is taken when the shape or dtype changes or
        the input shares memory with the kept array.
    reducer : Reducer or None
        Where training statistics are combined (:mod:`batchnorm.reducers`); None: this batch.
    virtual_batch_size : int or None, default None
        Ghost batch normalization (Hoffer, Hubara & Soudry 2017): in training, axis 0 is cut
        into consecutive virtual batches of this many samples, each normalised with its own
        statistics (see :func:`batchnorm.functional.ghost_chunks` for the last one). The
        running statistics are updated once per call with the average of the virtual
        batches' means and of their variances (tf.keras 2's convention; with ``unbiased``
        each variance is corrected by its own ``n_k/(n_k-1)`` first). Eval mode is unchanged.
        Needs a local reducer and a feature axis other than 0.

    Notes
    -----
    Input ``x`` of any shape with ``x.shape[axis] == num_features`` and at least 2 dims:
    (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W), or channels-last with ``axis=-1``.

    Training batches with NaN or Inf raise ValueError and change nothing; in eval mode
    non-finite values pass through to the output elementwise.

    ``forward(x, mask)`` restricts the batch statistics (and so the running statistics) to the
    values where the boolean `mask` is True, as Flax's ``BatchNorm(mask=...)`` does; the output
    is computed everywhere. In eval mode the running statistics are used and the mask is
    checked but has no effect.
    """

    def __call__(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        return self.forward(x, mask)

    def _check_input(self, x) -> tuple[np.ndarray, int]:
        """`x` and its feature axis; the public arrays (which a user may have replaced) still
        fit `num_features`."""
        x, ax = check_input(x, self.axis)
        c = self.num_features
        if x.shape[ax] != c:
            raise ValueError(
                f"expected x.shape[{self.axis}] == num_features == {c}, got x of shape {x.shape}"
            )
        if self.affine:
            check_state_vector(self.gamma, "gamma", c, "num_features")
            check_state_vector(self.beta, "beta", c, "num_features")
        if self.track_running_stats:
            check_state_vector(self.running_mean, "running_mean", c, "num_features")
            check_state_vector(self.running_var, "running_var", c, "num_features")
        return x, ax

    def _renorm(self) -> tuple[np.ndarray, np.ndarray, float, float] | None:
        """Batch Renormalization's ``(running_mean, running_var, rmax, dmax)`` for this training
        step (see :class:`batchnorm.BatchRenorm`); None: batch normalization."""
        return None

    def _ghost_size(self, ax: int) -> int | None:
        v = self.virtual_batch_size
        if v is None:
            return None
        if ax == 0:
            raise ValueError(
                "expected a feature axis other than 0 with virtual_batch_size: virtual batches "
                f"cut axis 0, the batch axis; got axis={self.axis}"
            )
        if not self.reducer.local:
            raise ValueError(
                f"expected a local reducer with virtual_batch_size={v}, got {self.reducer!r}"
            )
        return v

    # forward / backward ----------------------------------------------------------------------
    def forward(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Normalise `x`.

        Parameters
        ----------
        x : ndarray with ``x.shape[axis] == num_features``
        mask : bool ndarray of x's shape without the feature axis, or None
            True marks the values the batch statistics cover (``(N, L)`` for ``(N, C, L)``
            input, say; also accepted: x's dims with size 1 on the feature axis,
            broadcastable to x). The output is computed at every position. None: all values.

        Returns
        -------
        y : ndarray, same shape and dtype as `x`

        Raises
        ------
        TypeError
            For a non-float `x` or a non-bool `mask`.
        ValueError
            For fewer than 2 dims, an axis out of range, a feature-size mismatch, a mask of the
            wrong shape, a training batch (or virtual batch) with fewer than 2 values per
            feature (masked-in values with a mask), non-finite values in a training batch,
            new running statistics that overflow the layer's dtype, or read-only running
            statistics in training. Nothing changes when it raises.
        """
        training = self.training and not self.frozen
        update = training and self.track_running_stats
        reducer = self.reducer if training else LOCAL
        with reducer.guard("forward"):
            x, ax = self._check_input(x)
            if mask is not None:
                mask = check_mask(mask, x.shape, ax)
            if update:
                _check_writeable(self, ("running_mean", "running_var"))
            ghost = self._ghost_size(ax) if training else None
            renorm = self._renorm() if training else None
        out = self._buffer("_y_buf", x.shape, x.dtype, x)
        if training or not self.track_running_stats:
            kw = dict(min_count=2 if training else 1, check_finite=training,
                      axis_label=self.axis, activation=self.activation, out=out, mask=mask,
                      renorm=renorm)
            if ghost is None:
                y, cache = F.train_forward(
                    x, ax, self.gamma, self.beta, self.eps, self.backend, reducer, **kw
                )
            else:
                y, cache = F.ghost_train_forward(
                    x, ax, self.gamma, self.beta, self.eps, self.backend, ghost, **kw
                )
        else:
            # This backward reads x only for dgamma: keep none when no gamma gradient is wanted.
            y, cache = F.inference_forward(
                x, ax, self.gamma, self.beta, self.running_mean, self.running_var, self.eps,
                self.backend, activation=self.activation, out=out,
                keep_input="gamma" in self.params,
            )
        if update:
            nbt = self.num_batches_tracked + 1
            if ghost is None:
                mean, var, unbiased = cache.mean, cache.var, self.unbiased
            else:
                mean, var = F.ghost_running_inputs(cache, self.unbiased)
                unbiased = False
            new_mean, new_var, fits = F.running_step(
                self.running_mean, self.running_var, mean, var, cache.count,
                momentum=self.momentum, num_batches_tracked=nbt, unbiased=unbiased,
                backend=self.backend,
            )
            if not fits:
                raise _overflow_error(new_var, self.running_var.dtype)
            np.copyto(self.running_mean, new_mean)
            np.copyto(self.running_var, new_var)
            self.num_batches_tracked = nbt
        self._cache = cache
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient with respect to the last forward's input; sets `dgamma` and `dbeta`.

        After an eval-mode (or frozen) forward this is the gradient of the fixed inference
        transform, as autograd gives for a frozen PyTorch layer.

        Parameters
        ----------
        dy : ndarray, same shape as the last forward's `x`
            The gradient with respect to the layer's output (after the activation, if any).

        Returns
        -------
        dx : ndarray, same shape and dtype as the last forward's `x`
        """
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                "backward called before forward: expected a forward call first (each forward "
                "allows one backward, which releases what the forward kept)"
            )
        with cache.reducer.guard("backward"):
            dy = check_dy(dy, cache.shape)
        out = self._buffer("_dx_buf", cache.shape, cache.dtype, dy, cache.x3, cache.y3)
        dx, dgamma, dbeta = F.backward(dy, cache, out)
        if self.affine and dgamma is not None:
            dt = self.dtype
            self.dgamma = dgamma if dgamma.dtype is dt else dgamma.astype(dt)
            self.dbeta = dbeta if dbeta.dtype is dt else dbeta.astype(dt)
        else:
            self.dgamma = self.dbeta = None
        # Nothing reads the cache again: release the input it kept (one backward per forward).
        self._cache = None
        return dx
