"""The numba backend against the NumPy reference; backend selection; the on-disk kernel cache.

The core tests (test_functional.py, test_layers.py) already run once per available backend;
this file checks agreement directly on a grid of layouts, dtypes and memory orders, the
multi-threaded split of the work for any thread count, and what only the fast path has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from batchnorm import (  # noqa: E402 - after the importorskip on purpose
    BatchNorm,
    BatchNormalization,
    backends,
    batch_norm_backward,
    batch_norm_inference,
    batch_norm_train,
)
from batchnorm import _numba as nbk  # noqa: E402
from batchnorm.apps import info as info_mod  # noqa: E402
from batchnorm.backends import (  # noqa: E402
    ENV_VAR,
    Backend,  # noqa: E402
    available_backends,
    get_backend,
)
from batchnorm.functional import normalize_with_stats  # noqa: E402
from helpers import rel_error, seed_of  # noqa: E402

# Relative agreement (max |a - b| / max |b|) expected between the two backends per dtype.
# float32: both compute in float32 but may round differently (fused multiply-add, summation
# order of the float64 sums); float16 outputs may then land one float16 step apart.
TOL = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-11}

# (shape, axis): 2-D to 5-D, the feature axis first, last or in the middle, a lone feature,
# a lone row; the larger ones (>= 2**15 values) take the multi-threaded drivers.
GRID = [
    ((2, 1), 1),
    ((7, 5), 1),
    ((7, 5), 0),
    ((4, 3, 6), 1),
    ((4, 3, 6), -1),
    ((4, 3, 6), 0),
    ((3, 4, 5, 6), 1),
    ((3, 4, 5, 6), -1),
    ((3, 4, 5, 6), 2),
    ((2, 3, 4, 5, 3), 1),
    ((2, 3, 4, 5, 3), -1),
    ((5, 1, 4, 4), 1),
    ((1, 6, 3, 3), 1),
    ((4096, 16), 1),
    ((64, 16, 8, 8), 1),
    ((64, 3, 16, 16), 1),
    ((8, 16, 16, 32), -1),
    ((16, 64, 64), 0),
]


def _layout(x: np.ndarray, order: str) -> np.ndarray:
    """The same values in C order, Fortran order, or as a strided (non-contiguous) view."""
    if order == "C":
        return np.ascontiguousarray(x)
    if order == "F":
        return np.asfortranarray(x)
    # A view that skips every other element of a doubled first axis.
    big = np.repeat(x, 2, axis=0)
    big[1::2] = -7.0
    return big[::2]


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def _params(c, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(1, 0.3, c).astype(dtype), rng.normal(0, 0.3, c).astype(dtype)


def _close(a, b, dtype, what, floor=0.0):
    """max |a - b| relative to max |b|, or to `floor` when larger (a gradient that is zero in
    exact arithmetic, such as dx for two values per feature, is pure rounding noise)."""
    assert a.dtype == b.dtype, what
    assert a.shape == b.shape, what
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    scale = max(np.abs(b64).max(initial=0.0), floor)
    err = rel_error(a, b) if scale == 0 else float(np.abs(a64 - b64).max(initial=0.0) / scale)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


# ---------------------------------------------------------------------------------------------
# agreement with the NumPy reference through the public kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("order", ["C", "F", "strided"])
@pytest.mark.parametrize("shape,axis", GRID)
def test_kernels_agree_with_numpy(shape, axis, dtype, order):
    x, dy = _data(shape, dtype)
    x, dy = _layout(x, order), _layout(dy, order)
    g, b = _params(shape[axis], dtype)
    out = {}
    for name in ("numpy", "numba"):
        y, cache = batch_norm_train(x, g, b, axis=axis, backend=name)
        dx, dg, db = batch_norm_backward(dy, cache)
        yi, ci = batch_norm_inference(
            x, g, b, cache.mean, cache.var + 0.5, axis=axis, backend=name, return_cache=True
        )
        dxi, _, _ = batch_norm_backward(dy, ci)
        out[name] = (y, cache.mean, cache.var, dx, dg, db, yi, dxi)
    labels = ("y", "mean", "var", "dx", "dgamma", "dbeta", "y inference", "dx inference")
    # The size of dx's terms: gamma / std * dy.
    dx_scale = float(np.abs(g).max() * np.abs(dy).max() / np.sqrt(cache.var.min() + 1e-5))
    for label, fast, ref in zip(labels, out["numba"], out["numpy"], strict=True):
        tol_dtype = np.float64 if label in ("mean", "var") and dtype == np.float64 else dtype
        _close(fast, ref, tol_dtype, label, floor=dx_scale if label == "dx" else 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_scale_no_shift_agrees(dtype):
    x, dy = _data((6, 4, 5), dtype)
    res = []
    for name in ("numpy", "numba"):
        y, cache = batch_norm_train(x, None, None, backend=name)
        res.append((y, batch_norm_backward(dy, cache)[0]))
    _close(res[1][0], res[0][0], dtype, "y")
    _close(res[1][1], res[0][1], dtype, "dx")


# ---------------------------------------------------------------------------------------------
# the primitives, with the work split for any number of threads


@pytest.fixture(params=[2, 3, 5])
def threads(request, monkeypatch):
    """Force the multi-threaded drivers, split into this many parts, even for tiny inputs."""
    monkeypatch.setattr(nbk, "_threads", lambda size: request.param)
    return request.param


SPLIT_SHAPES = [
    (1, 1, 1), (2, 1, 1), (2, 3, 1), (9, 4, 1), (1, 3, 7), (3, 1, 5), (9, 2, 4), (4, 9, 3),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SPLIT_SHAPES)
def test_primitives_agree_for_any_split(threads, shape, dtype):
    x, dy = _data(shape, dtype, seed=3)
    c = shape[1]
    rng = np.random.default_rng(4)
    center = x.mean(axis=(0, 2)).astype(dtype)
    p, q, r, s, t = (rng.standard_normal(c).astype(dtype) for _ in range(5))
    fast, ref = nbk.NumbaBackend(), backends.NumpyBackend()
    for a, b in zip(fast.moments(x), ref.moments(x), strict=True):
        _close(a, b, np.float64 if dtype == np.float64 else np.float32, "moments")
    _close(fast.affine(x, center, s, t), ref.affine(x, center, s, t), dtype, "affine")
    for a, b in zip(fast.grad_sums(dy, x, center), ref.grad_sums(dy, x, center), strict=True):
        _close(a, b, dtype, "grad_sums")
    _close(
        fast.grad_input(dy, x, center, p, q, r),
        ref.grad_input(dy, x, center, p, q, r),
        dtype,
        "grad_input",
    )


def test_primitives_take_non_contiguous_views():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((6, 8, 10))
    x3 = base[:, ::2, 1::3]  # strided on two axes
    assert not x3.flags.c_contiguous
    fast, ref = nbk.NumbaBackend(), backends.NumpyBackend()
    np.testing.assert_allclose(fast.moments(x3), ref.moments(x3), rtol=1e-12)
    c = x3.shape[1]
    v = np.arange(c, dtype=np.float64)
    np.testing.assert_allclose(fast.affine(x3, v, v, v), ref.affine(x3, v, v, v), rtol=1e-12)


def test_other_dtypes_are_rejected_by_the_backend():
    with pytest.raises(TypeError, match="float32 or float64"):
        nbk.NumbaBackend().moments(np.ones((2, 2, 1), np.float16))


# ---------------------------------------------------------------------------------------------
# the fused normalize of small inputs


class _AffineOnly(Backend):
    """The numba backend without its optional ``normalize``: the generic per-feature code."""

    name = "affine-only"

    def __init__(self):
        self.affine = nbk.NumbaBackend().affine


@pytest.mark.parametrize("shape", [(32, 7, 1), (4, 5, 9), (5000, 7, 1), (40, 7, 200)])
@pytest.mark.parametrize("dtype,vdtype", [(np.float32, np.float32), (np.float32, np.float64),
                                          (np.float64, np.float32), (np.float64, np.float64)])
@pytest.mark.parametrize("with_gamma,with_beta", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_fused_normalize_is_bit_for_bit_the_generic_code(
    shape, dtype, vdtype, with_gamma, with_beta, offset
):
    rng = np.random.default_rng(12)
    x3 = (offset + 3 * rng.standard_normal(shape)).astype(dtype)
    c = shape[1]
    mean = (offset + rng.standard_normal(c)).astype(vdtype)
    var = rng.uniform(0.1, 3, c).astype(vdtype)
    g = rng.standard_normal(c).astype(vdtype) if with_gamma else None
    b = rng.standard_normal(c).astype(vdtype) if with_beta else None
    fused = normalize_with_stats(x3, mean, var, g, b, 1e-5, nbk.NumbaBackend())
    generic = normalize_with_stats(x3, mean, var, g, b, 1e-5, _AffineOnly())
    for a, e in zip(fused, generic, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a, e)


def test_fused_normalize_leaves_empty_inputs_and_float16_vectors_to_the_caller():
    be = nbk.NumbaBackend()
    v = np.ones(4, np.float32)
    assert be.normalize(np.ones((0, 4, 1), np.float32), v, v, v, v, 1e-5) is None
    h = np.ones(4, np.float16)
    assert be.normalize(np.ones((8, 4, 1), np.float32), v, h, None, None, 1e-5) is None
    assert be.normalize(np.ones((8, 4, 1), np.float32), v, v, None, None, 1e-5) is not None


# ---------------------------------------------------------------------------------------------
# exact statistics on the fast path (fastmath must not undo the two-pass scheme), on every
# kernel variant: the fused small-input step, serial and parallel drivers (whatever the input
# size), in both layouts


def _recording(fn, ran: list[str]):
    """``fn`` that appends its name to ``ran`` when called."""
    name = fn.__name__

    def wrapper(*args):
        ran.append(name)
        return fn(*args)

    return wrapper


@pytest.fixture(params=["fused", "serial", "parallel-2", "parallel-3"])
def kernel(request, monkeypatch):
    """Force one kernel variant on any input size, through the test hooks ``_SERIAL_BELOW``
    and ``_threads``: the fused small-input training step, or the separate drivers, serial or
    parallel split into 2 or 3 parts. Returns a check that the variant ran for a layout."""
    ran: list[str] = []
    if request.param == "fused":
        monkeypatch.setattr(nbk, "_SERIAL_BELOW", 1 << 62)
        for name in ("_rows_train_ser", "_planes_train_ser"):
            monkeypatch.setattr(nbk, name, _recording(getattr(nbk, name), ran))
        return lambda layout: f"_{layout}_train_ser" in ran
    parts = 1 if request.param == "serial" else int(request.param[-1])
    monkeypatch.setattr(nbk, "_SERIAL_BELOW", 0)  # no fused step
    monkeypatch.setattr(nbk, "_threads", lambda size: parts)
    run = nbk._run
    monkeypatch.setattr(
        nbk, "_run", lambda size, ser, par, *args, **kw: run(
            size, _recording(ser, ran), _recording(par, ran), *args, **kw)
    )
    kind = "ser" if parts == 1 else "par"
    return lambda layout: f"_{layout}_moments_{kind}" in ran


def _layout_of(x: np.ndarray, axis: int) -> str:
    """The kernel layout that an input takes: "rows" when the feature axis is the last one."""
    return "rows" if axis % x.ndim == x.ndim - 1 else "planes"


@pytest.mark.parametrize(
    "shape,axis",
    [((512, 16), 1), ((8192, 8), 1), ((64, 8, 16, 16), 1), ((8, 16, 16, 16), -1), ((4, 3, 5), 1)],
)
# float64 at 1e8: one step of the mean is 1.5e-8, which bounds how well block means can be
# compared (the data themselves carry that rounding), hence 1e-7.
@pytest.mark.parametrize("dtype,mean,rtol", [(np.float32, 1e4, 1e-6), (np.float64, 1e8, 1e-7)])
def test_large_mean_statistics_are_exact(kernel, shape, axis, dtype, mean, rtol):
    rng = np.random.default_rng(6)
    x = (mean + rng.standard_normal(shape)).astype(dtype)
    _, cache = batch_norm_train(x, None, None, axis=axis, backend="numba")
    assert kernel(_layout_of(x, axis))
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    ref = x.astype(np.float64)
    ref_mean = ref.mean(axis=red)
    ref_var = ((ref - np.expand_dims(ref_mean, red)) ** 2).mean(axis=red)
    np.testing.assert_allclose(cache.var, ref_var, rtol=rtol)
    np.testing.assert_allclose(cache.mean - mean, ref_mean - mean, atol=rtol * 10)


def _hard_batch(case: str, n: int, c: int = 4) -> np.ndarray:
    """float32 batches (n, c) on which float32 sums of the shifted values lose digits.

    "large-mean": 1e4 + N(0, 1). "offset-block": N(0, 1), the second half moved by 1e4 (the
    parts of a parallel split have very different means). "outlier-first-row": N(0, 1) with a
    first row at 1e4 (the kernels shift by the first value, which is then far from the mean).
    """
    rng = np.random.default_rng(seed_of((case, n, c)))
    x = rng.standard_normal((n, c)).astype(np.float32)
    if case == "large-mean":
        x += np.float32(1e4)
    elif case == "offset-block":
        x[n // 2 :] += np.float32(1e4)
    else:
        x[0] += np.float32(1e4)
    return x


@pytest.mark.parametrize("layout", ["rows", "planes"])
@pytest.mark.parametrize("n", [8000, 4096, 40000])
@pytest.mark.parametrize("case", ["large-mean", "offset-block", "outlier-first-row"])
def test_statistics_exact_on_every_kernel(kernel, case, n, layout):
    """float64 accumulation in every driver. float32 sums of the shifted values gave relative
    variance errors of 2e-6 to 2e-3 on such inputs; float64 ones give 1e-15 to 1e-9 (the worst:
    an outlier first value and 40000 values, the loss of a factor n that the shift allows)."""
    x = _hard_batch(case, n)
    ref = x.astype(np.float64)
    if layout == "planes":  # the same values per feature, as (n / 16, c, 16)
        x = np.ascontiguousarray(x.reshape(n // 16, 16, 4).transpose(0, 2, 1))
    _, cache = batch_norm_train(x, None, None, axis=1, backend="numba")
    assert kernel(layout)
    # The mean to 1e-11 of the spread: shifting by a first value far from the mean costs up to
    # n * 1e-16 of that distance (1e-12 of the spread was seen on 40000 values with an outlier).
    mean_tol = dict(rtol=1e-12, atol=1e-11 * ref.std(axis=0).max())
    np.testing.assert_allclose(cache.mean, ref.mean(axis=0), **mean_tol)
    np.testing.assert_allclose(cache.var, ref.var(axis=0), rtol=1e-8)
    # The reference backend too (it has one driver).
    mean, var = backends.NumpyBackend().moments(x.reshape(x.shape[0], 4, -1))
    np.testing.assert_allclose(mean, ref.mean(axis=0), **mean_tol)
    np.testing.assert_allclose(var, ref.var(axis=0), rtol=1e-8)


@pytest.mark.parametrize("shape", [(50000, 3), (8, 3, 4096)])
def test_nan_and_inf_propagate_per_feature(shape):
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    x.reshape(shape[0], 3, -1)[1, 0, 0] = np.nan
    x.reshape(shape[0], 3, -1)[2, 1, 0] = np.inf
    mean, var = nbk.NumbaBackend().moments(x.reshape(shape[0], 3, -1))
    assert np.isnan(mean[0]) and np.isnan(var[0])
    assert not np.isfinite(mean[1]) and not np.isfinite(var[1])
    assert np.isfinite(mean[2]) and np.isfinite(var[2])


# ---------------------------------------------------------------------------------------------
# the layers


@pytest.mark.parametrize("shape,axis", [((32, 6), 1), ((8, 4, 5, 5), 1), ((8, 5, 5, 4), -1)])
def test_layer_agrees_with_numpy_over_steps(shape, axis):
    rng = np.random.default_rng(9)
    layers = [BatchNorm(shape[axis], axis=axis, backend=n) for n in ("numpy", "numba")]
    assert [lay.backend.name for lay in layers] == ["numpy", "numba"]
    for _ in range(3):
        x = (5 + rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        ys = [lay.forward(x) for lay in layers]
        dxs = [lay.backward(dy) for lay in layers]
        _close(ys[1], ys[0], np.float32, "y")
        _close(dxs[1], dxs[0], np.float32, "dx")
        _close(layers[1].dgamma, layers[0].dgamma, np.float32, "dgamma")
        for lay in layers:
            lay.gamma -= 0.1 * lay.dgamma
    for lay in layers:
        lay.eval()
    x = rng.standard_normal(shape).astype(np.float32)
    _close(layers[1].forward(x), layers[0].forward(x), np.float32, "eval y")
    _close(layers[1].running_var, layers[0].running_var, np.float32, "running_var")


def test_book_layer_agrees_with_numpy():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((16, 3, 4, 4))
    dy = rng.standard_normal(x.shape)
    out = []
    for name in ("numpy", "numba"):
        lay = BatchNormalization(np.ones(48), np.zeros(48), backend=name)
        out.append((lay.forward(x), lay.backward(dy), lay.dgamma))
    for a, b in zip(out[1], out[0], strict=True):
        _close(a, b, np.float64, "book layer")


# ---------------------------------------------------------------------------------------------
# selection


@pytest.mark.parametrize(
    "value,expected", [("numpy", "numpy"), ("numba", "numba"), (" NumBa ", "numba"),
                       ("auto", "numba"), ("", "numba")]
)
def test_environment_variable_selects_the_backend(monkeypatch, value, expected):
    monkeypatch.setenv(ENV_VAR, value)
    assert get_backend().name == expected
    assert get_backend(None).name == expected
    assert BatchNorm(3).backend.name == expected
    # An explicit choice wins over the environment.
    assert get_backend("numpy").name == "numpy"


def test_unknown_backend_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="'cuda'"):
        get_backend()


def test_asking_for_numba_without_numba_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "_CACHE", {})
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    monkeypatch.delitem(sys.modules, "batchnorm._numba")
    with pytest.raises(ImportError, match=r"pip install 'batchnorm\[fast\]'"):
        get_backend("numba")
    monkeypatch.setenv(ENV_VAR, "numba")
    with pytest.raises(ImportError, match="numba"):
        BatchNorm(3)
    monkeypatch.setenv(ENV_VAR, "auto")
    assert get_backend().name == "numpy"
    assert available_backends() == ["numpy"]


def test_info_reports_the_backend(monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "numpy")
    assert info_mod.main([]) == 0
    text = capsys.readouterr().out
    assert "backend in use : numpy" in text and f"{ENV_VAR}=numpy" in text
    monkeypatch.delenv(ENV_VAR)
    assert info_mod.main(["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["backend"] == "numba"
    assert d["available"] == ["numpy", "numba"]
    assert d["numba"]["threads"] >= 1
    assert d["numba"]["cache_dir"]


# ---------------------------------------------------------------------------------------------
# compiled kernels are stored on disk and loaded by the next process

_CHILD = """
import json
import numpy as np
import batchnorm as bn
from batchnorm import _numba
x = np.random.default_rng(0).standard_normal((16, 4))
y, cache = bn.batch_norm_train(x, None, None, backend="numba")
bn.batch_norm_backward(x, cache)
used = [k for k in _numba.kernels if k.signatures]
print(json.dumps({
    "used": len(used),
    "hits": sum(sum(k.stats.cache_hits.values()) for k in used),
    "misses": sum(sum(k.stats.cache_misses.values()) for k in used),
}))
"""


def test_second_process_loads_the_kernels_from_the_disk_cache(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop(ENV_VAR, None)

    def run() -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run()
    # Two entry points for a small training fwd+bwd: the fused forward and backward (more in
    # the first run: a kernel that another one calls, such as _coefs, compiles there too, and
    # is part of its caller's cache entry).
    assert first["used"] >= 2 and first["hits"] == 0
    assert list(tmp_path.rglob("*.nbi")) and list(tmp_path.rglob("*.nbc"))
    second = run()
    assert second["used"] == 2
    assert second["hits"] == 2 and second["misses"] == 0


# ---------------------------------------------------------------------------------------------
# outputs


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_outputs_of_successive_calls_do_not_overwrite_each_other():
    rng = np.random.default_rng(11)
    x1 = rng.standard_normal((1024, 512)).astype(np.float32)  # 2 MiB
    x2 = 3 + 2 * rng.standard_normal((1024, 512)).astype(np.float32)
    y1, c1 = batch_norm_train(x1, None, None, backend="numba")
    keep = y1.copy()
    y2, c2 = batch_norm_train(x2, None, None, backend="numba")
    dx1, _, _ = batch_norm_backward(y2, c1)
    dx2, _, _ = batch_norm_backward(y1, c2)
    np.testing.assert_array_equal(y1, keep)
    assert len({_addr(a) for a in (y1, y2, dx1, dx2)}) == 4
    del y2, dx1
    y3, _ = batch_norm_train(x1, None, None, backend="numba")
    np.testing.assert_array_equal(y3, keep)


# ---------------------------------------------------------------------------------------------
# batchnorm bench (a smoke run; no timing is asserted)


def test_bench_smoke_json(capsys):
    from batchnorm.apps import bench

    rc = bench.main(["--cases", "small", "--modes", "train,infer", "--impls", "numpy,numba",
                     "--repeat", "2", "--no-first-call", "--no-progress", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in d["results"]] == ["train", "infer"]
    r = d["results"][0]
    assert set(r["median_ms"]) == {"numpy", "numba"} and r["ratio_fast_torch"] is None
    assert r["bytes"] == 8 * 32 * 128 * 4 and d["copy_gbs"] > 0
    assert "| small" in bench.table(d["results"], d["copy_gbs"])


def test_bench_sync_is_handed_over(monkeypatch):
    import types

    from batchnorm.apps import bench

    seen = []
    fake = types.ModuleType("batchnorm.apps.bench_sync")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "batchnorm.apps.bench_sync", fake)
    monkeypatch.setattr("batchnorm.apps.bench_sync", fake, raising=False)
    assert bench.main(["--sync", "--json"]) == 0
    assert seen == [["--sync", "--json"]]


def test_bench_rejects_unknown_cases():
    from batchnorm.apps import bench

    with pytest.raises(SystemExit):
        bench.main(["--cases", "S9", "--no-progress"])
