"""recompute_batchnorm_stats: the Algorithm 2 estimates (Ioffe & Szegedy 2015) against a direct
computation, modes and state left as they were, failures that change nothing, and MPI."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batchnorm import BatchNorm
from batchnorm.nn import Layer, Linear, ReLU, Sequential, cnn, mlp, recompute_batchnorm_stats
from helpers import assert_same_state, snapshot

HERE = Path(__file__).parent


def _bn_layers(model) -> list[BatchNorm]:
    out = []
    for layer in model.layers:
        if isinstance(layer, Sequential):
            out += _bn_layers(layer)
        elif isinstance(layer, BatchNorm):
            out.append(layer)
    return out


def _direct_estimates(model, batches, unbiased_of):
    """Per batch-norm layer, the estimates computed straight from each batch's layer input
    (the model run layer by layer in training mode on a copy), with NumPy's mean and var."""
    work = copy.deepcopy(model)
    inputs: dict[int, list[np.ndarray]] = {}

    def run(seq, x):
        for layer in seq.layers:
            if isinstance(layer, Sequential):
                x = run(layer, x)
                continue
            if isinstance(layer, BatchNorm):
                layer.train()
                ax = layer.axis % x.ndim
                z = np.moveaxis(x, ax, -1).reshape(-1, layer.num_features).astype(np.float64)
                inputs.setdefault(id(layer), []).append(z)
            x = layer.forward(x)
        return x

    for x in batches:
        run(work, x)
    out = []
    for layer, orig in zip(_bn_layers(work), _bn_layers(model), strict=True):
        zs = inputs[id(layer)]
        n = np.array([len(z) for z in zs], dtype=np.float64)
        means = np.array([z.mean(axis=0) for z in zs])
        vars_ = np.array([z.var(axis=0) for z in zs])
        mean = (n[:, None] * means).sum(0) / n.sum()
        denom = (n - 1).sum() if unbiased_of(orig) else n.sum()
        out.append((mean, (n[:, None] * vars_).sum(0) / denom))
    return out


def _batches(rng, sizes, shape, scale=3.0, offset=2.0, dtype=np.float64):
    return [(rng.standard_normal((s, *shape)) * scale + offset).astype(dtype) for s in sizes]


@pytest.mark.parametrize("unbiased", [True, False])
def test_mlp_estimates_equal_direct_computation_unequal_batches(unbiased):
    model = mlp(6, 3, hidden=(8, 5), batchnorm=True)
    for bn in _bn_layers(model):
        bn.unbiased = unbiased
    batches = _batches(np.random.default_rng(0), [7, 12, 3, 9], (6,))
    want = _direct_estimates(model, batches, lambda bn: bn.unbiased)
    assert recompute_batchnorm_stats(model, batches) == 4
    for bn, (mean, var) in zip(_bn_layers(model), want, strict=True):
        np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert bn.num_batches_tracked == 4


def test_cnn_per_channel_and_float32():
    model = cnn((2, 8, 8), 4, channels=(3,), hidden=(5,), batchnorm=True, dtype=np.float32)
    for bn in _bn_layers(model):
        bn.unbiased = True
    batches = _batches(np.random.default_rng(1), [4, 6, 5], (2, 8, 8), dtype=np.float32)
    want = _direct_estimates(model, batches, lambda bn: True)
    recompute_batchnorm_stats(model, batches)
    for bn, (mean, var) in zip(_bn_layers(model), want, strict=True):
        assert bn.running_mean.dtype == bn.running_var.dtype == np.float32
        np.testing.assert_allclose(bn.running_mean, mean, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(bn.running_var, var, rtol=2e-6, atol=2e-6)


def test_channels_last_and_large_mean_exact():
    # x = 1e4 + noise in float32, features last: the estimates are those of float64 NumPy on
    # the same values, to float32 rounding (a one-pass variance would lose them).
    model = Sequential([BatchNorm(4, axis=-1, unbiased=True)])
    batches = _batches(np.random.default_rng(2), [5, 8], (3, 4), scale=1.0, offset=1e4,
                       dtype=np.float32)
    (mean, var), = _direct_estimates(model, batches, lambda bn: True)
    recompute_batchnorm_stats(model, batches)
    bn = model.layers[0]
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-7)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-6)
    assert np.all(np.abs(var - 1) < 0.6)  # the noise's variance, not cancellation garbage


@pytest.mark.parametrize("unbiased", [True, False])
def test_equal_batches_match_the_layers_cumulative_average(unbiased):
    # With equal batch sizes the estimates are what a reset layer with momentum=None (the
    # cumulative average of the batch statistics) holds after the same batches: Algorithm 2's
    # mean of means and m/(m-1) mean of variances for unbiased=True.
    model = Sequential([Linear(5, 4), BatchNorm(4, dtype=np.float64, unbiased=unbiased,
                                                momentum=None)])
    batches = _batches(np.random.default_rng(3), [6, 6, 6, 6], (5,))
    ref = copy.deepcopy(model)
    ref.layers[1].reset_running_stats()
    for x in batches:
        ref.forward(x)
    recompute_batchnorm_stats(model, batches)
    got, want = model.layers[1], ref.layers[1]
    np.testing.assert_allclose(got.running_mean, want.running_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.running_var, want.running_var, rtol=1e-12, atol=1e-12)
    assert got.num_batches_tracked == want.num_batches_tracked == 4


class _ShiftInTraining(Layer):
    """Adds 100 in training mode only (a stand-in for dropout-like layers)."""

    def forward(self, x):
        return x + 100.0 if self.training else x

    def backward(self, dy):
        return dy


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_other_layers_run_in_eval_mode_and_modes_are_restored(mode):
    model = Sequential([_ShiftInTraining(), BatchNorm(3, dtype=np.float64), ReLU(),
                        Sequential([Linear(3, 3), BatchNorm(3, dtype=np.float64)])])
    getattr(model, mode)()
    batches = _batches(np.random.default_rng(4), [4, 5], (3,), offset=0.0)
    recompute_batchnorm_stats(model, batches)
    # The first layer ran in eval mode: the statistics are those of the raw batches.
    z = np.concatenate(batches)
    np.testing.assert_allclose(model.layers[1].running_mean, z.mean(0), rtol=1e-12)
    want = mode == "train"
    assert model.training is want and model.layers[3].training is want
    assert all(layer.training is want for layer in [*model.layers[:3], *model.layers[3].layers])


def test_parameters_caches_and_mode_untouched_only_running_stats_change():
    rng = np.random.default_rng(5)
    model = mlp(4, 2, hidden=(3,), batchnorm=True)
    bn = _bn_layers(model)[0]
    bn.gamma[:] = [0.5, 1.5, 2.0]
    bn.beta[:] = [0.1, -0.2, 0.3]
    x0 = rng.standard_normal((6, 4))
    model.eval()
    model.forward(x0)  # leaves caches of an eval forward
    before = [snapshot(layer) for layer in model.layers]
    params = {k: v.copy() for k, v in model.params.items()}
    recompute_batchnorm_stats(model, _batches(rng, [5, 5], (4,)))
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)
    for i, (layer, snap) in enumerate(zip(model.layers, before, strict=True)):
        if layer is bn:
            for k in ("running_mean", "running_var", "num_batches_tracked"):
                snap[k] = getattr(layer, k)
            snap["running_mean"] = snap["running_mean"].copy()
            snap["running_var"] = snap["running_var"].copy()
        assert_same_state(snap, layer), i
    assert not bn.training


def test_running_arrays_updated_in_place():
    # Objects holding the running arrays (a converted SyncBatchNorm, an exporter) see the
    # new values.
    model = mlp(4, 2, hidden=(3,), batchnorm=True)
    bn = _bn_layers(model)[0]
    held = (bn.running_mean, bn.running_var)
    recompute_batchnorm_stats(model, _batches(np.random.default_rng(6), [5], (4,)))
    assert bn.running_mean is held[0] and bn.running_var is held[1]
    assert not np.all(held[0] == 0)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.ones((1, 4)), ValueError, "more than 1 value per feature"),
        (np.ones((5, 3)), ValueError, r"expected x of shape \(N, 4\)"),
        (np.full((5, 4), np.nan), ValueError, "expected finite values"),
    ],
)
def test_a_failing_batch_changes_nothing(bad, exc, match):
    rng = np.random.default_rng(7)
    model = mlp(4, 2, hidden=(3, 3), batchnorm=True)
    model.forward(rng.standard_normal((6, 4)))  # running stats and caches of a real step
    model.eval()
    before = [snapshot(layer) for layer in model.layers]
    batches = [*_batches(rng, [5, 5], (4,)), bad, *_batches(rng, [5], (4,))]
    with pytest.raises(exc, match=match):
        recompute_batchnorm_stats(model, batches)
    for layer, snap in zip(model.layers, before, strict=True):
        assert_same_state(snap, layer)
    assert not model.training


def test_tuples_and_num_batches():
    rng = np.random.default_rng(8)
    xs = _batches(rng, [4, 6, 5, 7], (3,))
    pairs = ((x, np.zeros(len(x), np.int64)) for x in xs)  # a generator of (x, y)
    a = Sequential([Linear(3, 2), BatchNorm(2, dtype=np.float64)])
    b = copy.deepcopy(a)
    assert recompute_batchnorm_stats(a, pairs, num_batches=2) == 2
    assert recompute_batchnorm_stats(b, [list(p) for p in zip(xs[:2], xs[:2], strict=True)]) == 2
    np.testing.assert_array_equal(a.layers[1].running_mean, b.layers[1].running_mean)
    np.testing.assert_array_equal(a.layers[1].running_var, b.layers[1].running_var)
    # Only the batches used were read from the generator.
    assert len(list(pairs)) == 2
    assert recompute_batchnorm_stats(b, xs, num_batches=10) == 4


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_batches=0), ValueError, "expected num_batches >= 1, got 0"),
        (dict(num_batches=2.0), TypeError, "expected num_batches to be an int"),
        (dict(num_batches=True), TypeError, "expected num_batches to be an int"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = mlp(3, 2, hidden=(2,), batchnorm=True)
    before = [snapshot(layer) for layer in model.layers]
    with pytest.raises(exc, match=match):
        recompute_batchnorm_stats(model, [np.ones((4, 3))], **kwargs)
    for layer, snap in zip(model.layers, before, strict=True):
        assert_same_state(snap, layer)


def test_no_batches_is_an_error():
    model = mlp(3, 2, hidden=(2,), batchnorm=True)
    before = [snapshot(layer) for layer in model.layers]
    with pytest.raises(ValueError, match="expected at least one batch"):
        recompute_batchnorm_stats(model, iter([]))
    for layer, snap in zip(model.layers, before, strict=True):
        assert_same_state(snap, layer)


def test_a_single_layer_as_the_model():
    bn = BatchNorm(3, axis=-1, dtype=np.float64, unbiased=True)
    batches = _batches(np.random.default_rng(11), [4, 7], (2, 3))
    assert recompute_batchnorm_stats(bn, batches) == 2
    z = [b.reshape(-1, 3) for b in batches]
    n = np.array([len(v) for v in z])
    want = sum(len(v) * v.var(axis=0) for v in z) / (n - 1).sum()
    np.testing.assert_allclose(bn.running_var, want, rtol=1e-12)
    np.testing.assert_allclose(bn.running_mean, np.concatenate(z).mean(0), rtol=1e-12)
    assert bn.training


def test_frozen_layers_keep_their_statistics():
    model = mlp(4, 2, hidden=(3, 3), batchnorm=True)
    first, second = _bn_layers(model)
    first.running_var[:] = [2.0, 3.0, 4.0]
    first.freeze()
    before = snapshot(first)
    recompute_batchnorm_stats(model, _batches(np.random.default_rng(12), [5, 6], (4,)))
    assert_same_state(before, first)
    assert second.num_batches_tracked == 2 and first.frozen


def test_layers_without_running_stats_are_left_alone():
    model = Sequential([Linear(3, 3), BatchNorm(3, track_running_stats=False),
                        BatchNorm(3, dtype=np.float64)])
    before = snapshot(model.layers[1])
    recompute_batchnorm_stats(model, _batches(np.random.default_rng(9), [4], (3,)))
    assert_same_state(before, model.layers[1])
    assert model.layers[2].num_batches_tracked == 1


def test_recomputed_statistics_improve_a_model_with_stale_running_averages():
    # Running averages from before the last weight change are off; the recomputed ones make
    # eval mode match training-mode outputs on large batches again.
    rng = np.random.default_rng(10)
    model = Sequential([Linear(4, 3, rng=rng), BatchNorm(3, dtype=np.float64, unbiased=True)])
    data = rng.standard_normal((400, 4))
    model.forward(data)
    model.layers[0].W *= 3.0  # the weights moved on; the running averages did not
    model.layers[0].b += 1.0
    model.eval()
    stale = np.abs(model.forward(data).mean(0)).max()
    recompute_batchnorm_stats(model, np.split(data, 8))
    fresh = np.abs(model.forward(data).mean(0)).max()
    assert fresh < 1e-10 < stale


# ---------------------------------------------------------------------------------------------
# MPI


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def test_sync_batchnorm_estimates_over_all_ranks():
    pytest.importorskip("mpi4py")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found")
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Uneven shards, one of them empty.
    shards = ["5,2", "3,6", "4,0", "7,7"]
    cmd = [exe, "-n", "2", sys.executable, "-m", "mpi4py",
           str(HERE / "mpi_popstats_worker.py"), *shards]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for r in range(2):
        assert f"rank {r} ok popstats" in proc.stdout, out
