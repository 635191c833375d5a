"""Inference time of the demo's networks before and after folding batch norm into the layers
before it (``batchnorm.nn.fold_batchnorm``).

The networks are those of ``batchnorm demo``: the MLP (64 -> 5 x 100 -> 10, batch norm after
each hidden affine layer) and the CNN (two 3x3 conv blocks of 8 and 16 channels with per-channel
batch norm, a hidden layer of 100 with batch norm), float64 and the NumPy backend by default, as
the demo runs them. Random inputs of the digits' shape; the timings do not depend on the values.

Each round times one eval-mode forward of the unfolded and of the folded model, in alternating
order, so that a slow spell of a shared machine hits both; the table shows the median per
forward over the rounds, the median of the per-round ratios folded/unfolded, and the largest
difference between the two models' outputs.

Usage, from the repository root: ``.venv/bin/python benchmarks/fold.py [--rounds 201]
[--dtype float32] [--backend numba] [--blas-threads 2]`` (with the library installed or
``src`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import numpy as np

from batchnorm import BatchNorm
from batchnorm.nn import cnn, fold_batchnorm, mlp


def build(kind: str, dtype: np.dtype, backend: str):
    """The demo's network with 'trained' batch-norm state (random gamma, beta, statistics)."""
    rng = np.random.default_rng(0)
    kw = dict(batchnorm=True, rng=rng, dtype=dtype, backend=backend)
    model = mlp(64, 10, (100,) * 5, **kw) if kind == "mlp" else cnn(
        (1, 8, 8), 10, channels=(8, 16), hidden=(100,), **kw
    )
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            c = layer.num_features
            layer.gamma[:] = rng.uniform(0.5, 2.0, c)
            layer.beta[:] = rng.standard_normal(c)
            layer.running_mean[:] = rng.standard_normal(c)
            layer.running_var[:] = rng.uniform(0.5, 2.0, c)
    return model.eval()


def blas_threads(n: int):
    """Limit BLAS to `n` threads, as the demo does (its 100x100 matrices gain nothing from a
    second thread on busy cores), when threadpoolctl (a scikit-learn dependency) is there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def time_pair(a, b, x: np.ndarray, rounds: int) -> tuple[float, float, float]:
    """Median seconds per forward of `a` and `b`, and the median per-round ratio b/a."""
    for m in (a, b):  # warm up (first calls allocate, numba may compile)
        m.forward(x)
    ta, tb = [], []
    # Several forwards per sample when one is short, so that the timer's resolution and the
    # loop cost stay small against what is measured.
    t0 = time.perf_counter()
    a.forward(x)
    reps = max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-7)))
    for r in range(rounds):
        order = (a, b) if r % 2 == 0 else (b, a)
        for m in order:
            t = time.perf_counter()
            for _ in range(reps):
                m.forward(x)
            dt = (time.perf_counter() - t) / reps
            (ta if m is a else tb).append(dt)
    ratios = [y / x_ for x_, y in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=201, help="interleaved rounds per case (201)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--backend", default="numpy", help="batch-norm backend (numpy, as the demo)")
    p.add_argument("--blas-threads", type=int, default=1, help="BLAS threads (1, as the demo)")
    p.add_argument("--batches", default="1,100,360",
                   help="comma-separated batch sizes (360: the digits test set)")
    args = p.parse_args(argv)
    dtype = np.dtype(args.dtype)
    sizes = [int(s) for s in args.batches.split(",")]
    print(f"# fold benchmark: eval forward, {dtype.name}, batch-norm backend {args.backend!r}, "
          f"median of {args.rounds} interleaved rounds, {args.blas_threads} BLAS thread(s)")
    print(f"# Python {platform.python_version()}, NumPy {np.__version__}, "
          f"{os.cpu_count()} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print()
    print("| network | batch | layers before -> after | unfolded ms | folded ms | "
          "folded/unfolded | max abs diff |")
    print("|---|---:|---|---:|---:|---:|---:|")
    with blas_threads(args.blas_threads):
        run(args, dtype, sizes)
    return 0


def run(args: argparse.Namespace, dtype: np.dtype, sizes: list[int]) -> None:
    for kind in ("mlp", "cnn"):
        model = build(kind, dtype, args.backend)
        folded = fold_batchnorm(model)
        rng = np.random.default_rng(1)
        for n in sizes:
            shape = (n, 64) if kind == "mlp" else (n, 1, 8, 8)
            x = rng.uniform(0.0, 1.0, shape).astype(dtype)
            diff = float(np.abs(folded.forward(x) - model.forward(x)).max())
            t_a, t_b, ratio = time_pair(model, folded, x, args.rounds)
            print(f"| {kind} | {n} | {len(model.layers)} -> {len(folded.layers)} | "
                  f"{t_a * 1e3:.3f} | {t_b * 1e3:.3f} | {ratio:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
