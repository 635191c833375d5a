"""Checks run on every rank under ``mpiexec`` by tests/test_distributed.py (not a test module).

Usage: ``mpiexec -n P python -m mpi4py tests/mpi_worker.py MODE [ARGS]`` (``-m mpi4py`` makes an
uncaught exception on one rank abort the job instead of hanging it). Each rank prints
``rank R ok MODE ...`` when its checks pass; any failed check raises.

Modes
-----
exact SIZES BACKENDS
    SyncBatchNorm against BatchNorm on the concatenated batch, with rank ``r`` holding
    ``SIZES[r]`` samples (comma-separated; zeros allowed): forward, backward, running
    statistics, eval mode, float32 and float64, three layouts.
bad K
    Rank K gets invalid input (feature size, dtype, NaN, dy shape); every rank must raise, and
    the layer must work afterwards.
dead
    After a first forward on every rank, rank 1 ends with ``os._exit(1)``; the others wait in
    the next forward (no timeout) until the job is ended.
train BATCH EPOCHS MAX_STEPS
    Data-parallel training with the demo's loop equals single-process training.
stuck
    After a first forward on every rank, rank 1 blocks for ever; the others have ``timeout=2``
    in the next forward and must abort the job.
variants SIZES BACKENDS
    Masks and Batch Renormalization: SyncBatchNorm with a mask against BatchNorm on the
    concatenated batch and mask, SyncBatchRenorm (with and without a mask) against BatchRenorm
    on the concatenated batch; a bad mask on one rank and a global mask with one valid value
    raise on every rank and change nothing.
mismatch KINDS TIMEOUT
    For each of KINDS (comma-separated: features, dtype, input-dtype, settings, order, mode,
    phase, grads) in turn, rank 1 differs from the others; every rank must raise
    RankMismatchError naming rank 1 and how, and no rank hang. TIMEOUT is ``none`` or seconds.
exit HOW TIMEOUT
    Rank 1 leaves after the first step (HOW: ``sys.exit``, ``raise``, ``return`` from the
    script); the others wait for it in the second forward and must end the job.
clean
    Every rank trains three steps; rank 1 exits at once, rank 0 works on for longer than the
    exit grace before it exits: a clean end, which must not be aborted.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

from batchnorm import BatchNorm, BatchRenorm
from batchnorm.distributed import SyncBatchNorm, SyncBatchRenorm

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()

# (shape of one sample, axis): the batch axis is 0 in every layout.
LAYOUTS = [((6,), 1), ((3, 4, 5), 1), ((4, 5, 3), -1)]
# The fused ReLU on two of them: its mask enters the gradient sums before they are reduced.
ACTIVATIONS = (None, "relu", "relu")
# float64: exact up to the rounding of a different summation order. float32: its round-off.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5)}


def allsum(a: np.ndarray) -> np.ndarray:
    out = np.empty_like(np.asarray(a, dtype=np.float64))
    COMM.Allreduce(np.asarray(a, dtype=np.float64), out, op=MPI.SUM)
    return out


def same_on_all_ranks(a: np.ndarray) -> bool:
    """True when `a` has the very same bytes on every rank."""
    a = np.ascontiguousarray(a)
    table = np.empty((SIZE, a.size), dtype=a.dtype)
    COMM.Allgather(a.ravel(), table)
    return all(np.array_equal(table[0].view(np.uint8), row.view(np.uint8)) for row in table)


def close(name: str, got, want, tol: dict, worst: dict) -> None:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if got.size:
        err = float(np.max(np.abs(got - want) / (tol["atol"] + tol["rtol"] * np.abs(want))))
        worst[name] = max(worst.get(name, 0.0), err)
    np.testing.assert_allclose(got, want, err_msg=f"rank {RANK}: {name}", **tol)


def check_exact(sizes: list[int], backends: list[str]) -> str:
    assert len(sizes) == SIZE, f"expected {SIZE} shard sizes, got {sizes}"
    starts = np.concatenate([[0], np.cumsum(sizes)])
    lo, hi = int(starts[RANK]), int(starts[RANK + 1])
    total = int(starts[-1])
    worst: dict[str, float] = {}
    for backend in backends:
        for dtype in (np.float64, np.float32):
            tol = TOL[dtype]
            tag = f"{backend}/{np.dtype(dtype).name[5:]}:"
            for (sample, axis), act in zip(LAYOUTS, ACTIVATIONS, strict=True):
                c = sample[axis] if axis == -1 else sample[0]
                # Every rank draws the same global data; rank r keeps rows [lo, hi).
                rng = np.random.default_rng(1234)
                ref = BatchNorm(c, axis=axis, dtype=dtype, momentum=0.8, unbiased=True,
                                backend="numpy", activation=act)
                syn = SyncBatchNorm(c, axis=axis, dtype=dtype, momentum=0.8, unbiased=True,
                                    backend=backend, activation=act)
                for layer in (ref, syn):
                    layer.gamma[:] = np.linspace(0.5, 2.0, c)
                    layer.beta[:] = np.linspace(-1.0, 1.0, c)
                for step in range(3):
                    # A large common offset: the merge must stay stable where the one-pass
                    # formula E[x^2] - E[x]^2 would cancel.
                    x = (rng.standard_normal((total, *sample)) * (1 + step) + 100).astype(dtype)
                    dy = rng.standard_normal(x.shape).astype(dtype)
                    y_ref = ref.forward(x)
                    dx_ref = ref.backward(dy)
                    y = syn.forward(x[lo:hi])
                    dx = syn.backward(dy[lo:hi])
                    assert y.dtype == dx.dtype == dtype and y.shape == (hi - lo, *sample)
                    close(tag + "y", y, y_ref[lo:hi], tol, worst)
                    close(tag + "dx", dx, dx_ref[lo:hi], tol, worst)
                    close(tag + "dgamma", allsum(syn.dgamma), ref.dgamma, tol, worst)
                    close(tag + "dbeta", allsum(syn.dbeta), ref.dbeta, tol, worst)
                    close(tag + "running_mean", syn.running_mean, ref.running_mean, tol, worst)
                    close(tag + "running_var", syn.running_var, ref.running_var, tol, worst)
                    assert syn.num_batches_tracked == ref.num_batches_tracked == step + 1
                    assert same_on_all_ranks(syn.running_mean), "running_mean differs by rank"
                    assert same_on_all_ranks(syn.running_var), "running_var differs by rank"
                # Eval mode: the local path, with the (synchronised) running statistics.
                syn.eval()
                ref.eval()
                x = rng.standard_normal((total, *sample)).astype(dtype)
                close(tag + "y_eval", syn.forward(x[lo:hi]), ref.forward(x)[lo:hi], tol, worst)
                dy = rng.standard_normal(x.shape).astype(dtype)
                close(tag + "dx_eval", syn.backward(dy[lo:hi]), ref.backward(dy)[lo:hi], tol, worst)
    # Worst error in units of the tolerance (< 1 passes), for the report.
    return " ".join(f"{k}={v:.2g}" for k, v in sorted(worst.items()))


def expect_raise(fn, cls, *needles: str) -> str:
    try:
        fn()
    except cls as err:
        msg = str(err)
        for needle in needles:
            assert needle in msg, f"rank {RANK}: {needle!r} not in {msg!r}"
        return msg
    raise AssertionError(f"rank {RANK}: expected {cls.__name__}")


def check_bad(k: int) -> str:
    c = 4
    rng = np.random.default_rng(7)
    layer = SyncBatchNorm(c, dtype=np.float64, backend="numpy")
    good = rng.standard_normal((5, c, 3))
    me = RANK == k
    peer = () if me else (f"rank {k} of {SIZE}",)
    cases = [
        ("feature size", rng.standard_normal((5, c + 1, 3)), ValueError, "num_features"),
        ("dtype", np.ones((5, c, 3), dtype=np.int64), TypeError, "dtype"),
        ("ndim", np.ones(5), ValueError, "2 dims"),
        ("nan", np.where(np.arange(5)[:, None, None] == 2, np.nan, good), ValueError, "finite"),
    ]
    for _name, bad, cls, needle in cases:
        x = bad if me else good
        expect_raise(lambda x=x: layer.forward(x), cls, *((needle,) if me else peer))
        # Nothing was updated on any rank.
        assert layer.num_batches_tracked == 0 and layer._cache is None
        assert np.all(layer.running_mean == 0) and np.all(layer.running_var == 1)
    # The layer still works, on every rank.
    layer.forward(good)
    assert layer.num_batches_tracked == 1
    dy = rng.standard_normal(good.shape)
    bad_dy = dy[:, :, :2] if me else dy
    expect_raise(lambda: layer.backward(bad_dy), (ValueError, RuntimeError),
                 *(("dy",) if me else peer))
    dx = layer.backward(dy)
    assert dx.shape == good.shape and np.isfinite(dx).all()
    # The check is in the collective: no rank proceeded past it, so all reach here together.
    COMM.Barrier()
    return f"{len(cases) + 1} bad inputs raised on every rank"


def check_train(batch_size: int, epochs: int, max_steps: int) -> str:
    """Data-parallel training with the demo's loop against the same training in one process
    (run on every rank, without communication): curves, losses and parameters.

    ``max_steps > 0`` trains that many steps only, with the one-step tolerance 1e-9 (tiny
    batches, with a rank holding none, are chaotic: round-off grows ~100x per step there).
    """
    from batchnorm.apps.data import load_dataset
    from batchnorm.apps.demo import build_model, make_batches, train_network
    from batchnorm.distributed import DataParallel
    from batchnorm.nn import SGD

    data = load_dataset("digits").subset(300, seed=0).flat()
    batches = make_batches(len(data.x_train), batch_size, epochs, seed=0)
    if max_steps:
        batches = [batches[0][:max_steps]]
    tol = 1e-9 if max_steps else 1e-6
    dp = DataParallel()
    runs = {}
    for name in ("single", "parallel"):
        model = build_model("mlp", data, batchnorm=True, weight_init="he", seed=[0, 1])
        kw = {}
        if name == "parallel":
            model = dp.prepare(model)
            kw = dict(grad_hook=dp.grad_hook, shard=dp.shard, loss_fn=dp.loss_fn())
        hist = train_network(model, SGD(model.params, 0.05), data, batches, eval_every=1, **kw)
        runs[name] = (hist, model)
    (h1, m1), (hp, mp) = runs["single"], runs["parallel"]
    assert hp.steps == h1.steps and hp.diverged_at_step is None
    # After one step: loss and parameters within 1e-9; over the run, curves within 1e-6.
    first = max(abs(a - b) / abs(b) for a, b in zip(hp.loss[:1], h1.loss[:1], strict=True))
    worst_loss = max(abs(a - b) / abs(b) for a, b in zip(hp.loss, h1.loss, strict=True))
    acc = [(hp.test_acc, h1.test_acc), (hp.train_acc, h1.train_acc),
           (hp.step_test_acc, h1.step_test_acc)]
    worst_acc = max(abs(a - b) for u, v in acc for a, b in zip(u, v, strict=True))
    # Relative to the largest parameter: the biases before batch norm get no gradient in
    # exact arithmetic and stay at round-off (1e-18), where elementwise relative errors mean
    # nothing.
    scale = max(float(np.max(np.abs(p))) for p in m1.params.values())
    worst_param = max(float(np.max(np.abs(mp.params[k] - m1.params[k]))) for k in m1.params)
    worst_param /= scale
    assert worst_loss < tol and worst_acc == 0.0 and worst_param < tol, (
        worst_loss, worst_acc, worst_param)
    for k, v in mp.params.items():
        assert same_on_all_ranks(v), f"parameter {k} differs between ranks"
    for layer in mp.layers:
        if isinstance(layer, SyncBatchNorm):
            assert same_on_all_ranks(layer.running_var)
    return (f"steps={hp.steps} loss_rel_first_epoch={first:.1e} loss_rel_max={worst_loss:.1e} "
            f"acc_diff_max={worst_acc} param_rel_max={worst_param:.1e}")


def check_variants(sizes: list[int], backends: list[str]) -> str:
    assert len(sizes) == SIZE, f"expected {SIZE} shard sizes, got {sizes}"
    starts = np.concatenate([[0], np.cumsum(sizes)])
    lo, hi = int(starts[RANK]), int(starts[RANK + 1])
    total = int(starts[-1])
    worst: dict[str, float] = {}
    runs = 0
    for backend in backends:
        for dtype in (np.float64, np.float32):
            tol = TOL[dtype]
            for sample, axis in LAYOUTS:
                ax = axis % (len(sample) + 1)
                c = sample[ax - 1]
                mshape = tuple(s for i, s in enumerate(sample) if i != ax - 1)
                for kind in ("masked", "renorm", "masked-renorm"):
                    tag = f"{backend}/{np.dtype(dtype).name[5:]}/{kind}:"
                    rng = np.random.default_rng(99)  # the same global data on every rank
                    kw = dict(axis=axis, dtype=dtype, momentum=0.8, unbiased=True)
                    if kind == "masked":
                        ref = BatchNorm(c, backend="numpy", **kw)
                        syn = SyncBatchNorm(c, backend=backend, **kw)
                    else:
                        ref = BatchRenorm(c, rmax=1.4, dmax=0.6, backend="numpy", **kw)
                        syn = SyncBatchRenorm(c, rmax=1.4, dmax=0.6, backend=backend, **kw)
                    for layer in (ref, syn):
                        layer.gamma[:] = np.linspace(0.5, 2.0, c)
                        layer.beta[:] = np.linspace(-1.0, 1.0, c)
                    for step in range(3):
                        x = (rng.standard_normal((total, *sample)) * (1 + step) + 100
                             + step).astype(dtype)
                        dy = rng.standard_normal(x.shape).astype(dtype)
                        mask = None
                        if kind != "renorm":
                            mask = rng.random((total, *mshape)) > 0.4
                            mask[:2] = True  # at least 2 valid values in the global batch
                            if step == 1 and sizes[-1] > 0 and starts[-2] >= 2:
                                mask[starts[-2]:] = False  # a shard with no valid value
                            # Padding holds values the statistics must not see.
                            x = np.where(np.expand_dims(mask, ax), x, dtype(1e3))
                        y_ref = ref.forward(x, mask)
                        dx_ref = ref.backward(dy)
                        y = syn.forward(x[lo:hi], None if mask is None else mask[lo:hi])
                        dx = syn.backward(dy[lo:hi])
                        close(tag + "y", y, y_ref[lo:hi], tol, worst)
                        close(tag + "dx", dx, dx_ref[lo:hi], tol, worst)
                        close(tag + "dgamma", allsum(syn.dgamma), ref.dgamma, tol, worst)
                        close(tag + "dbeta", allsum(syn.dbeta), ref.dbeta, tol, worst)
                        close(tag + "running_mean", syn.running_mean, ref.running_mean, tol,
                              worst)
                        close(tag + "running_var", syn.running_var, ref.running_var, tol, worst)
                        assert same_on_all_ranks(syn.running_var)
                    runs += 1
    # Bad masks: on one rank (its dtype or shape), or too few valid values over all ranks.
    layer = SyncBatchNorm(3, dtype=np.float64, backend="numpy")
    x = np.random.default_rng(RANK).standard_normal((max(sizes[RANK], 1), 3, 4))
    good = np.ones((x.shape[0], 4), bool)
    peer = (f"rank 0 of {SIZE}",)
    cases = [
        (good.astype(np.int8), TypeError, ("bool",) if RANK == 0 else peer),
        (good[:, :3], ValueError, ("mask of shape",) if RANK == 0 else peer),
    ]
    for bad, cls, needles in cases:
        mask = bad if RANK == 0 else good
        expect_raise(lambda mask=mask: layer.forward(x, mask), cls, *needles)
        assert layer.num_batches_tracked == 0 and layer._cache is None
    one = np.zeros_like(good)
    if RANK == SIZE - 1:
        one[0, 0] = True  # one valid value in the whole global batch
    expect_raise(lambda: layer.forward(x, one), ValueError, "got 1 for each of the 3 features")
    assert layer.num_batches_tracked == 0 and np.all(layer.running_var == 1)
    layer.forward(x, good)
    assert layer.num_batches_tracked == 1
    COMM.Barrier()
    return f"{runs} runs " + " ".join(f"{k}={v:.2g}" for k, v in sorted(worst.items()))
def check_mismatch(kind: str, timeout: float | None) -> str:
    from batchnorm import distributed
    from batchnorm.distributed import allreduce_grads

    # Any exception before the mismatch check existed: the needle check then fails, not the
    # import.
    RankMismatchError = getattr(distributed, "RankMismatchError", Exception)  # noqa: N806

    odd = RANK == 1
    kw = dict(dtype=np.float32, backend="numpy", timeout=timeout)
    rng = np.random.default_rng(RANK)
    needle = {
        "features": "num_features=5 (rank 0: 4)",
        "dtype": "dtype=float64 (rank 0: float32)",
        "input-dtype": "rank 1's input is computed in float64 (rank 0: float32)",
        "settings": "eps=0.001 (rank 0: 1e-05), momentum=0.5 (rank 0: 0.9)",
        "order": "rank 1 is in SyncBatchNorm.forward of layer #",
        "mode": "rank 1 is in SyncBatchNorm.forward of layer #",
        "phase": "rank 1 is in SyncBatchNorm.backward of layer #",
        "grads": "rank 1 is in allreduce_grads of 4 values",
    }[kind]
    if kind == "features":
        layer = SyncBatchNorm(5 if odd else 4, **kw)
        calls = [lambda: layer.forward(rng.standard_normal((6, layer.num_features)))]
    elif kind in ("dtype", "input-dtype", "settings"):
        extra = {"dtype": dict(dtype=np.float64),
                 "settings": dict(eps=1e-3, momentum=0.5)}.get(kind, {}) if odd else {}
        layer = SyncBatchNorm(4, **{**kw, **extra})
        x_dtype = np.float64 if odd and kind == "input-dtype" else np.float32
        calls = [lambda: layer.forward(rng.standard_normal((6, 4)).astype(x_dtype))]
    elif kind in ("order", "mode"):
        a, b = SyncBatchNorm(4, **kw), SyncBatchNorm(4, **kw)
        x = rng.standard_normal((6, 4)).astype(np.float32)
        if kind == "order":
            first, second = (b, a) if odd else (a, b)
        else:
            first, second = a, b
            if odd:
                a.eval()  # no communication: rank 1 reaches b while the others are in a
        calls = [lambda: first.forward(x), lambda: second.forward(x)]
    elif kind in ("phase", "grads"):
        layer = SyncBatchNorm(4, **kw)
        x = rng.standard_normal((6, 4)).astype(np.float32)
        layer.forward(x)  # in step
        if kind == "phase":
            calls = [(lambda: layer.backward(np.ones_like(x))) if odd else
                     (lambda: layer.forward(x))]
        else:
            calls = [(lambda: allreduce_grads([np.ones(4)], COMM, timeout=timeout)) if odd else
                     (lambda: layer.forward(x))]
    else:
        raise SystemExit(f"unknown mismatch kind {kind!r}")
    raised = None
    for call in calls:
        try:
            call()
        except RankMismatchError as err:
            raised = str(err)
            break
    assert raised is not None, f"rank {RANK}: no RankMismatchError for {kind}"
    assert needle in raised and f"of {SIZE}" in raised, (needle, raised)
    return raised.split(": the ranks disagree: ")[1][:40]


def run_clean() -> str:
    layer = SyncBatchNorm(3, dtype=np.float64, backend="numpy")
    x = np.random.default_rng(RANK).standard_normal((4, 3))
    for _ in range(3):
        layer.forward(x)
        layer.backward(x)
    if RANK == 0:
        from batchnorm import distributed

        # Rank 1 has long exited: work on, then end cleanly.
        time.sleep(getattr(distributed, "EXIT_GRACE", 2.0) + 1.5)
    return "three steps"


def run_exit(how: str, timeout: float | None) -> str:
    # Everyone alive first, without a timeout (ranks may start seconds apart).
    first = SyncBatchNorm(3, dtype=np.float64, backend="numpy")
    layer = SyncBatchNorm(3, dtype=np.float64, backend="numpy", timeout=timeout)
    x = np.random.default_rng(RANK).standard_normal((4, 3))
    first.forward(x)
    print(f"rank {RANK} passed the first forward", flush=True)
    COMM.Barrier()
    if RANK == 1:
        if how == "sys.exit":
            sys.exit()
        if how == "raise":
            raise RuntimeError("rank 1 gives up")
        raise _Leave
    layer.forward(x)
    return "second forward returned (it should not have)"


class _Leave(Exception):
    """Ends the script on this rank as falling off its end would (rc 0)."""


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "exact":
        info = check_exact([int(s) for s in argv[1].split(",")], argv[2].split(","))
    elif mode == "train":
        info = check_train(int(argv[1]), int(argv[2]), int(argv[3]))
    elif mode == "bad":
        info = check_bad(int(argv[1]))
    elif mode == "variants":
        info = check_variants([int(s) for s in argv[1].split(",")], argv[2].split(","))
    elif mode == "mismatch":
        timeout = None if argv[2] == "none" else float(argv[2])
        info = " | ".join(f"{k}: {check_mismatch(k, timeout)}" for k in argv[1].split(","))
    elif mode == "clean":
        info = run_clean()
    elif mode == "exit":
        try:
            info = run_exit(argv[1], None if argv[2] == "none" else float(argv[2]))
        except _Leave:
            return 0
    elif mode in ("dead", "stuck"):
        # Everyone alive: no timeout (ranks may start seconds apart on a loaded machine).
        first = SyncBatchNorm(3, dtype=np.float64, backend="numpy")
        layer = SyncBatchNorm(3, dtype=np.float64, backend="numpy",
                              timeout=2.0 if mode == "stuck" else None)
        x = np.random.default_rng(RANK).standard_normal((4, 3))
        first.forward(x)
        print(f"rank {RANK} passed the first forward", flush=True)
        COMM.Barrier()  # every rank has printed before rank 1 leaves
        if RANK == 1:
            if mode == "dead":
                os._exit(1)
            threading.Event().wait()  # "stuck": until the job is ended
        layer.forward(x)
        info = "second forward returned (it should not have)"
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"rank {RANK} ok {mode} {info}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
