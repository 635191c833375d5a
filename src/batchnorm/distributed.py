"""Batch normalization synchronised across MPI processes (data-parallel training).

:class:`SyncBatchNorm` computes its training statistics over the batches of all ranks of an
mpi4py communicator, so that a batch split across processes is normalised as if it were one.

Importing this module does not import mpi4py (nor start MPI); constructing a
:class:`SyncBatchNorm` or calling a helper that talks to other ranks does, and raises an
ImportError naming the extra to install when mpi4py or its MPI library is missing.

Notes
-----
Forward (training, more than one rank): each rank packs, per feature, its count ``n_r``, mean
``m_r`` and sum of squared deviations ``M2_r`` into a float64 buffer of ``2C + 2`` values with a
status code in front, and one ``Allgather`` gives every rank the table of all ranks. Every rank
merges the table in rank order ``0, 1, ..., P-1`` with Chan et al.'s pairwise update::

    n = n_a + n_b,  d = m_b - m_a,  m = m_a + d * n_b / n,  M2 = M2_a + M2_b + d**2 n_a n_b / n

so all ranks compute bit-identical statistics (same bytes, same operations, same order), and
the running statistics stay identical on every rank. A rank with no samples contributes
nothing. Backward: one ``Allreduce`` (sum) of ``sum(dy)`` and ``sum(dy * (x - center))`` per
feature (``2C + 2`` float64 with two status slots); ``center`` is the global mean rounded to the
data dtype, the same on every rank, so these sums add up exactly to the whole batch's.

No hangs on bad input: every check that could fail on one rank only (dtype, dims, feature size,
non-finite values, ``dy`` shape) is made before the collective and its outcome travels *in* the
collective's buffer, whose size depends only on ``num_features``. So every rank completes the
same collective and then every rank raises: the failing rank its own error, the others an
error of the same class naming the failing rank. Nothing is updated on any rank.

A dead rank: MPICH's ``mpiexec`` (Hydra) kills the whole job when a process exits without
``MPI_Finalize`` (``os._exit``, a signal, a crash). A Python exception that escapes on one rank
is different: the interpreter calls ``MPI_Finalize`` at exit, which waits for the other ranks,
which wait in the collective: a hang. Run scripts with ``mpiexec -n P python -m mpi4py
script.py`` (mpi4py then calls ``MPI_Abort`` on an uncaught exception), or give the layer a
``timeout``: the collectives are then non-blocking and polled, and a rank that waits longer
than ``timeout`` seconds prints why and calls ``MPI_Abort``, which ends every rank of the job.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .backends import Backend
from .layers import BatchNorm
from .reducers import LOCAL, all_finite, nonfinite_error
from .renorm import BatchRenorm, Bound

__all__ = [
    "DataParallel",
    "GlobalMeanLoss",
    "MPIReducer",
    "SyncBatchNorm",
    "SyncBatchRenorm",
    "allreduce_grads",
    "convert_sync_batchnorm",
    "forward_bytes",
    "backward_bytes",
    "shard_bounds",
]

INSTALL_HINT = "pip install 'batchnorm[mpi]'  (mpi4py>=4 and the mpich wheel)"

# Status codes carried in the collectives' buffers. 0 must mean "ok": the backward all-reduce
# sums them.
_OK = 0
_CODES: dict[int, type[Exception]] = {1: TypeError, 2: ValueError, 3: ValueError, 4: RuntimeError}
_NONFINITE = 3


def _mpi():
    """The ``mpi4py.MPI`` module, or an ImportError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(
            f"SyncBatchNorm needs mpi4py and an MPI library ({err}); install them with: "
            f"{INSTALL_HINT}"
        ) from err
    except RuntimeError as err:  # mpi4py present but its MPI library cannot be loaded
        raise ImportError(
            f"mpi4py could not load an MPI library ({err}); install one with: {INSTALL_HINT}"
        ) from err
    return MPI


def _code_of(err: BaseException) -> int:
    if isinstance(err, TypeError):
        return 1
    if isinstance(err, ValueError):
        return 2
    return 4


def _peer_error(codes: np.ndarray, rank: int, size: int, where: str) -> Exception:
    """The error a healthy rank raises when other ranks failed (`codes` one per rank)."""
    bad = [r for r in range(size) if codes[r] != _OK and r != rank]
    first = bad[0]
    cls = _CODES.get(int(codes[first]), RuntimeError)
    what = "non-finite values in its training batch" if codes[first] == _NONFINITE else (
        f"{cls.__name__}, see that rank's message"
    )
    more = f" (and rank(s) {bad[1:]})" if len(bad) > 1 else ""
    return cls(
        f"SyncBatchNorm.{where} failed on rank {first} of {size}{more}: {what}; every rank "
        "raised and nothing was updated"
    )


def forward_bytes(num_features: int, size: int) -> int:
    """Bytes of the forward ``Allgather`` result on each rank: ``size * (2C + 2)`` float64.

    Each rank sends ``(2C + 2) * 8`` bytes and receives the other ranks' ``(size - 1)`` blocks.
    """
    return 8 * size * (2 * num_features + 2)


def backward_bytes(num_features: int) -> int:
    """Bytes of the backward ``Allreduce`` buffer: ``2C + 2`` float64 (sums and two flags)."""
    return 8 * (2 * num_features + 2)


def _merge(table: np.ndarray, c: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise merge of per-rank (count, mean, M2) rows, in rank order.

    Parameters
    ----------
    table : ndarray of shape (P, 2C + 2), float64
        Row ``r``: ``[status, n_r, mean_r (C), M2_r (C)]``.

    Returns
    -------
    n : float
    mean, m2 : ndarray of shape (C,), float64
    """
    n = 0.0
    mean = np.zeros(c)
    m2 = np.zeros(c)
    for row in table:
        nb = row[1]
        if nb == 0:
            continue  # an empty shard: nothing to add (and no 0/0)
        mb = row[2 : 2 + c]
        m2b = row[2 + c :]
        if n == 0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        tot = n + nb
        d = mb - mean
        mean = mean + d * (nb / tot)
        m2 = m2 + m2b + d * d * (n * nb / tot)
        n = tot
    return n, mean, m2


class MPIReducer:
    """The reducer of :class:`SyncBatchNorm`: statistics and gradient sums over every rank of
    an mpi4py communicator (see the module notes and :mod:`batchnorm.reducers`).

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm
    num_features : int
        Fixes the size of the collectives' buffers, so that a rank whose input is invalid can
        still take part (with a failure code) without looking at it.
    timeout : float or None
        Seconds to wait in a collective before ``MPI_Abort``; None waits forever (blocking
        collectives).
    """

    local = False

    def __init__(self, comm: Any, num_features: int, timeout: float | None = None) -> None:
        self.comm = comm
        self.num_features = int(num_features)
        self.timeout = None if timeout is None else float(timeout)

    def __deepcopy__(self, memo) -> MPIReducer:
        return self  # holds a communicator, which is not copied

    def __repr__(self) -> str:
        return (
            f"MPIReducer(ranks={self.comm.Get_size()}, num_features={self.num_features}, "
            f"timeout={self.timeout})"
        )

    # collectives -----------------------------------------------------------------------------
    def _wait(self, request, what: str) -> None:
        """Wait for a non-blocking collective, or abort the job after `timeout` seconds."""
        deadline = time.monotonic() + self.timeout
        delay = 1e-5
        while not request.Test():
            if time.monotonic() > deadline:
                rank, size = self.comm.Get_rank(), self.comm.Get_size()
                print(
                    f"SyncBatchNorm: rank {rank} of {size} waited more than {self.timeout} s in "
                    f"the {what}; another rank is dead, stuck or calling the layer out of step. "
                    "Calling MPI_Abort.",
                    file=sys.stderr,
                    flush=True,
                )
                # Give mpiexec a moment to forward the message: MPI_Abort kills the job at once.
                time.sleep(0.5)
                self.comm.Abort(1)
            # Sleep a little (growing to 1 ms) so that an oversubscribed machine is not spun on.
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)

    def _allgather(self, row: np.ndarray) -> np.ndarray:
        table = np.empty((self.comm.Get_size(), row.size), dtype=np.float64)
        if self.timeout is None:
            self.comm.Allgather(row, table)
        else:
            self._wait(self.comm.Iallgather(row, table), "forward all-gather")
        return table

    def _allreduce(self, buf: np.ndarray) -> np.ndarray:
        MPI = _mpi()
        out = np.empty_like(buf)
        if self.timeout is None:
            self.comm.Allreduce(buf, out, op=MPI.SUM)
        else:
            self._wait(self.comm.Iallreduce(buf, out, op=MPI.SUM), "backward all-reduce")
        return out

    def _exchange_stats(self, status: int, n: int, mean, m2) -> np.ndarray:
        c = self.num_features
        row = np.zeros(2 * c + 2)
        row[0] = status
        if status == _OK:
            row[1] = n
            row[2 : 2 + c] = mean
            row[2 + c :] = m2
        return self._allgather(row)

    # the reducer interface -------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, phase: str) -> Iterator[None]:
        """Join the collective the other ranks are entering with a failure code when the body
        raises on this rank, so that they raise too instead of waiting for it forever."""
        try:
            yield
        except Exception as err:
            if phase == "forward":
                self._exchange_stats(_code_of(err), 0, None, None)
            else:
                buf = np.zeros(2 * self.num_features + 2)
                buf[-2] = self.comm.Get_rank() + 1
                buf[-1] = 1
                self._allreduce(buf)
            raise

    def moments(self, backend, x3, *, check_finite, shape):
        c = self.num_features
        n = x3.shape[0] * x3.shape[2]
        status, own_error = _OK, None
        if n > 0:
            mean, var = backend.moments(x3)
            if check_finite and not all_finite(mean, var):
                status, own_error = _NONFINITE, nonfinite_error(mean, var, shape)
            m2 = var * n
        else:
            # An empty shard: its moments would be 0/0; it contributes count 0.
            mean = m2 = np.zeros(c)
        table = self._exchange_stats(status, n, mean, m2)
        if own_error is not None:
            raise own_error
        if (table[:, 0] != _OK).any():
            raise _peer_error(table[:, 0], self.comm.Get_rank(), self.comm.Get_size(), "forward")
        total, gmean, gm2 = _merge(table, c)
        count = int(total)
        var = gm2 / count if count > 0 else gm2
        return count, gmean, var

    def grad_sums(self, sum_dy, sum_dy_xc):
        c = self.num_features
        buf = np.zeros(2 * c + 2)
        buf[:c] = sum_dy
        buf[c : 2 * c] = sum_dy_xc
        out = self._allreduce(buf)
        failed = int(out[-1])
        if failed:
            size = self.comm.Get_size()
            if failed == 1:  # the slot before holds that rank + 1
                codes = np.zeros(size)
                codes[int(out[-2]) - 1] = 4
                raise _peer_error(codes, self.comm.Get_rank(), size, "backward")
            raise RuntimeError(
                f"SyncBatchNorm.backward failed on {failed} of {size} ranks (see their "
                "messages); every rank raised"
            )
        return out[:c], out[c : 2 * c]


class SyncBatchNorm(BatchNorm):
    """:class:`~batchnorm.BatchNorm` with statistics over the batches of all MPI ranks.

    It is :class:`~batchnorm.BatchNorm` with an :class:`MPIReducer`: the same forward and
    backward, whose statistics and gradient sums the reducer combines over the ranks.

    Parameters
    ----------
    num_features : int
        Size ``C`` of the feature axis.
    comm : mpi4py.MPI.Intracomm or None, default None
        The ranks that share a batch; None means ``MPI.COMM_WORLD``.
    timeout : float or None, default None
        Seconds a rank waits in a collective before it reports the problem on stderr and calls
        ``MPI_Abort`` (ending every rank of the job). None waits forever, with blocking
        collectives (slightly faster); see the module notes for what happens when a rank dies.
    **kwargs
        ``axis, eps, momentum, affine, track_running_stats, unbiased, dtype, backend,
        activation, reuse_outputs`` as in :class:`~batchnorm.BatchNorm` (a fused activation
        is applied to the output of the global batch's normalization, its mask in the
        backward before the gradient sums are reduced).

    Notes
    -----
    In training mode, on a communicator of more than one rank, with ``x_r`` the batch of rank
    ``r`` (any number of samples, zero included) and ``X`` their concatenation along the batch
    axes in rank order:

    - the output and ``dx`` of each rank are the rows of ``BatchNorm`` applied to ``X``;
    - the running statistics are ``BatchNorm``'s on ``X`` and identical on every rank;
    - ``dgamma`` and ``dbeta`` are this rank's share: their sum over ranks (the all-reduce a
      data-parallel trainer does for every parameter) is ``BatchNorm``'s on ``X``.

    Eval mode and a communicator of one rank use the local path (no communication); with
    ``track_running_stats=False`` eval mode normalises with the local batch's statistics.
    Every rank must call ``forward`` and ``backward`` in the same order and the same mode.
    When the input of any rank is invalid, every rank raises: the failing rank its own error,
    the others an error of the same class that names the failing rank; nothing is updated.

    Costs one ``Allgather`` of ``P * (2C + 2)`` float64 per training forward and one
    ``Allreduce`` of ``2C + 2`` float64 per backward, whatever the batch size.

    Raises
    ------
    ImportError
        When mpi4py or its MPI library is missing.
    """

    def __init__(
        self,
        num_features: int,
        *,
        comm: Any = None,
        timeout: float | None = None,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.9,
        affine: bool = True,
        track_running_stats: bool = True,
        unbiased: bool = False,
        dtype: Any = np.float32,
        backend: str | Backend | None = None,
        activation: str | None = None,
        reuse_outputs: bool = False,
    ) -> None:
        comm, timeout = _sync_args(comm, timeout)
        super().__init__(
            num_features, axis=axis, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, unbiased=unbiased, dtype=dtype,
            backend=backend, activation=activation, reuse_outputs=reuse_outputs,
        )
        _make_sync(self, comm, timeout)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ranks={self.comm.Get_size()}, timeout={self.timeout}"


def _sync_args(comm: Any, timeout: float | None) -> tuple[Any, float | None]:
    """The checked communicator (None: ``COMM_WORLD``) and timeout of a synchronised layer."""
    MPI = _mpi()
    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"expected comm to be an mpi4py Intracomm, got {type(comm).__name__}")
    if timeout is not None and not (float(timeout) > 0):
        raise ValueError(f"expected timeout > 0 seconds or None, got {timeout}")
    return comm, None if timeout is None else float(timeout)


def _make_sync(layer: BatchNorm, comm: Any, timeout: float | None) -> None:
    layer.comm = comm
    layer.timeout = timeout
    # One rank: the local path, without communication.
    layer.reducer = (
        MPIReducer(comm, layer.num_features, timeout) if comm.Get_size() > 1 else LOCAL
    )


class SyncBatchRenorm(BatchRenorm):
    """:class:`~batchnorm.BatchRenorm` with statistics over the batches of all MPI ranks.

    Batch Renormalization with an :class:`MPIReducer`: ``r`` and ``d`` come from the global
    batch statistics and the (identical) running statistics, so they are the same on every
    rank, and everything :class:`SyncBatchNorm` says about outputs, gradients, running
    statistics, uneven and empty shards and errors holds.

    Parameters
    ----------
    num_features : int
    comm, timeout
        As in :class:`SyncBatchNorm`.
    rmax, dmax, **kwargs
        As in :class:`~batchnorm.BatchRenorm` (no ``virtual_batch_size``: virtual batches are
        local).

    Raises
    ------
    ImportError
        When mpi4py or its MPI library is missing.
    """

    def __init__(
        self,
        num_features: int,
        *,
        comm: Any = None,
        timeout: float | None = None,
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
        activation: str | None = None,
        reuse_outputs: bool = False,
    ) -> None:
        comm, timeout = _sync_args(comm, timeout)
        super().__init__(
            num_features, rmax=rmax, dmax=dmax, axis=axis, eps=eps, momentum=momentum,
            affine=affine, track_running_stats=track_running_stats, unbiased=unbiased,
            dtype=dtype, backend=backend, activation=activation, reuse_outputs=reuse_outputs,
        )
        _make_sync(self, comm, timeout)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ranks={self.comm.Get_size()}, timeout={self.timeout}"


# ---------------------------------------------------------------------------------------------
# converting a network


def convert_sync_batchnorm(model: Any, comm: Any = None, *, timeout: float | None = None) -> Any:
    """Replace every :class:`~batchnorm.BatchNorm` in `model` by a :class:`SyncBatchNorm`
    (and every :class:`~batchnorm.BatchRenorm` by a :class:`SyncBatchRenorm`).

    The new layers share the old ones' arrays (``gamma``, ``beta``, running statistics), mode
    and settings, so an optimiser that holds those arrays keeps working.

    Parameters
    ----------
    model : a layer, or an object holding layers in attributes, lists, tuples or dicts
        (a toolkit ``Sequential``, say), walked recursively.
    comm : mpi4py.MPI.Intracomm or None
        As in :class:`SyncBatchNorm`.
    timeout : float or None
        As in :class:`SyncBatchNorm`.

    Returns
    -------
    model
        The same object with its layers replaced in place, or the new layer when `model` is
        itself a ``BatchNorm``.

    Raises
    ------
    ValueError
        For a layer with ``virtual_batch_size`` (virtual batches are parts of one process's
        batch); checked before anything is converted.
    """
    memo: dict[int, Any] = {}
    ghosts: list[BatchNorm] = []

    def convert(obj: Any, dry: bool = False) -> Any:
        if id(obj) in memo:  # shared layers stay shared; cycles end here
            return memo[id(obj)]
        memo[id(obj)] = obj
        if isinstance(obj, BatchNorm) and not isinstance(obj, (SyncBatchNorm, SyncBatchRenorm)):
            if dry:
                if obj.virtual_batch_size is not None:
                    ghosts.append(obj)
                return obj
            kw = dict(comm=comm, timeout=timeout, axis=obj.axis, eps=obj.eps,
                      momentum=obj.momentum, affine=obj.affine,
                      track_running_stats=obj.track_running_stats, unbiased=obj.unbiased,
                      dtype=obj.dtype, backend=obj.backend)
            if isinstance(obj, BatchRenorm):
                new = SyncBatchRenorm(obj.num_features, rmax=obj.rmax, dmax=obj.dmax, **kw)
            else:
                new = SyncBatchNorm(obj.num_features, **kw)
            # Share the very arrays (and mode, counters) rather than copying them; keep the new
            # layer's communicator and reducer. The old cache was made with the local reducer,
            # so a backward after the conversion stays local, as the forward was.
            for key, value in vars(obj).items():
                if key not in ("reducer", "comm", "timeout"):
                    setattr(new, key, value)
            memo[id(obj)] = new
            return new
        if dry:  # only look for layers that cannot be converted
            children = (
                list(obj) if isinstance(obj, (list, tuple))
                else list(obj.values()) if isinstance(obj, dict)
                else list(vars(obj).values()) if _walkable(obj) else []
            )
            for child in children:
                convert(child, dry=True)
            return obj
        if isinstance(obj, list):
            for i, item in enumerate(obj):
                obj[i] = convert(item)
        elif isinstance(obj, tuple):
            items = tuple(convert(item) for item in obj)
            if any(a is not b for a, b in zip(items, obj, strict=True)):
                new = type(obj)(items) if type(obj) is tuple else type(obj)(*items)
                memo[id(obj)] = new
                return new
        elif isinstance(obj, dict):
            for key in list(obj):
                obj[key] = convert(obj[key])
        elif _walkable(obj):
            for key, value in list(vars(obj).items()):
                new = convert(value)
                if new is not value:
                    setattr(obj, key, new)
        return obj

    convert(model, dry=True)
    if ghosts:
        raise ValueError(
            f"expected layers without virtual_batch_size to synchronise, got {ghosts[0]!r} "
            f"({len(ghosts)} such layer(s)): virtual batches are parts of one process's batch; "
            "nothing was converted"
        )
    memo.clear()
    return convert(model)


def _walkable(obj: Any) -> bool:
    # Walk user objects (layers, containers), not arrays, modules, classes or functions.
    return hasattr(obj, "__dict__") and not isinstance(
        obj,
        (type, types.ModuleType, types.FunctionType, types.MethodType, np.ndarray),
    )


# ---------------------------------------------------------------------------------------------
# data-parallel helpers


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank `rank`'s share of `n` samples split over `size` ranks.

    The first ``n % size`` ranks get one sample more, so shards differ by at most one (and are
    empty when ``n < size``).
    """
    base, extra = divmod(int(n), int(size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def allreduce_grads(grads: Sequence[np.ndarray], comm: Any = None) -> None:
    """Sum each gradient array over the ranks of `comm`, in place, in one ``Allreduce``.

    The arrays are packed into one float64 buffer (whatever their dtypes) so that a step costs
    one collective, and unpacked back into their own dtype.
    """
    MPI = _mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    if comm.Get_size() == 1 or not grads:
        return
    flat = np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in grads])
    out = np.empty_like(flat)
    comm.Allreduce(flat, out, op=MPI.SUM)
    i = 0
    for g in grads:
        g[...] = out[i : i + g.size].reshape(g.shape)
        i += g.size


class GlobalMeanLoss:
    """Softmax cross-entropy whose value is the mean over the global batch (all ranks).

    Each rank computes its shard's loss; one ``allreduce`` of ``(sum of losses, count)`` gives
    every rank the global mean, so logs and divergence checks agree on all ranks. ``backward``
    is the local one: ``backward(local_n / global_n)`` gives this rank's share of the gradient
    of the global mean. A rank with an empty shard contributes nothing.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm or None
    """

    def __init__(self, comm: Any = None) -> None:
        from .nn import SoftmaxCrossEntropy

        MPI = _mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        # The sum over the shard: defined (0) for an empty shard, and what the all-reduce adds.
        self._local = SoftmaxCrossEntropy(reduction="sum")
        self._n = 0

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return self.forward(logits, labels)

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """Mean loss over all ranks' samples; `logits` (n, K) and `labels` (n,) are this
        rank's (n may be 0)."""
        local = self._local.forward(logits, labels)
        n = len(labels)
        self._n = n
        total, count = self.comm.allreduce(np.array([local, float(n)]), op=_mpi().SUM)
        return float(total / count) if count > 0 else float("nan")

    def backward(self, scale: float = 1.0) -> np.ndarray:
        """Gradient of ``scale * (this rank's mean loss)`` with respect to its logits (n, K)."""
        return self._local.backward(scale / max(self._n, 1))


class DataParallel:
    """What a training loop needs to run data-parallel over the ranks of `comm`.

    Every rank holds the same model and sees the same sequence of global batches; each
    computes on its shard, and after backward the parameter gradients are summed over ranks,
    so that every rank applies the gradient of the global batch's loss and the models stay
    identical.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm or None
        Default ``MPI.COMM_WORLD``.
    timeout : float or None
        For the :class:`SyncBatchNorm` layers that :meth:`prepare` creates.

    Examples
    --------
    >>> dp = DataParallel()
    >>> model = dp.prepare(model)                 # BatchNorm -> SyncBatchNorm
    >>> loss_fn = dp.loss_fn()
    >>> for idx in global_batches:
    ...     local = dp.shard(idx)
    ...     loss = loss_fn(model.forward(x[local]), y[local])
    ...     model.backward(loss_fn.backward(len(local) / len(idx)))
    ...     dp.grad_hook(model)                   # all-reduce the gradients
    ...     optimizer.step(model.grads)
    """

    def __init__(self, comm: Any = None, *, timeout: float | None = None) -> None:
        MPI = _mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = timeout

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that prints and writes files."""
        return self.rank == 0

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's part of a global batch of indices (shards differ by at most one)."""
        lo, hi = shard_bounds(len(idx), self.rank, self.size)
        return idx[lo:hi]

    def prepare(self, model: Any) -> Any:
        """`model` with its BatchNorm layers synchronised over `comm` (see
        :func:`convert_sync_batchnorm`)."""
        return convert_sync_batchnorm(model, self.comm, timeout=self.timeout)

    def loss_fn(self) -> GlobalMeanLoss:
        """A softmax cross-entropy that reports the global batch's mean loss."""
        return GlobalMeanLoss(self.comm)

    @contextlib.contextmanager
    def abort_on_error(self) -> Iterator[None]:
        """End the whole job if the body raises on this rank.

        An exception on one rank leaves the others waiting in a collective, and the
        interpreter's exit on this rank waits for them in ``MPI_Finalize``: a hang. Inside this
        block an exception is printed and ``MPI_Abort`` ends every rank (the ``python -m
        mpi4py`` behaviour, for programs started through a console script).
        """
        try:
            yield
        except BaseException:
            if self.size > 1:
                traceback.print_exc()
                sys.stderr.flush()
                self.comm.Abort(1)
            raise

    def grad_hook(self, model: Any) -> None:
        """Sum ``model.grads`` over the ranks, in place (one all-reduce)."""
        allreduce_grads([g for g in model.grads.values() if g is not None], self.comm)
