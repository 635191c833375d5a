"""``batchnorm bench``: the backends against PyTorch, side by side in one process.

For each case and mode (training forward+backward, inference forward) the implementations
run round-robin, so that a slow spell of the machine hits all of them alike, and the table
shows each one's median time, the ratio fast/PyTorch (median of the per-round ratios), the
bandwidth the fast backend reaches and that as a fraction of the copy bandwidth measured in
the same run. What is timed is what a user calls:

- ours: ``batch_norm_train`` + ``batch_norm_backward`` (training) and
  ``batch_norm_inference`` (inference) with ``backend="numpy"`` and ``backend="numba"``;
- PyTorch: ``torch.nn.functional.batch_norm(training=True)`` + ``.backward()`` through
  autograd with ``requires_grad`` on x, weight and bias, and ``training=False`` under
  ``torch.no_grad()``.

Two cases time the layers, where the per-call overhead of small batches shows:

- ``layer``: ``batchnorm.BatchNorm(256)`` on (64, 256) float32, ``y = bn.forward(x);
  bn.backward(dy)`` in training and ``bn.forward(x)`` in eval mode, against PyTorch's
  ``nn.BatchNorm1d(256)`` (forward + autograd backward; eval forward under ``no_grad``);
- ``book``: ``batchnorm.BatchNormalization`` (the book's interface) on (100, 100) float64,
  ``forward(x, train_flg=True)`` + ``backward(dout)`` and ``forward(x, train_flg=False)``,
  against :class:`BookReference`, the book's algorithm in plain NumPy (column ``book``), and
  PyTorch's ``nn.BatchNorm1d(100)`` in float64.

Mode ``relu`` times batch norm followed by a ReLU, training forward+backward: ours fused
(``activation="relu"``; implementations ``numpy``, ``numba``, ``numba-reuse``), ours unfused
(``numba-unfused``: the numba kernels, then the toolkit's ``ReLU`` forward and backward) and
PyTorch's ``relu(batch_norm(x))`` (``inplace=False``) through autograd.

``numba-reuse`` is the numba backend writing into the same output arrays every call (``out=`` on
the kernels; ``BatchNorm(reuse_outputs=True)`` for the layer case) instead of new ones: fresh
arrays cost page faults on large inputs.

Bytes moved count whole-array passes: 8 for forward+backward (forward: read x twice, write y;
backward: read dy and x twice, write dx), 10 for the fused batch norm + ReLU (the backward also
reads the output y' twice, for the ReLU's mask), 2 for inference (read x, write y). The copy
bandwidth is ``np.copyto`` between two 64 MiB arrays (one thread, read + write).

The first-call cost is measured in fresh subprocesses: once with an empty numba cache
directory (the kernels compile) and once with that directory filled (they are loaded).

``batchnorm bench --sync`` runs :mod:`batchnorm.apps.bench_sync` instead (SyncBatchNorm over
MPI).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import check_output_file, int_at_least, write_text_atomic

__all__ = ["CASES", "BookReference", "main"]


@dataclass(frozen=True)
class Case:
    """One benchmark: ``shape`` of the NumPy input, feature ``axis``, what is timed (``kind``:
    the functional kernels, the ``BatchNorm`` layer or the book's layer) and the ``dtype``."""

    name: str
    shape: tuple[int, ...]
    axis: int
    label: str
    kind: str = "kernel"
    dtype: str = "float32"


CASES = {
    c.name: c
    for c in (
        Case("S1", (256, 64, 32, 32), 1, "NCHW (256,64,32,32)"),
        Case("S2", (64, 256, 14, 14), 1, "NCHW (64,256,14,14)"),
        Case("S3", (1024, 4096), 1, "(N,D) (1024,4096)"),
        Case("S4", (8192, 512), 1, "(N,D) (8192,512)"),
        Case("S5", (64, 14, 14, 256), -1, "NHWC (64,14,14,256)"),
        Case("small", (32, 128), 1, "(N,D) (32,128)"),
        Case("layer", (64, 256), 1, "BatchNorm(256) (64,256)", kind="layer"),
        Case("book", (100, 100), 1, "BatchNormalization (100,100) float64", kind="book",
             dtype="float64"),
    )
}
PASSES = {"train": 8, "infer": 2, "relu": 10}
MODES = {"train": "training fwd+bwd", "infer": "inference fwd",
         "relu": "BN+ReLU training fwd+bwd"}
IMPLS = ("numpy", "numba", "numba-reuse", "numba-unfused", "torch")
# Which implementations run the numba backend (and need numba installed).
_NUMBA_IMPLS = ("numba", "numba-reuse", "numba-unfused")
BOOK_MOMENTUM = 0.9
BOOK_EPS = 1e-6  # the book's 10e-7


# ---------------------------------------------------------------------------------------------
# the timed callables


def _ours(case: Case, mode: str, impl: str, x, dy, g, b, mean, var) -> Callable[[], Any]:
    from ..functional import batch_norm_backward, batch_norm_inference, batch_norm_train
    from ..nn.layers import ReLU

    backend = "numpy" if impl == "numpy" else "numba"
    act = "relu" if mode == "relu" and impl != "numba-unfused" else None
    out_y = out_dx = None
    if impl == "numba-reuse":
        out_y, out_dx = np.empty_like(x), np.empty_like(x)
    if mode in ("train", "relu"):
        relu = ReLU() if impl == "numba-unfused" else None

        def run():
            y, cache = batch_norm_train(x, g, b, axis=case.axis, backend=backend,
                                        activation=act, out=out_y)
            if relu is None:
                return batch_norm_backward(dy, cache, out=out_dx)
            relu.forward(y)
            return batch_norm_backward(relu.backward(dy), cache)

    else:

        def run():
            return batch_norm_inference(x, g, b, mean, var, axis=case.axis, backend=backend,
                                        out=out_y)

    return run


def _ours_layer(case: Case, mode: str, impl: str, x, dy, g, b, mean, var
                ) -> Callable[[], Any]:
    from ..layers import BatchNorm, BatchNormalization

    backend = "numpy" if impl == "numpy" else "numba"

    if case.kind == "book":
        book = BatchNormalization(g.copy(), b.copy(), BOOK_MOMENTUM, mean.copy(), var.copy(),
                                  BOOK_EPS, backend=backend)
        if mode == "train":

            def run():
                book.forward(x, train_flg=True)
                return book.backward(dy)

        else:

            def run():
                return book.forward(x, train_flg=False)

        return run

    bn = BatchNorm(x.shape[case.axis], axis=case.axis, dtype=x.dtype, backend=backend,
                   reuse_outputs=impl == "numba-reuse")
    bn.gamma[:], bn.beta[:] = g, b
    bn.running_mean[:], bn.running_var[:] = mean, var
    if mode == "train":

        def run():
            bn.forward(x)
            return bn.backward(dy)

    else:
        bn.eval()

        def run():
            return bn.forward(x)

    return run


class BookReference:
    """The book's batch-normalization layer, written here in plain NumPy from its formulas: the
    baseline of the ``book`` case (and checked against :class:`batchnorm.BatchNormalization` by
    the tests).

    Parameters
    ----------
    gamma, beta : ndarray of shape (D,)
    momentum : float
        Weight of the old running value: ``running = momentum * running + (1 - momentum) *
        batch``.
    running_mean, running_var : ndarray of shape (D,)
    eps : float

    Notes
    -----
    Training forward, for ``x`` of shape (N, D): ``mu = mean(x)``, ``xc = x - mu``,
    ``var = mean(xc**2)`` (biased), ``std = sqrt(var + eps)``, ``xn = xc / std``,
    ``y = gamma * xn + beta``. Backward::

        dbeta = sum(dout), dgamma = sum(xn * dout), dxn = gamma * dout, dxc = dxn / std,
        dstd = -sum(dxn * xc / std**2), dvar = 0.5 * dstd / std, dxc += (2 / N) * xc * dvar,
        dmu = sum(dxc), dx = dxc - dmu / N

    with every sum over the batch axis.
    """

    def __init__(self, gamma: np.ndarray, beta: np.ndarray, momentum: float,
                 running_mean: np.ndarray, running_var: np.ndarray, eps: float) -> None:
        self.gamma, self.beta, self.momentum, self.eps = gamma, beta, momentum, eps
        self.running_mean, self.running_var = running_mean, running_var
        self.dgamma = self.dbeta = None

    def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
        if train_flg:
            mu = x.mean(axis=0)
            xc = x - mu
            var = np.mean(xc * xc, axis=0)
            std = np.sqrt(var + self.eps)
            xn = xc / std
            self._n, self._xc, self._xn, self._std = x.shape[0], xc, xn, std
            m = self.momentum
            self.running_mean = m * self.running_mean + (1.0 - m) * mu
            self.running_var = m * self.running_var + (1.0 - m) * var
        else:
            xn = (x - self.running_mean) / np.sqrt(self.running_var + self.eps)
        return self.gamma * xn + self.beta

    def backward(self, dout: np.ndarray) -> np.ndarray:
        n, xc, xn, std = self._n, self._xc, self._xn, self._std
        self.dbeta = dout.sum(axis=0)
        self.dgamma = np.sum(xn * dout, axis=0)
        dxn = self.gamma * dout
        dxc = dxn / std
        dstd = -np.sum(dxn * xc / (std * std), axis=0)
        dvar = 0.5 * dstd / std
        dxc += (2.0 / n) * xc * dvar
        dmu = np.sum(dxc, axis=0)
        return dxc - dmu / n


def _book_reference(mode: str, x, dy, g, b, mean, var) -> Callable[[], Any]:
    ref = BookReference(g.copy(), b.copy(), BOOK_MOMENTUM, mean.copy(), var.copy(), BOOK_EPS)
    if mode == "train":

        def run():
            ref.forward(x, train_flg=True)
            return ref.backward(dy)

    else:

        def run():
            return ref.forward(x, train_flg=False)

    return run


def _torch_layer(case: Case, mode: str, x, dy, g, b, mean, var) -> Callable[[], Any]:
    import torch

    c = x.shape[case.axis]
    dtype = getattr(torch, x.dtype.name)
    m = torch.nn.BatchNorm1d(c, eps=BOOK_EPS if case.kind == "book" else 1e-5, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(g))
        m.bias.copy_(torch.from_numpy(b))
        m.running_mean.copy_(torch.from_numpy(mean))
        m.running_var.copy_(torch.from_numpy(var))
    xt = torch.from_numpy(x.copy()).requires_grad_(mode != "infer")
    dyt = torch.from_numpy(dy)
    if mode == "train":

        def run():
            xt.grad = m.weight.grad = m.bias.grad = None  # fresh gradients each call, like ours
            m(xt).backward(dyt)
            return xt.grad

    else:
        m.eval()

        def run():
            with torch.no_grad():
                return m(xt)

    return run


def _torch(case: Case, mode: str, x, dy, g, b, mean, var) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as tf

    def to_t(a):
        t = torch.from_numpy(a)
        # Channels-last data goes to PyTorch as an (N, C, H, W) view with channels_last strides,
        # which is what its channels-last kernels take.
        return t.movedim(-1, 1) if case.axis == -1 else t

    xt = to_t(x.copy()).requires_grad_(mode != "infer")
    dyt = to_t(dy)
    w = torch.from_numpy(g.copy()).requires_grad_(mode != "infer")
    bt = torch.from_numpy(b.copy()).requires_grad_(mode != "infer")
    rm, rv = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())

    if mode in ("train", "relu"):
        relu = mode == "relu"

        def run():
            xt.grad = w.grad = bt.grad = None  # fresh gradients each call, like ours
            y = tf.batch_norm(xt, None, None, w, bt, training=True, eps=1e-5)
            if relu:
                y = tf.relu(y)  # not inplace: what nn.ReLU() does by default
            y.backward(dyt)
            return xt.grad

    else:

        def run():
            with torch.no_grad():
                return tf.batch_norm(xt, rm, rv, w, bt, training=False, eps=1e-5)

    return run


def _calibrate(fn: Callable[[], Any], min_seconds: float) -> int:
    """Calls per sample so that one sample lasts at least `min_seconds` (for tiny cases)."""
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    return max(1, min(10_000, math.ceil(min_seconds / max(dt, 1e-9))))


def _sample(fn: Callable[[], Any], number: int) -> float:
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t) / number


def copy_bandwidth(nbytes: int = 64 << 20, repeat: int = 7) -> float:
    """GB/s of ``np.copyto`` between two arrays of `nbytes` (bytes read + written)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------
# first-call cost in a fresh process

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import batchnorm as bn
be = bn.get_backend("numba")
t_import = time.perf_counter() - t0
out = {"import_ms": t_import * 1e3}
for name, shape, axis in json.loads(sys.argv[1]):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    c = shape[axis]
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=be)
        bn.batch_norm_backward(x, cache)
        times.append(time.perf_counter() - t)
    out[name] = {"first_ms": times[0] * 1e3, "third_ms": times[2] * 1e3}
print(json.dumps(out))
"""


def first_call_cost(cases: list[Case], threads: int) -> dict[str, Any]:
    """Time the first training call per case in fresh processes, cold cache then warm cache.

    Returns
    -------
    dict
        ``{"cold": {...}, "warm": {...}}`` with ``import_ms`` and per case ``first_ms`` and
        ``third_ms`` (a steady call, for comparison); or ``{"error": ...}``.
    """
    spec = json.dumps([[c.name, list(c.shape), c.axis] for c in cases])
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="batchnorm-bench-cache-") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "NUMBA_NUM_THREADS": str(threads)}
        for label in ("cold", "warm"):
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, spec],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if proc.returncode != 0:
                return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
            out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------------
# environment


def _machine(threads: int, torch_version: str | None) -> dict[str, Any]:
    from .. import __version__
    from .info import _cpu_model

    d: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "batchnorm": __version__,
        "torch": torch_version,
    }
    try:
        import numba

        d["numba"] = numba.__version__
        d["threading_layer"] = numba.threading_layer()
    except (ImportError, ValueError):
        d.setdefault("numba", None)
    return d


class _Progress:
    """tqdm on stderr when available, else one plain line per step."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.done = 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False)

    def step(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(text)
            self.bar.update(1)
        else:
            self.done += 1
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.set_description(text)
            else:
                print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# the run


def run_case(
    case: Case, mode: str, impls: list[str], repeat: int, min_sample: float, progress: _Progress
) -> dict[str, Any]:
    """Median seconds per call of each implementation, interleaved round-robin.

    The ``book`` case also runs :class:`BookReference` (as implementation ``"book"``).
    Implementations that do not apply to the case and mode are left out: ``numba-unfused``
    runs in mode ``relu`` only, mode ``relu`` only for the kernel cases, ``numba-reuse`` not
    for the book's layer.
    """
    rng = np.random.default_rng(0)
    dt = np.dtype(case.dtype)
    x = rng.standard_normal(case.shape).astype(dt)
    dy = rng.standard_normal(case.shape).astype(dt)
    c = case.shape[case.axis]
    g = rng.normal(1.0, 0.1, c).astype(dt)
    b = rng.normal(0.0, 0.1, c).astype(dt)
    mean = rng.normal(0.0, 0.1, c).astype(dt)
    var = rng.uniform(0.5, 1.5, c).astype(dt)
    arrays = (x, dy, g, b, mean, var)
    fns = {}
    for name in impls:
        if name == "numba-unfused" and mode != "relu":
            continue
        if name == "numba-reuse" and case.kind == "book":
            continue
        if name == "torch":
            make = _torch if case.kind == "kernel" else _torch_layer
            fns[name] = make(case, mode, *arrays)
        elif case.kind == "kernel":
            fns[name] = _ours(case, mode, name, *arrays)
        else:
            fns[name] = _ours_layer(case, mode, name, *arrays)
    if case.kind == "book":
        fns["book"] = _book_reference(mode, *arrays)
    numbers = {}
    for name, fn in fns.items():
        progress.note(f"{case.name} {mode}: warming up {name}")
        fn()  # compile / load kernels, first touch
        numbers[name] = _calibrate(fn, min_sample)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    ratios, book_ratios, reuse_ratios, fusion = [], [], [], []
    order = list(fns)
    for r in range(repeat):
        rot = order[r % len(order) :] + order[: r % len(order)]
        for name in rot:
            samples[name].append(_sample(fns[name], numbers[name]))
        if "numba" in fns and "torch" in fns:
            ratios.append(samples["numba"][-1] / samples["torch"][-1])
        if "numba" in fns and "book" in fns:
            book_ratios.append(samples["numba"][-1] / samples["book"][-1])
        if "numba-reuse" in fns and "torch" in fns:
            reuse_ratios.append(samples["numba-reuse"][-1] / samples["torch"][-1])
        if "numba-unfused" in fns and "numba" in fns:
            fusion.append(samples["numba-unfused"][-1] / samples["numba"][-1])
        progress.step(f"{case.name} {mode} round {r + 1}/{repeat}")
    nbytes = PASSES[mode] * x.nbytes
    res: dict[str, Any] = {
        "case": case.name,
        "label": case.label,
        "mode": mode,
        "bytes": nbytes,
        "median_ms": {n: statistics.median(s) * 1e3 for n, s in samples.items()},
        "calls_per_sample": numbers,
    }
    res["ratio_fast_torch"] = statistics.median(ratios) if ratios else None
    res["ratio_fast_book"] = statistics.median(book_ratios) if book_ratios else None
    res["ratio_reuse_torch"] = statistics.median(reuse_ratios) if reuse_ratios else None
    # > 1: how many times faster the fused layer is than batch norm followed by a ReLU layer
    res["speedup_fused"] = statistics.median(fusion) if fusion else None
    fast = res["median_ms"].get("numba")
    res["fast_gbs"] = nbytes / (fast * 1e-3) / 1e9 if fast else None
    return res


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: list[dict[str, Any]], copy_gbs: float) -> str:
    """The results as a Markdown table."""
    head = (
        "| case | mode | numpy ms | numba ms | reuse ms | torch ms | numba/torch | reuse/torch "
        "| unfused ms | unfused/fused | numba GB/s | of copy | book ms | numba/book |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        ms = r["median_ms"]
        gbs = r["fast_gbs"]
        rows.append(
            f"| {r['case']} {r['label']} | {MODES[r['mode']]} | {_fmt(ms.get('numpy'), '.3f')} "
            f"| {_fmt(ms.get('numba'), '.3f')} | {_fmt(ms.get('numba-reuse'), '.3f')} "
            f"| {_fmt(ms.get('torch'), '.3f')} "
            f"| {_fmt(r['ratio_fast_torch'], '.2f')} | {_fmt(r.get('ratio_reuse_torch'), '.2f')} "
            f"| {_fmt(ms.get('numba-unfused'), '.3f')} | {_fmt(r.get('speedup_fused'), '.2f')} "
            f"| {_fmt(gbs, '.1f')} | {_fmt(None if gbs is None else gbs / copy_gbs, '.0%')} "
            f"| {_fmt(ms.get('book'), '.3f')} | {_fmt(r.get('ratio_fast_book'), '.2f')} |"
        )
    return "\n".join(rows)


def _first_call_text(fc: dict[str, Any]) -> str:
    if "error" in fc:
        return f"first call in a fresh process: failed ({fc['error']})"
    lines = ["first call in a fresh process (import, then training fwd+bwd, float32):"]
    for label in ("cold", "warm"):
        d = fc[label]
        what = "empty numba cache: compiles" if label == "cold" else "cache filled: loads"
        parts = [f"import {d['import_ms']:.0f} ms"]
        parts += [
            f"{k} first {v['first_ms']:.0f} ms (steady {v['third_ms']:.2f} ms)"
            for k, v in d.items()
            if isinstance(v, dict)
        ]
        lines.append(f"  {label} ({what}): " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm bench``.

    Parameters
    ----------
    argv : list of str or None
        Arguments after ``bench``; ``--sync`` hands everything to ``batchnorm.apps.bench_sync``.

    Returns
    -------
    int
        Exit status: 0, or 2 for bad arguments.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--sync" in argv:
        from . import bench_sync

        return int(bench_sync.main(argv) or 0)

    p = argparse.ArgumentParser(
        prog="batchnorm bench",
        description="Time the NumPy and numba backends against PyTorch, interleaved in one "
        "process (float32). --sync benchmarks SyncBatchNorm over MPI instead.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--save", metavar="PATH", help="also write the JSON to PATH")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="threads for numba and PyTorch (default: numba's default, all cores)")
    p.add_argument("--repeat", type=int_at_least(1), default=15,
                   help="rounds per case and mode (15)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--modes", default="train,infer,relu",
                   help="comma-separated subset of train,infer,relu (default: all three; relu "
                   "is batch norm + ReLU training, for the kernel cases)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated subset of {','.join(IMPLS)} (default: those "
                   "installed)")
    p.add_argument("--quick", action="store_true",
                   help="5 rounds and no first-call subprocesses (a smoke run)")
    p.add_argument("--no-first-call", action="store_true",
                   help="skip the fresh-process first-call measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    p.add_argument("--sync", action="store_true", help="benchmark SyncBatchNorm (bench_sync)")
    args = p.parse_args(argv)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    asked = args.impls is not None
    impls = [i.strip() for i in (args.impls or ",".join(IMPLS)).split(",") if i.strip()]
    for what, got, allowed in (("case", cases, CASES), ("mode", modes, MODES),
                               ("implementation", impls, IMPLS)):
        bad = [v for v in got if v not in allowed]
        if bad or not got:
            p.error(f"unknown {what} {bad or got}; expected some of {', '.join(allowed)}")
    repeat = 5 if args.quick else args.repeat
    if args.save is not None:
        why = check_output_file(args.save)
        if why is not None:
            p.error(f"argument --save: {why}")

    torch_version = None
    if "torch" in impls:
        try:
            import torch

            torch_version = torch.__version__
        except ImportError:
            if asked:
                p.error("argument --impls: torch asked for, but PyTorch is not installed "
                        "(pip install 'batchnorm[bench]')")
            impls.remove("torch")
    has_numba = True
    try:
        import numba
    except ImportError:
        has_numba = False
        wanted = [i for i in impls if i in _NUMBA_IMPLS]
        if wanted:
            if asked:
                p.error(f"argument --impls: {wanted[0]} asked for, but numba is not installed "
                        "(pip install 'batchnorm[fast]')")
            impls = [i for i in impls if i not in _NUMBA_IMPLS]
    threads = args.threads
    if has_numba:
        if threads is None:
            threads = numba.get_num_threads()
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            p.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                    "(set NUMBA_NUM_THREADS for more)")
        numba.set_num_threads(threads)
    elif threads is None:
        threads = os.cpu_count() or 1
    if torch_version is not None:
        torch.set_num_threads(threads)

    runs = [(n, m) for n in cases for m in modes if m != "relu" or CASES[n].kind == "kernel"]
    progress = _Progress(len(runs) * repeat, not args.no_progress)
    try:
        progress.note("measuring copy bandwidth")
        copies = [copy_bandwidth()]
        results = []
        for name in cases:
            for mode in modes:
                if (name, mode) not in runs:
                    continue
                # Tiny cases: batch many calls per sample so the clock resolution does not count.
                results.append(run_case(CASES[name], mode, impls, repeat, 2e-3, progress))
            copies.append(copy_bandwidth())
        fc = None
        if has_numba and not (args.quick or args.no_first_call):
            progress.note("first call in fresh processes (cold cache compiles: takes a while)")
            fc = first_call_cost([CASES[n] for n in cases if n in ("S2", "S4", "small")]
                                 or [CASES[cases[0]]], threads)
    finally:
        progress.close()
    copy_gbs = statistics.median(copies)
    for r in results:
        r["fraction_of_copy"] = None if r["fast_gbs"] is None else r["fast_gbs"] / copy_gbs
    machine = _machine(threads, torch_version)
    out = {"machine": machine, "copy_gbs": copy_gbs, "repeat": repeat, "dtype": "float32",
           "results": results, "first_call": fc}
    if args.save:
        write_text_atomic(args.save, json.dumps(out, indent=2) + "\n")
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"# batchnorm bench: float32, {threads} thread(s), median of {repeat} interleaved "
          f"rounds")
    print(f"# {machine['cpu']}, {machine['cpu_count']} CPUs; python {machine['python']}, "
          f"numpy {machine['numpy']}, numba {machine.get('numba') or 'n/a'}, "
          f"torch {torch_version or 'n/a'}")
    print(f"# copy bandwidth (np.copyto, read+write): {copy_gbs:.1f} GB/s; GB/s counts "
          f"{PASSES['train']} passes for fwd+bwd, {PASSES['relu']} for fused BN+ReLU fwd+bwd, "
          f"{PASSES['infer']} for inference; reuse = numba writing into the same output arrays "
          "every call; unfused = numba BN then the toolkit's ReLU")
    print(table(results, copy_gbs))
    if fc is not None:
        print(_first_call_text(fc))
    return 0
