"""Ghost batch normalization (``virtual_batch_size``) and Batch Renormalization (``BatchRenorm``):
PyTorch oracles (per-chunk ``batch_norm``; Algorithm 1 of Ioffe 2017 transcribed in autograd with
``detach()`` on r and d), float64 finite differences, exact equality with BatchNorm where the
variant reduces to it, state, errors, save/load."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import functional as F
from helpers import assert_same_state, numerical_grad, rel_error, seed_of, snapshot

LAYOUTS = [((10, 5), 1), ((9, 4, 6), 1), ((11, 3, 4, 5), 1), ((10, 6, 4), -1)]
TOL = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=2e-5, atol=2e-5)}


def _torch():
    return pytest.importorskip("torch")


def _to_torch_layout(a, axis):
    """Channels on dim 1, as torch's batch_norm wants."""
    return np.ascontiguousarray(np.moveaxis(a, axis, 1))


def _chunk_bounds_expected(n, v):
    """The documented rule, written independently: consecutive chunks of v; a last chunk of one
    sample joins the one before."""
    starts = list(range(0, n, v))
    sizes = [min(v, n - s) for s in starts]
    if len(sizes) > 1 and v > 1 and sizes[-1] == 1:
        sizes[-2] += 1
        sizes.pop()
        starts.pop()
    return [(s, s + k) for s, k in zip(starts, sizes, strict=True)]


# ---------------------------------------------------------------------------------------------
# ghost batches


@pytest.mark.parametrize("n, v", [(10, 4), (9, 4), (8, 4), (5, 8), (7, 1), (2, 1), (1, 3)])
def test_ghost_chunks_follow_the_documented_rule(n, v):
    bounds = F.ghost_chunks(n, v)
    assert bounds == _chunk_bounds_expected(n, v)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("unbiased", [False, True])
def test_ghost_batchnorm_matches_torch_per_chunk(backend, shape, axis, dtype, unbiased):
    torch = _torch()
    v = 4
    c = shape[axis]
    rng = np.random.default_rng(seed_of((shape, axis, dtype, unbiased)))
    layer = bn.BatchNorm(c, axis=axis, dtype=dtype, momentum=0.7, unbiased=unbiased,
                         virtual_batch_size=v, backend=backend)
    layer.gamma[:] = rng.uniform(0.5, 2, c)
    layer.beta[:] = rng.normal(size=c)
    rm = torch.zeros(c, dtype=torch.float64)
    rv = torch.ones(c, dtype=torch.float64)
    for step in range(2):
        x = (rng.normal(size=shape) * (1 + step) + 3).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y = layer.forward(x)
        dx = layer.backward(dy)

        xt = torch.tensor(_to_torch_layout(x.astype(np.float64), axis), requires_grad=True)
        gt = torch.tensor(layer.gamma.astype(np.float64), requires_grad=True)
        bt = torch.tensor(layer.beta.astype(np.float64), requires_grad=True)
        outs, means, variances = [], [], []
        for lo, hi in _chunk_bounds_expected(shape[0], v):
            part = xt[lo:hi]
            outs.append(torch.nn.functional.batch_norm(part, None, None, gt, bt, training=True,
                                                       eps=layer.eps))
            dims = [0] + list(range(2, part.dim()))
            cnt = part.numel() // c
            var = part.detach().var(dim=dims, unbiased=False)
            means.append(part.detach().mean(dim=dims))
            variances.append(var * cnt / (cnt - 1) if unbiased else var)
        yt = torch.cat(outs)
        yt.backward(torch.tensor(_to_torch_layout(dy.astype(np.float64), axis)))
        # One running update per call, from the average of the chunks' statistics.
        rm = 0.7 * rm + 0.3 * torch.stack(means).mean(0)
        rv = 0.7 * rv + 0.3 * torch.stack(variances).mean(0)

        tol = TOL[dtype]
        np.testing.assert_allclose(y, np.moveaxis(yt.detach().numpy(), 1, axis), **tol)
        np.testing.assert_allclose(dx, np.moveaxis(xt.grad.numpy(), 1, axis), **tol)
        np.testing.assert_allclose(layer.dgamma, gt.grad.numpy(), **tol)
        np.testing.assert_allclose(layer.dbeta, bt.grad.numpy(), **tol)
        np.testing.assert_allclose(layer.running_mean, rm.numpy(), **tol)
        np.testing.assert_allclose(layer.running_var, rv.numpy(), **tol)
        assert layer.num_batches_tracked == step + 1


@pytest.mark.parametrize("shape, axis", [((9, 3), 1), ((7, 2, 3), 1), ((6, 3, 2), -1)])
@pytest.mark.parametrize("masked", [False, True])
def test_ghost_backward_matches_finite_differences(backend, shape, axis, masked):
    rng = np.random.default_rng(seed_of((shape, axis, masked)))
    c = shape[axis]
    x = rng.normal(size=shape) * 2 + 1
    w = rng.normal(size=shape)
    mask = None
    if masked:
        mshape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
        mask = rng.random(mshape) > 0.3
        mask[:, ...] |= np.arange(shape[0]).reshape((-1,) + (1,) * (len(mshape) - 1)) % 2 == 0
        if len(mshape) == 1:
            mask[:] = True
            mask[[1, 4]] = False
    layer = bn.BatchNorm(c, axis=axis, dtype=np.float64, virtual_batch_size=3, backend=backend)
    layer.gamma[:] = rng.uniform(0.5, 2, c)
    layer.beta[:] = rng.normal(size=c)

    def loss():
        layer.reset_running_stats()
        return float(np.sum(w * layer.forward(x, mask)))

    loss()
    dx = layer.backward(w)
    dg, db = layer.dgamma.copy(), layer.dbeta.copy()
    assert rel_error(dx, numerical_grad(loss, x)) < 1e-7
    assert rel_error(dg, numerical_grad(loss, layer.gamma)) < 1e-7
    assert rel_error(db, numerical_grad(loss, layer.beta)) < 1e-7


def test_ghost_with_one_chunk_is_batchnorm_exactly(backend, rng):
    x = (rng.normal(size=(8, 3, 5)) + 1e4).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    ref = bn.BatchNorm(3, backend=backend, unbiased=True)
    ghost = bn.BatchNorm(3, backend=backend, unbiased=True, virtual_batch_size=8)
    np.testing.assert_array_equal(ghost.forward(x), ref.forward(x))
    np.testing.assert_array_equal(ghost.backward(dy), ref.backward(dy))
    for name in ("dgamma", "dbeta", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(ghost, name), getattr(ref, name), err_msg=name)


def test_ghost_differs_from_batchnorm_and_eval_is_unchanged(rng):
    x = rng.normal(size=(12, 4)) * np.arange(1, 13)[:, None]
    ghost = bn.BatchNorm(4, dtype=np.float64, virtual_batch_size=4, backend="numpy")
    plain = bn.BatchNorm(4, dtype=np.float64, backend="numpy")
    assert not np.allclose(ghost.forward(x), plain.forward(x))
    # Each virtual batch is normalised on its own: mean 0 per chunk and feature.
    np.testing.assert_allclose(ghost.forward(x)[4:8].mean(axis=0), 0, atol=1e-12)
    # Eval mode uses the running statistics only: the same transform as a plain layer with them.
    plain.running_mean[:] = ghost.running_mean
    plain.running_var[:] = ghost.running_var
    ghost.eval()
    plain.eval()
    np.testing.assert_array_equal(ghost.forward(x), plain.forward(x))


def test_ghost_population_statistics_of_the_whole_batch(rng):
    x = rng.normal(size=(10, 3, 2)) * 3 + 5
    layer = bn.BatchNorm(3, dtype=np.float64, virtual_batch_size=4, backend="numpy")
    layer.forward(x)
    cache = layer._cache
    assert isinstance(cache, F.GhostBatchNormCache)
    np.testing.assert_allclose(cache.mean, x.mean(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(cache.var, x.var(axis=(0, 2)), rtol=1e-12)
    assert cache.count == 20


@pytest.mark.parametrize(
    "value, exc, needle",
    [(0, ValueError, "virtual_batch_size >= 1"), (2.5, TypeError, "virtual_batch_size"),
     (True, TypeError, "virtual_batch_size"), ("4", TypeError, "virtual_batch_size")],
)
def test_ghost_bad_virtual_batch_size(value, exc, needle):
    with pytest.raises(exc, match=needle):
        bn.BatchNorm(3, virtual_batch_size=value)


def test_ghost_errors_change_nothing(rng):
    layer = bn.BatchNorm(3, dtype=np.float64, virtual_batch_size=1, backend="numpy")
    before = snapshot(layer)
    # Virtual batches of one (N, C) sample have one value per feature.
    with pytest.raises(ValueError, match=r"virtual batch 0 of 5 \(samples 0:1.*more than 1"):
        layer.forward(rng.normal(size=(5, 3)))
    assert_same_state(before, layer)
    # A virtual batch whose mask leaves fewer than 2 values.
    layer = bn.BatchNorm(3, dtype=np.float64, virtual_batch_size=2, backend="numpy")
    before = snapshot(layer)
    mask = np.ones((6, 4), bool)
    mask[2:4] = False
    mask[2, 0] = True
    with pytest.raises(ValueError, match=r"virtual batch 1 of 3 \(samples 2:4.*got 1"):
        layer.forward(rng.normal(size=(6, 3, 4)), mask)
    assert_same_state(before, layer)
    # Feature axis 0 is the batch axis virtual batches cut.
    layer = bn.BatchNorm(3, axis=0, dtype=np.float64, virtual_batch_size=2, backend="numpy")
    before = snapshot(layer)
    with pytest.raises(ValueError, match="other than 0"):
        layer.forward(rng.normal(size=(3, 8)))
    assert_same_state(before, layer)


def test_ghost_needs_a_local_reducer():
    from batchnorm.reducers import LocalReducer

    class Remote(LocalReducer):
        local = False

    with pytest.raises(ValueError, match="virtual_batch_size=None with a reducer"):
        bn.BatchNorm(3, virtual_batch_size=4, reducer=Remote())


def test_ghost_round_trips_through_save_and_load(tmp_path, rng):
    layer = bn.BatchNorm(3, virtual_batch_size=5, backend="numpy")
    layer.forward(rng.normal(size=(12, 3)).astype(np.float32))
    layer.save(tmp_path / "g.npz")
    back = bn.load(tmp_path / "g.npz", backend="numpy")
    assert back.virtual_batch_size == 5
    assert "virtual_batch_size=5" in repr(back)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    np.testing.assert_array_equal(back.forward(x), layer.forward(x))


def test_convert_sync_batchnorm_refuses_ghost_layers_and_changes_nothing():
    MPI = pytest.importorskip("mpi4py.MPI")
    from batchnorm.distributed import convert_sync_batchnorm

    plain = bn.BatchNorm(3)
    net = [plain, {"g": bn.BatchNorm(3, virtual_batch_size=4)}]
    with pytest.raises(ValueError, match="virtual_batch_size.*nothing was converted"):
        convert_sync_batchnorm(net, comm=MPI.COMM_SELF)
    assert net[0] is plain and type(net[1]["g"]) is bn.BatchNorm


# ---------------------------------------------------------------------------------------------
# Batch Renormalization


def _torch_renorm_step(torch, x, gamma, beta, rmean, rvar, eps, rmax, dmax, axis):
    """Algorithm 1 of Ioffe (2017) in autograd, r and d detached; channels on dim 1."""
    xt = torch.tensor(_to_torch_layout(x, axis), requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    dims = [0] + list(range(2, xt.dim()))
    view = [1, -1] + [1] * (xt.dim() - 2)
    mu_b = xt.mean(dim=dims)
    sigma_b = torch.sqrt(((xt - mu_b.view(view)) ** 2).mean(dim=dims) + eps)
    mu = torch.tensor(rmean)
    sigma = torch.sqrt(torch.tensor(rvar) + eps)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax).detach()
    d = torch.clamp((mu_b - mu) / sigma, -dmax, dmax).detach()
    x_hat = (xt - mu_b.view(view)) / sigma_b.view(view)
    y = gt.view(view) * (x_hat * r.view(view) + d.view(view)) + bt.view(view)
    return xt, gt, bt, y, mu_b.detach().numpy(), (sigma_b.detach().numpy() ** 2 - eps), r, d


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batchrenorm_matches_algorithm_1_in_torch(backend, shape, axis, dtype):
    torch = _torch()
    c = shape[axis]
    rng = np.random.default_rng(seed_of((shape, axis, dtype)))
    layer = bn.BatchRenorm(c, axis=axis, dtype=dtype, rmax=1.5, dmax=0.5, momentum=0.6,
                           backend=backend)
    layer.gamma[:] = rng.uniform(0.5, 2, c)
    layer.beta[:] = rng.normal(size=c)
    rmean = np.zeros(c)
    rvar = np.ones(c)
    clipped_r = clipped_d = 0
    for _ in range(3):
        # Means and spreads that vary by feature, so that some r and d clip and some do not.
        x = (rng.normal(size=shape) * np.linspace(0.3, 2.5, c).reshape(
            [-1 if i == axis % len(shape) else 1 for i in range(len(shape))])
            + rng.normal(size=1) * 0.4).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y = layer.forward(x)
        r_ours = layer._cache.renorm_r  # backward releases the cache
        dx = layer.backward(dy)
        xt, gt, bt, yt, mu_b, var_b, r, d = _torch_renorm_step(
            torch, x.astype(np.float64), layer.gamma.astype(np.float64),
            layer.beta.astype(np.float64), rmean, rvar, layer.eps, 1.5, 0.5, axis)
        yt.backward(torch.tensor(_to_torch_layout(dy.astype(np.float64), axis)))
        clipped_r += int((r.abs() - 1.5).abs().lt(1e-12).sum() + (r - 1 / 1.5).abs().lt(
            1e-12).sum())
        clipped_d += int((d.abs() - 0.5).abs().lt(1e-12).sum())
        rmean = 0.6 * rmean + 0.4 * mu_b
        rvar = 0.6 * rvar + 0.4 * var_b
        tol = TOL[dtype]
        np.testing.assert_allclose(y, np.moveaxis(yt.detach().numpy(), 1, axis), **tol)
        np.testing.assert_allclose(dx, np.moveaxis(xt.grad.numpy(), 1, axis), **tol)
        np.testing.assert_allclose(layer.dgamma, gt.grad.numpy(), **tol)
        np.testing.assert_allclose(layer.dbeta, bt.grad.numpy(), **tol)
        np.testing.assert_allclose(layer.running_mean, rmean, **tol)
        np.testing.assert_allclose(layer.running_var, rvar, **tol)
        np.testing.assert_allclose(r_ours, r.numpy(), **tol)
    assert clipped_r > 0 and clipped_d > 0  # the clipping was exercised


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("variant", ["plain", "mask", "ghost"])
def test_batchrenorm_with_rmax_1_dmax_0_is_batchnorm_exactly(backend, shape, axis, dtype,
                                                            affine, variant):
    rng = np.random.default_rng(seed_of((shape, axis, dtype, affine, variant)))
    c = shape[axis]
    kw = dict(axis=axis, dtype=dtype, affine=affine, unbiased=True, backend=backend,
              virtual_batch_size=4 if variant == "ghost" else None)
    ref = bn.BatchNorm(c, **kw)
    ren = bn.BatchRenorm(c, rmax=1.0, dmax=0.0, **kw)
    if affine:
        for layer in (ref, ren):
            layer.gamma[:] = np.linspace(0.5, 2, c)
            layer.beta[:] = np.linspace(-1, 1, c)
    ax = axis % len(shape)
    mshape = tuple(s for i, s in enumerate(shape) if i != ax)
    for _ in range(3):
        x = (rng.normal(size=shape) * 2 + 50).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        mask = None
        if variant == "mask":
            mask = np.ones(mshape, bool)
            mask[0] = False
        np.testing.assert_array_equal(ren.forward(x, mask), ref.forward(x, mask))
        np.testing.assert_array_equal(ren.backward(dy), ref.backward(dy))
        names = ["running_mean", "running_var"] + (["dgamma", "dbeta"] if affine else [])
        for name in names:
            np.testing.assert_array_equal(getattr(ren, name), getattr(ref, name), err_msg=name)
    ren.eval()
    ref.eval()
    np.testing.assert_array_equal(ren.forward(x), ref.forward(x))


@pytest.mark.parametrize("shape, axis", [((8, 3), 1), ((5, 2, 4), 1), ((6, 3, 2), -1)])
@pytest.mark.parametrize("masked", [False, True])
def test_batchrenorm_backward_matches_finite_differences(backend, shape, axis, masked):
    """``dx`` is the gradient with r and d held at their values; gamma and beta do not enter r
    and d, so their gradients are those of the full function."""
    rng = np.random.default_rng(seed_of((shape, axis, masked)))
    c = shape[axis]
    x = rng.normal(size=shape) * 2 + 1
    w = rng.normal(size=shape)
    g = rng.uniform(0.5, 2, c)
    b = rng.normal(size=c)
    rmean = rng.normal(size=c)
    rvar = rng.uniform(0.3, 3, c)
    mshape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    mask = (rng.random(mshape) > 0.3) | (np.indices(mshape)[0] < 2) if masked else None
    kw = dict(axis=axis, backend=backend, mask=mask)
    y, cache = bn.batch_renorm_train(x, g, b, rmean, rvar, rmax=1.3, dmax=0.4, **kw)
    dx, dg, db = bn.batch_norm_backward(w, cache)
    r, d = cache.renorm_r, cache.renorm_d
    assert np.any(np.isclose(r, 1.3) | np.isclose(r, 1 / 1.3)) or np.any(np.abs(d) == 0.4)

    def fixed_rd():  # r and d constant: batch norm with the effective scale and shift
        return float(np.sum(w * bn.batch_norm_train(x, g * r, g * d + b, **kw)[0]))

    def full():
        return float(np.sum(w * bn.batch_renorm_train(x, g, b, rmean, rvar, rmax=1.3,
                                                      dmax=0.4, **kw)[0]))

    assert rel_error(dx, numerical_grad(fixed_rd, x)) < 1e-7
    assert rel_error(dg, numerical_grad(full, g)) < 1e-7
    assert rel_error(db, numerical_grad(full, b)) < 1e-7


def test_renorm_schedule_is_the_papers_ramp():
    rmax, dmax = bn.renorm_schedule()
    # Ioffe (2017): rmax 1 and dmax 0 for 5000 steps, rmax 3 at 40k, dmax 5 at 25k; linear.
    for step in (0, 4999, 5000):
        assert rmax(step) == 1.0 and dmax(step) == 0.0
    assert rmax(40000) == rmax(10**6) == 3.0 and dmax(25000) == dmax(10**6) == 5.0
    assert rmax(22500) == pytest.approx(1 + 2 * (22500 - 5000) / 35000)
    assert dmax(15000) == pytest.approx(5 * (15000 - 5000) / 20000)
    ramp = bn.Ramp(2.0, 4.0, 3, 3)  # a step function
    assert ramp(3) == 2.0 and ramp(4) == 4.0
    with pytest.raises(ValueError, match="stop >= begin"):
        bn.Ramp(1, 3, 10, 5)
    with pytest.raises(TypeError, match="begin to be an int"):
        bn.Ramp(1, 3, 1.5, 5)


def test_batchrenorm_bounds_follow_num_batches_tracked(rng):
    # momentum=1: the running statistics stay at 0 and 1, far from the batches'.
    layer = bn.BatchRenorm(3, rmax=bn.Ramp(1.0, 5.0, 0, 2), dmax=lambda step: 0.5 * step,
                           momentum=1.0, dtype=np.float64, backend="numpy")
    seen = []
    for _ in range(4):
        seen.append(layer.current_bounds())
        # Far from the running statistics: r and d clip at the bounds of this step.
        layer.forward(rng.normal(size=(16, 3)) * 20 + 30)
        r, d = layer._cache.renorm_r, layer._cache.renorm_d
        np.testing.assert_array_equal(r, np.full(3, seen[-1][0]))
        np.testing.assert_array_equal(d, np.full(3, seen[-1][1]))
    assert seen == [(1.0, 0.0), (3.0, 0.5), (5.0, 1.0), (5.0, 1.5)]


@pytest.mark.parametrize(
    "kw, exc, needle",
    [(dict(rmax=0.5), ValueError, "rmax >= 1"), (dict(dmax=-1.0), ValueError, "dmax >= 0"),
     (dict(rmax="3"), TypeError, "rmax"), (dict(dmax=True), TypeError, "dmax"),
     (dict(rmax=float("nan")), ValueError, "rmax >= 1"),
     (dict(rmax=lambda step: 0.9), ValueError, r"rmax\(0\)"),
     (dict(dmax=lambda step: None), TypeError, r"dmax\(0\)"),
     (dict(track_running_stats=False), ValueError, "track_running_stats=True")],
)
def test_batchrenorm_bad_arguments(kw, exc, needle):
    with pytest.raises(exc, match=needle):
        bn.BatchRenorm(3, **kw)


def test_batchrenorm_bound_that_turns_bad_later_changes_nothing(rng):
    layer = bn.BatchRenorm(3, rmax=lambda step: 2.0 if step < 1 else 0.1, dtype=np.float64,
                           backend="numpy")
    x = rng.normal(size=(6, 3))
    layer.forward(x)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"rmax\(1\) of .*rmax >= 1"):
        layer.forward(x)
    assert_same_state(before, layer)


def test_batch_renorm_train_bad_input(rng):
    x = rng.normal(size=(6, 3))
    ones, zeros = np.ones(3), np.zeros(3)
    with pytest.raises(ValueError, match="running_var with 3 values"):
        bn.batch_renorm_train(x, ones, zeros, zeros, np.ones(4))
    with pytest.raises(ValueError, match="dmax >= 0"):
        bn.batch_renorm_train(x, ones, zeros, zeros, ones, dmax=-0.1)
    with pytest.raises(TypeError, match="running_mean of dtype"):
        bn.batch_renorm_train(x, ones, zeros, np.zeros(3, int), ones)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_batchrenorm_round_trips_through_save_and_load(tmp_path, rng, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    rmax, dmax = bn.renorm_schedule(warmup=1, rmax_step=4, dmax_step=3)
    layer = bn.BatchRenorm(3, rmax=rmax, dmax=dmax, virtual_batch_size=4, backend="numpy")
    for _ in range(2):
        layer.forward(rng.normal(size=(10, 3)).astype(np.float32))
    layer.save(tmp_path / f"r{suffix}")
    back = bn.load(tmp_path / f"r{suffix}", backend="numpy")
    assert type(back) is bn.BatchRenorm
    assert back.rmax == rmax and back.dmax == dmax and back.virtual_batch_size == 4
    assert back.num_batches_tracked == 2
    x = rng.normal(size=(10, 3)).astype(np.float32)
    np.testing.assert_array_equal(back.forward(x), layer.forward(x))
    np.testing.assert_array_equal(back.running_var, layer.running_var)
    fixed = bn.BatchRenorm(3, rmax=2.0, dmax=1.0)
    fixed.save(tmp_path / f"f{suffix}")
    back = bn.load(tmp_path / f"f{suffix}")
    assert (back.rmax, back.dmax) == (2.0, 1.0)
    assert "rmax=2.0" in repr(back)
    # A function cannot be saved without pickle: an error, and no file.
    with pytest.raises(TypeError, match="cannot be saved without pickle"):
        bn.BatchRenorm(3, rmax=lambda step: 2.0).save(tmp_path / f"bad{suffix}")
    assert not (tmp_path / f"bad{suffix}").exists()


def test_load_refuses_renorm_bounds_on_a_batchnorm_and_bad_ramps(tmp_path):
    import json

    layer = bn.BatchRenorm(3, rmax=bn.Ramp(1, 3, 0, 5))
    config = layer._config()
    for cls, key, value, needle in [
        ("BatchNorm", "rmax", 2.0, "belong to a BatchRenorm"),
        ("BatchRenorm", "rmax", {"ramp": [1, 3]}, "rmax as a float or"),
        ("BatchRenorm", "dmax", -1.0, "dmax >= 0"),
    ]:
        bad = dict(config, **{"class": cls, key: value})
        path = tmp_path / "x.npz"
        np.savez(path, config=np.array(json.dumps(bad)), **layer.state_dict())
        with pytest.raises(bn.LoadError, match=needle):
            bn.load(path)


def test_sync_batchrenorm_on_one_rank_is_batchrenorm(rng):
    MPI = pytest.importorskip("mpi4py.MPI")
    from batchnorm.distributed import SyncBatchRenorm, convert_sync_batchnorm

    ref = bn.BatchRenorm(4, rmax=1.2, dmax=0.3, dtype=np.float64, backend="numpy")
    syn = SyncBatchRenorm(4, comm=MPI.COMM_SELF, rmax=1.2, dmax=0.3, dtype=np.float64,
                          backend="numpy")
    for _ in range(2):
        x = rng.normal(size=(7, 4)) * 3 + 1
        dy = rng.normal(size=x.shape)
        np.testing.assert_array_equal(syn.forward(x), ref.forward(x))
        np.testing.assert_array_equal(syn.backward(dy), ref.backward(dy))
        np.testing.assert_array_equal(syn.running_var, ref.running_var)
    own = {k for k in vars(SyncBatchRenorm) if k.startswith("_") and not k.startswith("__")}
    assert not own & set(dir(bn.BatchRenorm)), own
    # Conversion keeps the renorm bounds and shares the arrays.
    layer = bn.BatchRenorm(4, rmax=bn.Ramp(1, 2, 0, 10), dmax=0.7)
    net = {"bn": layer}
    convert_sync_batchnorm(net, comm=MPI.COMM_SELF)
    new = net["bn"]
    assert type(new) is SyncBatchRenorm and new.rmax == layer.rmax and new.dmax == 0.7
    assert new.gamma is layer.gamma and new.running_var is layer.running_var


def test_double_backward_refuses_variant_caches(rng):
    x = rng.normal(size=(6, 3))
    ones = np.ones(3)
    _, cache = bn.batch_renorm_train(x, ones, ones, ones, ones)
    with pytest.raises(ValueError, match="Batch Renormalization"):
        bn.batch_norm_double_backward(cache, x, x)
    _, cache = bn.batch_norm_train(x, ones, ones, mask=np.arange(6) > 1)
    with pytest.raises(ValueError, match="masked"):
        bn.batch_norm_double_backward(cache, x, x)


@pytest.mark.parametrize(
    "sizes",
    [pytest.param("3,8", id="n2-uneven"), pytest.param("5,0,7", id="n3-empty-shard")],
)
def test_sync_masks_and_renorm_equal_the_concatenated_batch_under_mpiexec(sizes):
    """Under real mpiexec: masked SyncBatchNorm and SyncBatchRenorm (masked or not) equal
    BatchNorm / BatchRenorm on the concatenated batch and mask; bad masks raise on every rank."""
    from test_distributed import _backends, assert_all_ok, run_mpi

    n = len(sizes.split(","))
    proc = run_mpi(n, "variants", sizes, _backends() if n == 3 else "numpy", timeout=600)
    assert_all_ok(proc, n, "variants")
