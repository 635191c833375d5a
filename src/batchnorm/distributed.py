"""Batch normalization synchronised across MPI processes (data-parallel training).

:class:`SyncBatchNorm` computes its training statistics over the batches of all ranks of an
mpi4py communicator, so that a batch split across processes is normalised as if it were one.

Importing this module does not import mpi4py (nor start MPI); constructing a
:class:`SyncBatchNorm` or calling a helper that talks to other ranks does, and raises an
ImportError naming the extra to install when mpi4py or its MPI library is missing.

Notes
-----
Forward (training, more than one rank): each rank packs, per feature, its count ``n_r``, mean
``m_r`` and sum of squared deviations ``M2_r`` into a float64 buffer of ``2C + 2`` values (a
slot left 0 in front), and one ``Allgather`` after the header exchange below gives every rank
the table of all ranks. Every rank
merges the table in rank order ``0, 1, ..., P-1`` with Chan et al.'s pairwise update::

    n = n_a + n_b,  d = m_b - m_a,  m = m_a + d * n_b / n,  M2 = M2_a + M2_b + d**2 n_a n_b / n

so all ranks compute bit-identical statistics (same bytes, same operations, same order), and
the running statistics stay identical on every rank. A rank with no samples contributes
nothing. Backward: after a header exchange, one ``Allreduce`` (sum) of ``sum(dy)`` and
``sum(dy * (x - center))`` per feature (``2C + 2`` float64, two slots unused); ``center`` is the
global mean rounded to the data dtype, the same on every rank, so these sums add up exactly to
the whole batch's.

Every collective of this module (the layer's forward and backward, :func:`allreduce_grads`,
:class:`GlobalMeanLoss`) starts with one ``Allgather`` of a fixed-size header of
``HEADER_SIZE`` float64 per rank: a status code, what the rank is doing (which collective, of
which layer, its how-many-th call) and the layer's configuration (``num_features``, dtype,
input dtype, eps, momentum, affine, track_running_stats, unbiased). Its size depends on
nothing, so ranks that disagree still complete it; every rank then compares the table, and
only when all agree does the payload collective follow (whose size depends on
``num_features``).

No hangs on bad input: every check that could fail on one rank only (dtype, dims, feature size,
non-finite values, ``dy`` shape) is made before the header exchange, whose status code
carries its outcome. Every rank then raises: the failing rank its own error, the others an
error of the same class naming the failing rank. A configuration that differs between ranks
(layers built differently, called in another order, in another mode, or a rank in another
collective) raises :class:`RankMismatchError` on every rank, naming the ranks that differ
from rank 0 and how. Nothing is updated on any rank.

Layers are identified by creation order: the k-th multi-rank ``SyncBatchNorm`` (or
:class:`MPIReducer`) made on a communicator is "layer #k" on every rank, so every rank must
build its layers in the same order (as copies of one model, or :func:`convert_sync_batchnorm`
on the same model, do). Eval mode does not communicate (as in PyTorch), so a rank whose layer
is in eval mode while the others train is caught at its next collective of this module.

A dead rank: MPICH's ``mpiexec`` (Hydra) kills the whole job when a process exits without
``MPI_Finalize`` (``os._exit``, a signal, a crash). A process that exits through the
interpreter (``sys.exit``, the end of the script, an uncaught exception without ``python -m
mpi4py``) calls ``MPI_Finalize``, which waits for the other ranks; if they wait in a
collective for the exited rank, that would hang. So creating a multi-rank
:class:`SyncBatchNorm` or a :class:`DataParallel` installs an exit guard (``atexit``): a rank
that exits first sends every other rank a small exit notice. The collectives of this module are
non-blocking and polled; a rank that waits in one sees the notice and, when the collective
still has not completed ``EXIT_GRACE`` seconds later (the exited rank can no longer take
part), prints which rank exited and calls ``MPI_Abort``, which ends every rank of the job. A
clean end, every rank exiting after its last collective, is not aborted. MPI calls of your own
(``comm.Barrier()``, mpi4py's lowercase methods) are not watched: a rank waiting there for an
exited rank still hangs; ``python -m mpi4py`` or :meth:`DataParallel.abort_on_error` cover
exceptions. With ``timeout``, a rank that waits longer than ``timeout`` seconds in a
collective of this module (a rank stuck, or alive but out of step) prints why and calls
``MPI_Abort``.
"""

from __future__ import annotations

import atexit
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
    "EXIT_GRACE",
    "GlobalMeanLoss",
    "HEADER_SIZE",
    "MPIReducer",
    "RankMismatchError",
    "SyncBatchNorm",
    "SyncBatchRenorm",
    "allreduce_grads",
    "convert_sync_batchnorm",
    "backward_bytes",
    "forward_bytes",
    "install_exit_guard",
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


HEADER_SIZE = 12
"""float64 values per rank in the header ``Allgather`` that starts every collective."""

EXIT_GRACE = 2.0
"""Seconds a rank waiting in a collective gives it to complete after another rank's exit
notice before it calls ``MPI_Abort`` (a rank that exits right after its last collective is
not an error)."""

# Header slots.
_H_STATUS, _H_PHASE, _H_LAYER, _H_CALL, _H_C, _H_DTYPE, _H_XDTYPE = range(7)
_H_EPS, _H_MOMENTUM, _H_FLAGS, _H_SIZE = range(7, 11)
_FORWARD, _BACKWARD, _GRADS, _LOSS = 1, 2, 3, 4
_PHASE_NAMES = {
    _FORWARD: "SyncBatchNorm.forward",
    _BACKWARD: "SyncBatchNorm.backward",
    _GRADS: "allreduce_grads",
    _LOSS: "GlobalMeanLoss",
}
_DTYPES = {2: "float16", 4: "float32", 8: "float64"}  # by itemsize
# A point-to-point tag for exit notices (on COMM_WORLD; collectives never match it).
_EXIT_TAG = 28258


class RankMismatchError(RuntimeError):
    """The ranks of a communicator disagree about a collective of this module: layers built
    with different settings, called in a different order or mode, or a rank in another
    collective. Raised on every rank."""


def forward_bytes(num_features: int, size: int) -> int:
    """Bytes gathered on each rank per training forward: ``size * (HEADER_SIZE + 2C + 2)``
    float64 (the header, then count, mean and M2 per rank)."""
    return 8 * size * (HEADER_SIZE + 2 * num_features + 2)


def backward_bytes(num_features: int, size: int) -> int:
    """Bytes per backward on each rank: the gathered headers (``size * HEADER_SIZE``
    float64) and the ``Allreduce`` buffer of ``2C + 2`` float64 (the two sums per feature)."""
    return 8 * (size * HEADER_SIZE + 2 * num_features + 2)


# ---------------------------------------------------------------------------------------------
# watched collectives: headers, timeouts and exit notices

_LAYER_COUNT: dict[int, int] = {}  # communicator handle -> multi-rank layers made on it
_EXITED: set[int] = set()  # COMM_WORLD ranks that sent an exit notice
_GUARD = {"installed": False}


def _next_layer_id(comm: Any) -> int:
    key = comm.py2f()
    _LAYER_COUNT[key] = _LAYER_COUNT.get(key, 0) + 1
    return _LAYER_COUNT[key] - 1


def _send_exit_notices() -> None:
    """At interpreter exit: tell every other rank that this one is gone (see the module
    notes). Runs before mpi4py's ``MPI_Finalize``."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized():
        return
    world = MPI.COMM_WORLD
    me, size = world.Get_rank(), world.Get_size()
    note = np.zeros(1)
    reqs = [world.Isend(note, dest=r, tag=_EXIT_TAG) for r in range(size) if r != me]
    # Then take every other rank's notice, as MPI_Finalize would wait for them anyway, so that
    # no message is left unreceived at MPI_Finalize. A rank that waits for this one in a
    # collective aborts the job instead of sending its notice.
    pending = set(range(size)) - {me} - _EXITED
    status = MPI.Status()
    while pending or not MPI.Request.Testall(reqs):
        if world.Iprobe(source=MPI.ANY_SOURCE, tag=_EXIT_TAG, status=status):
            src = status.Get_source()
            world.Recv(np.zeros(1), source=src, tag=_EXIT_TAG)
            pending.discard(src)
        else:
            time.sleep(1e-3)


def install_exit_guard() -> None:
    """Make an interpreter exit on one rank end the job instead of hanging the others (see
    the module notes). Done by :class:`SyncBatchNorm` and :class:`DataParallel`; idempotent."""
    if _GUARD["installed"]:
        return
    MPI = _mpi()
    if MPI.COMM_WORLD.Get_size() > 1:
        atexit.register(_send_exit_notices)
        _GUARD["installed"] = True


def _exited_member(comm: Any) -> int | None:
    """Collect pending exit notices; return a rank of `comm` (its own numbering) that exited."""
    MPI = _mpi()
    world = MPI.COMM_WORLD
    status = MPI.Status()
    while world.Iprobe(source=MPI.ANY_SOURCE, tag=_EXIT_TAG, status=status):
        src = status.Get_source()
        world.Recv(np.zeros(1), source=src, tag=_EXIT_TAG)
        _EXITED.add(src)
    if not _EXITED:
        return None
    ranks = MPI.Group.Translate_ranks(world.Get_group(), sorted(_EXITED), comm.Get_group())
    for r in ranks:
        if r != MPI.UNDEFINED:
            return int(r)
    return None


def _abort(comm: Any, message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    # Give mpiexec a moment to forward the message: MPI_Abort kills the job at once.
    time.sleep(0.5)
    comm.Abort(1)


def _watch(comm: Any, request: Any, what: str, timeout: float | None) -> None:
    """Wait for a non-blocking collective; abort the job when a rank of `comm` has exited (it
    can no longer take part) or after `timeout` seconds."""
    if request.Test():
        return
    start = time.monotonic()
    spin_until = start + 2e-4  # a short busy wait: most collectives complete within it
    delay = 1e-5
    gone_since = None
    while not request.Test():
        now = time.monotonic()
        if now < spin_until:
            continue
        rank, size = comm.Get_rank(), comm.Get_size()
        if timeout is not None and now - start > timeout:
            _abort(comm, f"SyncBatchNorm: rank {rank} of {size} waited more than {timeout} s in "
                   f"the {what}; another rank is dead, stuck or calling the layer out of step. "
                   "Calling MPI_Abort.")
        gone = _exited_member(comm)
        if gone is not None:
            if gone_since is None:
                gone_since = now
            elif now - gone_since > EXIT_GRACE:
                _abort(comm, f"SyncBatchNorm: rank {gone} of {size} exited while rank {rank} "
                       f"waits for it in the {what}; it can no longer take part. Calling "
                       "MPI_Abort to end the job.")
        # Sleep a little (growing to 1 ms) so that an oversubscribed machine is not spun on.
        time.sleep(delay)
        delay = min(2 * delay, 1e-3)


def _allgather(comm: Any, row: np.ndarray, what: str, timeout: float | None) -> np.ndarray:
    table = np.empty((comm.Get_size(), row.size), dtype=np.float64)
    _watch(comm, comm.Iallgather(row, table), what, timeout)
    return table


def _allreduce(comm: Any, buf: np.ndarray, what: str, timeout: float | None) -> np.ndarray:
    out = np.empty_like(buf)
    _watch(comm, comm.Iallreduce(buf, out, op=_mpi().SUM), what, timeout)
    return out


def _header(phase: int, *, status: int = 0, layer: int = -1, call: int = 0, size: int = 0,
            settings: dict | None = None, x_itemsize: int = 0) -> np.ndarray:
    h = np.zeros(HEADER_SIZE)
    h[_H_STATUS], h[_H_PHASE], h[_H_LAYER], h[_H_CALL] = status, phase, layer, call
    h[_H_C] = h[_H_SIZE] = size
    h[_H_XDTYPE] = x_itemsize
    if settings is not None:
        h[_H_DTYPE] = settings["dtype"].itemsize
        h[_H_EPS] = settings["eps"]
        h[_H_MOMENTUM] = -1.0 if settings["momentum"] is None else settings["momentum"]
        h[_H_FLAGS] = (settings["affine"] + 2 * settings["track_running_stats"]
                       + 4 * settings["unbiased"] + 8 * settings.get("renorm", False))
    return h


def _doing(row: np.ndarray) -> str:
    phase = int(row[_H_PHASE])
    name = _PHASE_NAMES.get(phase, f"an unknown collective ({phase})")
    if phase in (_FORWARD, _BACKWARD):
        return f"{name} of layer #{int(row[_H_LAYER])} (its call {int(row[_H_CALL])})"
    return f"{name} of {int(row[_H_SIZE])} values"


def _settings_text(row: np.ndarray) -> dict[str, str]:
    flags = int(row[_H_FLAGS])
    mom = row[_H_MOMENTUM]
    return {
        "num_features": str(int(row[_H_C])),
        "dtype": _DTYPES.get(int(row[_H_DTYPE]), "?"),
        "eps": repr(float(row[_H_EPS])),
        "momentum": "None" if mom == -1 else repr(float(mom)),
        "affine": str(bool(flags & 1)),
        "track_running_stats": str(bool(flags & 2)),
        "unbiased": str(bool(flags & 4)),
        "layer": "BatchRenorm" if flags & 8 else "BatchNorm",
    }


def _mismatch(table: np.ndarray, rank: int, what: str) -> RankMismatchError | None:
    """The error every rank raises when the gathered headers disagree (the same table on every
    rank gives the same verdict), or None."""
    size = table.shape[0]
    ref = table[0]
    lines = []
    for r in range(1, size):
        row = table[r]
        where = (_H_PHASE, _H_LAYER, _H_CALL)
        if (row[list(where)] != ref[list(where)]).any() or (
            row[_H_PHASE] in (_GRADS, _LOSS) and row[_H_SIZE] != ref[_H_SIZE]
        ):
            lines.append(f"rank {r} is in {_doing(row)}, rank 0 in {_doing(ref)}")
            continue
        if row[_H_PHASE] not in (_FORWARD, _BACKWARD):
            continue
        mine, theirs = _settings_text(row), _settings_text(ref)
        diff = [f"{k}={mine[k]} (rank 0: {theirs[k]})" for k in mine if mine[k] != theirs[k]]
        if diff:
            lines.append(f"rank {r} has {', '.join(diff)}")
    if not lines:
        # The input dtype, among the ranks whose input passed its checks.
        ok = [r for r in range(size) if table[r, _H_STATUS] == _OK and table[r, _H_XDTYPE]]
        kinds = {int(table[r, _H_XDTYPE]) for r in ok}
        if len(kinds) > 1:
            first = int(table[ok[0], _H_XDTYPE])
            lines = [
                f"rank {r}'s input is computed in {_DTYPES.get(int(table[r, _H_XDTYPE]))} "
                f"(rank {ok[0]}: {_DTYPES.get(first)})"
                for r in ok if int(table[r, _H_XDTYPE]) != first
            ]
    if not lines:
        return None
    return RankMismatchError(
        f"{what} on rank {rank} of {size}: the ranks disagree: " + "; ".join(lines) + ". Every "
        "rank must build the same layers in the same order (same num_features, dtype and "
        "settings), give them inputs of one dtype and call them in the same order and mode "
        "(an eval-mode or frozen layer does not communicate); every rank raised and nothing "
        "was updated"
    )


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
        Seconds to wait in a collective before ``MPI_Abort``; None waits as long as every rank
        is alive.
    settings : dict or None
        The layer's ``dtype, eps, momentum, affine, track_running_stats, unbiased``, compared
        across ranks in every collective; None compares ``num_features`` only.

    Notes
    -----
    The reducer is "layer #k", k its creation index on `comm` (the same on every rank when every
    rank builds its layers in the same order), and counts its collectives; both travel in the
    header of every collective (see the module notes).
    """

    local = False

    def __init__(
        self,
        comm: Any,
        num_features: int,
        timeout: float | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.comm = comm
        self.num_features = int(num_features)
        self.timeout = None if timeout is None else float(timeout)
        self.settings = None if settings is None else dict(settings)
        if self.settings is not None:
            self.settings["dtype"] = np.dtype(self.settings["dtype"])
        self.layer_id = _next_layer_id(comm)
        self.calls = 0
        install_exit_guard()

    def __deepcopy__(self, memo) -> MPIReducer:
        return self  # holds a communicator, which is not copied

    def __repr__(self) -> str:
        return (
            f"MPIReducer(ranks={self.comm.Get_size()}, num_features={self.num_features}, "
            f"timeout={self.timeout}, layer={self.layer_id})"
        )

    # collectives -----------------------------------------------------------------------------
    def _check_in(self, phase: int, status: int, x_itemsize: int = 0) -> np.ndarray:
        """The header exchange that starts every collective of this layer; raises
        :class:`RankMismatchError` on every rank when the ranks disagree. Returns the status
        codes, one per rank."""
        h = _header(phase, status=status, layer=self.layer_id, call=self.calls,
                    size=self.num_features, settings=self.settings, x_itemsize=x_itemsize)
        what = _PHASE_NAMES[phase]
        table = _allgather(self.comm, h, f"{what} header all-gather", self.timeout)
        self.calls += 1
        err = _mismatch(table, self.comm.Get_rank(), what)
        if err is not None:
            raise err
        return table[:, _H_STATUS]

    def _raise_for(self, codes: np.ndarray, where: str) -> None:
        if (codes != _OK).any():
            raise _peer_error(codes, self.comm.Get_rank(), self.comm.Get_size(), where)

    # the reducer interface -------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, phase: str) -> Iterator[None]:
        """Join the header exchange the other ranks are entering with a failure code when the
        body raises on this rank, so that they raise too instead of waiting for it forever."""
        try:
            yield
        except Exception as err:
            self._check_in(_FORWARD if phase == "forward" else _BACKWARD, _code_of(err))
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
        codes = self._check_in(_FORWARD, status, x3.dtype.itemsize)
        if own_error is not None:
            raise own_error
        self._raise_for(codes, "forward")
        row = np.zeros(2 * c + 2)
        row[1] = n
        row[2 : 2 + c] = mean
        row[2 + c :] = m2
        table = _allgather(self.comm, row, "forward all-gather", self.timeout)
        total, gmean, gm2 = _merge(table, c)
        count = int(total)
        var = gm2 / count if count > 0 else gm2
        return count, gmean, var

    def grad_sums(self, sum_dy, sum_dy_xc):
        c = self.num_features
        self._raise_for(self._check_in(_BACKWARD, _OK), "backward")
        buf = np.zeros(2 * c + 2)
        buf[:c] = sum_dy
        buf[c : 2 * c] = sum_dy_xc
        out = _allreduce(self.comm, buf, "backward all-reduce", self.timeout)
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
        ``MPI_Abort`` (ending every rank of the job). None waits as long as the other ranks
        are alive; see the module notes for what happens when a rank exits or dies.
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
    Every rank must build its layers in the same order with the same settings and call
    ``forward`` and ``backward`` in the same order and the same mode; when they do not,
    every rank raises :class:`RankMismatchError` naming the ranks that differ and how.
    When the input of any rank is invalid, every rank raises: the failing rank its own error,
    the others an error of the same class that names the failing rank; nothing is updated.

    Costs per training step, whatever the batch size: in the forward one ``Allgather`` of the
    ``HEADER_SIZE`` (12) float64 header and one of ``2C + 2`` float64 per rank; in the
    backward one header ``Allgather`` and one ``Allreduce`` of ``2C + 2`` float64
    (:func:`forward_bytes`, :func:`backward_bytes`).

    Raises
    ------
    ImportError
        When mpi4py or its MPI library is missing.
    RankMismatchError
        From ``forward``/``backward``, on every rank, when the ranks disagree.
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
    settings = dict(dtype=layer.dtype, eps=layer.eps, momentum=layer.momentum,
                    affine=layer.affine, track_running_stats=layer.track_running_stats,
                    unbiased=layer.unbiased, renorm=isinstance(layer, BatchRenorm))
    layer.reducer = (
        MPIReducer(comm, layer.num_features, timeout, settings=settings)
        if comm.Get_size() > 1 else LOCAL
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


def _check_in(comm: Any, phase: int, size: int, timeout: float | None) -> None:
    """The header exchange before a collective that is not a layer's (see the module notes)."""
    table = _allgather(comm, _header(phase, size=size), f"{_PHASE_NAMES[phase]} header "
                       "all-gather", timeout)
    err = _mismatch(table, comm.Get_rank(), _PHASE_NAMES[phase])
    if err is not None:
        raise err


def allreduce_grads(
    grads: Sequence[np.ndarray], comm: Any = None, *, timeout: float | None = None
) -> None:
    """Sum each gradient array over the ranks of `comm`, in place, in one ``Allreduce``.

    The arrays are packed into one float64 buffer (whatever their dtypes) so that a step costs
    one collective (after the header exchange of the module notes, which raises
    :class:`RankMismatchError` on every rank when the ranks' total sizes differ or a rank is
    in another collective), and unpacked back into their own dtype. `timeout` as in
    :class:`SyncBatchNorm`.
    """
    MPI = _mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    if comm.Get_size() == 1:
        return
    flat = np.concatenate(
        [np.asarray(g, dtype=np.float64).ravel() for g in grads] or [np.zeros(0)]
    )
    _check_in(comm, _GRADS, flat.size, timeout)
    if not grads:
        return
    out = _allreduce(comm, flat, "gradient all-reduce", timeout)
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
    timeout : float or None
        As in :class:`SyncBatchNorm`.
    """

    def __init__(self, comm: Any = None, *, timeout: float | None = None) -> None:
        from .nn import SoftmaxCrossEntropy

        MPI = _mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.timeout = timeout
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
        if self.comm.Get_size() == 1:
            total, count = local, float(n)
        else:
            _check_in(self.comm, _LOSS, 2, self.timeout)
            total, count = _allreduce(self.comm, np.array([local, float(n)]), "loss all-reduce",
                                      self.timeout)
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
        install_exit_guard()

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
        return GlobalMeanLoss(self.comm, timeout=self.timeout)

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
        allreduce_grads([g for g in model.grads.values() if g is not None], self.comm,
                        timeout=self.timeout)
