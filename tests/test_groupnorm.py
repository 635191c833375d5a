"""group_norm / layer_norm kernels: PyTorch as the oracle, finite differences, exactness for a
large mean, float16, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchnorm import (
    GroupNormCache,
    group_norm,
    group_norm_backward,
    layer_norm,
    layer_norm_backward,
)
from helpers import numerical_grad, rel_error, seed_of

# (rtol, atol) per dtype of the comparison with PyTorch in float64 on the same values (PyTorch
# in float32 has float32 round-off of its own, amplified by 1/sqrt(eps) for one-value groups).
TOL = {np.float32: (2e-5, 2e-5), np.float64: (1e-10, 1e-10)}
FD_TOL = 1e-7

# shape (channels on axis 1), groups
GN_CASES = [
    ((5, 6), 3),
    ((4, 6, 7), 2),
    ((3, 4, 5, 6), 1),
    ((3, 4, 5, 6), 4),  # instance norm
    ((2, 6, 3, 4, 5), 3),
    ((2, 8, 1, 1), 8),
]
# shape, normalized_shape
LN_CASES = [
    ((5, 7), (7,)),
    ((4, 3, 6), (6,)),
    ((4, 3, 6), (3, 6)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((2, 2, 3, 4, 5), (4, 5)),
    ((9,), (9,)),  # no leading dims
]


def _torch(a):
    torch = pytest.importorskip("torch")
    return torch.tensor(np.ascontiguousarray(a, dtype=np.float64), requires_grad=True)


def _params(rng, shape, dtype, affine):
    if not affine:
        return None, None
    return (rng.standard_normal(shape).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


def _to_last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


# --- PyTorch oracle --------------------------------------------------------------------------


@pytest.mark.parametrize("shape,groups", GN_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_group_norm_matches_torch(shape, groups, dtype, affine, layout, backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed_of((shape, groups, dtype, affine, layout)))
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = _params(rng, (c,), dtype, affine)

    xt = _torch(x)
    gt = None if gamma is None else _torch(gamma)
    bt = None if beta is None else _torch(beta)
    yt = torch.nn.functional.group_norm(xt, groups, gt, bt, 1e-5)
    yt.backward(torch.tensor(dy, dtype=torch.float64))

    if layout == "last":
        y, cache = group_norm(_to_last(x), groups, gamma, beta, axis=-1, backend=backend)
        dx, dgamma, dbeta = group_norm_backward(_to_last(dy), cache)
        y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
    else:
        y, cache = group_norm(x, groups, gamma, beta, backend=backend)
        dx, dgamma, dbeta = group_norm_backward(dy, cache)
    rtol, atol = TOL[dtype]
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=rtol, atol=atol)
    # dx = gamma * inv_std * (dy - mean(dy) - ...): terms of size |gamma * dy| * inv_std
    # cancel (exactly, for one-value groups, where inv_std = 1/sqrt(eps)); the round-off is
    # relative to them.
    inv_std = np.repeat(1 / np.sqrt(cache.var + 1e-5), shape[1] // groups, axis=1)
    terms = np.abs(dy.reshape(shape[0], shape[1], -1)) * inv_std[:, :, None]
    if affine:
        terms *= np.abs(gamma)[None, :, None]
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=rtol, atol=atol * max(1, terms.max()))
    assert cache.mean.shape == cache.var.shape == (shape[0], groups)
    assert cache.count == math.prod(shape[1:]) // groups
    if affine:
        assert dgamma.dtype == dbeta.dtype == dtype
        np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=rtol, atol=atol * 10)
        np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=rtol, atol=atol * 10)
    else:
        assert dgamma is None and dbeta is None


def test_instance_norm_is_group_norm_with_one_channel_per_group(backend, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 5, 4, 6))
    gamma, beta = rng.standard_normal(5), rng.standard_normal(5)
    y, _ = group_norm(x, 5, gamma, beta, backend=backend)
    ref = torch.nn.functional.instance_norm(
        torch.tensor(x), weight=torch.tensor(gamma), bias=torch.tensor(beta), eps=1e-5
    )
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,ns", LN_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, ns, dtype, affine, backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed_of((shape, ns, dtype, affine)))
    x = (rng.standard_normal(shape) * 2 - 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = _params(rng, ns, dtype, affine)

    xt = _torch(x)
    gt = None if gamma is None else _torch(gamma)
    bt = None if beta is None else _torch(beta)
    yt = torch.nn.functional.layer_norm(xt, ns, gt, bt, 1e-5)
    yt.backward(torch.tensor(dy, dtype=torch.float64))

    y, cache = layer_norm(x, ns, gamma, beta, backend=backend)
    dx, dgamma, dbeta = layer_norm_backward(dy, cache)
    rtol, atol = TOL[dtype]
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=rtol, atol=atol)
    assert cache.mean.shape == shape[: len(shape) - len(ns)]
    if affine:
        assert dgamma.shape == dbeta.shape == ns
        np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=rtol, atol=atol * 10)
        np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=rtol, atol=atol * 10)
    else:
        assert dgamma is None and dbeta is None


def test_int_normalized_shape_is_the_last_dim(rng, backend):
    x = rng.standard_normal((3, 4, 5))
    y1, _ = layer_norm(x, 5, backend=backend)
    y2, _ = layer_norm(x, (5,), backend=backend)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(y1.mean(axis=-1), 0, atol=1e-12)


# --- finite differences in float64 ------------------------------------------------------------


def _fd_check(forward, backward, x, params, rng):
    """Central differences of ``sum(r * forward())`` against ``backward(r)``."""
    y, cache = forward()
    r = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = backward(r, cache)

    def loss() -> float:
        return float(np.sum(r * forward()[0]))

    errors = {"dx": rel_error(dx, numerical_grad(loss, x))}
    for name, p, g in zip(("gamma", "beta"), params, (dgamma, dbeta), strict=True):
        if p is None:
            assert g is None
        else:
            errors[name] = rel_error(g, numerical_grad(loss, p))
    assert max(errors.values()) < FD_TOL, errors


@pytest.mark.parametrize("shape,groups,axis", [
    ((4, 6), 2, 1), ((3, 4, 5), 2, 1), ((2, 3, 2, 4), 2, -1), ((2, 4, 2, 2, 3), 4, 1),
    ((3, 4, 3), 1, 1),
])
@pytest.mark.parametrize("which", ["both", "gamma", "beta", "none"])
def test_group_norm_backward_finite_differences(shape, groups, axis, which, backend):
    rng = np.random.default_rng(seed_of((shape, groups, axis, which)))
    c = shape[axis]
    x = rng.standard_normal(shape)
    gamma = rng.standard_normal(c) if which in ("both", "gamma") else None
    beta = rng.standard_normal(c) if which in ("both", "beta") else None
    _fd_check(
        lambda: group_norm(x, groups, gamma, beta, axis=axis, backend=backend),
        group_norm_backward, x, (gamma, beta), rng,
    )


@pytest.mark.parametrize("shape,ns", [((4, 6), (6,)), ((2, 3, 4), (3, 4)), ((5,), (5,))])
@pytest.mark.parametrize("which", ["both", "gamma", "beta", "none"])
def test_layer_norm_backward_finite_differences(shape, ns, which, backend):
    rng = np.random.default_rng(seed_of((shape, ns, which)))
    x = rng.standard_normal(shape)
    gamma = rng.standard_normal(ns) if which in ("both", "gamma") else None
    beta = rng.standard_normal(ns) if which in ("both", "beta") else None
    _fd_check(
        lambda: layer_norm(x, ns, gamma, beta, backend=backend),
        layer_norm_backward, x, (gamma, beta), rng,
    )


# --- numerics -------------------------------------------------------------------------------


def _group_norm_f64(x, groups, gamma, beta, dy, eps=1e-5):
    """Group norm and its gradient written out in float64 (the reference for float32 data)."""
    n, c = x.shape[:2]
    xg = x.astype(np.float64).reshape(n, groups, -1)
    mean = xg.mean(axis=2, keepdims=True)
    inv = 1 / np.sqrt(((xg - mean) ** 2).mean(axis=2, keepdims=True) + eps)
    x_hat = ((xg - mean) * inv).reshape(x.shape)
    bshape = (1, c) + (1,) * (x.ndim - 2)
    y = x_hat * gamma.reshape(bshape) + beta.reshape(bshape)
    dxh = (dy * gamma.reshape(bshape)).reshape(n, groups, -1)
    xh = x_hat.reshape(n, groups, -1)
    dx = inv * (dxh - dxh.mean(axis=2, keepdims=True)
                - xh * (dxh * xh).mean(axis=2, keepdims=True))
    return y, dx.reshape(x.shape)


@pytest.mark.parametrize("axis", [1, -1])
def test_group_norm_exact_for_large_mean_float32(axis, backend, rng):
    x = (1e4 + rng.standard_normal((4, 6, 5, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.standard_normal(6).astype(np.float32)
    beta = rng.standard_normal(6).astype(np.float32)
    ref_y, ref_dx = _group_norm_f64(x, 3, gamma, beta, dy)
    if axis == 1:
        y, cache = group_norm(x, 3, gamma, beta, backend=backend)
        dx = group_norm_backward(dy, cache)[0]
    else:
        y, cache = group_norm(_to_last(x), 3, gamma, beta, axis=-1, backend=backend)
        dx = group_norm_backward(_to_last(dy), cache)[0]
        y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
    assert y.dtype == np.float32
    # float32 precision of O(1) values: a one-pass variance would be off by orders of magnitude.
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=2e-6 * np.abs(ref_y).max())
    np.testing.assert_allclose(dx, ref_dx, rtol=0, atol=1e-5 * np.abs(ref_dx).max())
    np.testing.assert_allclose(cache.mean, x.astype(np.float64).reshape(4, 3, -1).mean(2),
                               rtol=1e-12)


def test_layer_norm_exact_for_large_mean_float32(backend, rng):
    x = (1e4 + rng.standard_normal((6, 4, 50))).astype(np.float32)
    y, cache = layer_norm(x, (4, 50), backend=backend)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(1, 2), keepdims=True)
    ref = (xd - mean) / np.sqrt(xd.var(axis=(1, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    np.testing.assert_allclose(cache.var, xd.var(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["group", "group-last", "layer"])
def test_float16_is_computed_in_float32(kind, backend, rng):
    x = (rng.standard_normal((3, 4, 6)) * 4 + 100).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    if kind == "layer":
        gamma = rng.standard_normal((4, 6)).astype(np.float16)
        beta = rng.standard_normal((4, 6)).astype(np.float16)

        def run(a, b):
            y, cache = layer_norm(a, (4, 6), gamma, beta, backend=backend)
            return (y, *layer_norm_backward(b, cache))
    else:
        axis = -1 if kind == "group-last" else 1
        gamma = rng.standard_normal(x.shape[axis]).astype(np.float16)
        beta = rng.standard_normal(x.shape[axis]).astype(np.float16)

        def run(a, b):
            y, cache = group_norm(a, 2, gamma, beta, axis=axis, backend=backend)
            return (y, *group_norm_backward(b, cache))

    y16, dx16, dg16, db16 = run(x, dy)
    y32, dx32, dg32, db32 = run(x.astype(np.float32), dy.astype(np.float32))
    assert y16.dtype == dx16.dtype == dg16.dtype == db16.dtype == np.float16
    assert np.isfinite(y16).all() and np.isfinite(dx16).all()
    np.testing.assert_array_equal(y16, y32.astype(np.float16))
    np.testing.assert_array_equal(dx16, dx32.astype(np.float16))
    np.testing.assert_array_equal(dg16, dg32.astype(np.float16))
    np.testing.assert_array_equal(db16, db32.astype(np.float16))


def test_channels_last_equals_channels_first(backend, rng):
    x = rng.standard_normal((3, 5, 4, 6))  # (N, H, W, C)
    gamma, beta, dy = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(x.shape)
    y, cache = group_norm(x, 3, gamma, beta, axis=-1, backend=backend)
    dx, dg, db = group_norm_backward(dy, cache)
    yf, cf = group_norm(np.moveaxis(x, -1, 1), 3, gamma, beta, backend=backend)
    dxf, dgf, dbf = group_norm_backward(np.moveaxis(dy, -1, 1), cf)
    assert y.flags.c_contiguous and dx.flags.c_contiguous
    np.testing.assert_array_equal(y, np.moveaxis(yf, 1, -1))
    np.testing.assert_array_equal(dx, np.moveaxis(dxf, 1, -1))
    np.testing.assert_array_equal(dg, dgf)
    np.testing.assert_array_equal(db, dbf)
    np.testing.assert_array_equal(cache.mean, cf.mean)


def test_strided_input_and_inputs_not_modified(backend, rng):
    base = rng.standard_normal((4, 8, 10))
    x = base[:, ::2, 1::2]  # non-contiguous
    keep = x.copy()
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    g0, b0 = gamma.copy(), beta.copy()
    y, cache = group_norm(x, 2, gamma, beta, backend=backend)
    dy = rng.standard_normal(x.shape)[:, :, ::-1]
    dy0 = dy.copy()
    dx, _, _ = group_norm_backward(dy, cache)
    yc, cc = group_norm(np.ascontiguousarray(x), 2, gamma, beta, backend=backend)
    np.testing.assert_array_equal(y, yc)
    np.testing.assert_array_equal(dx, group_norm_backward(np.ascontiguousarray(dy), cc)[0])
    for a, b in ((x, keep), (gamma, g0), (beta, b0), (dy, dy0)):
        np.testing.assert_array_equal(a, b)


def test_backends_agree(rng):
    from conftest import BACKENDS

    if len(BACKENDS) < 2:
        pytest.skip("only one backend installed")
    x = rng.standard_normal((8, 16, 9, 9)).astype(np.float32)
    gamma, beta = rng.standard_normal(16), rng.standard_normal(16)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = {}
    for be in BACKENDS:
        y, cache = group_norm(x, 4, gamma, beta, backend=be)
        out[be] = (y, *group_norm_backward(dy, cache))
    for a, b in zip(out["numpy"], out["numba"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_constant_group_gives_beta_and_finite_gradient(backend):
    x = np.ones((2, 4, 3))
    gamma, beta = np.full(4, 2.0), np.arange(4.0)
    y, cache = group_norm(x, 2, gamma, beta, backend=backend)
    np.testing.assert_array_equal(y, np.broadcast_to(beta[None, :, None], x.shape))
    dx, _, _ = group_norm_backward(np.ones_like(x), cache)
    assert np.isfinite(dx).all()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=np.zeros((2, 4), dtype=np.int64)), TypeError, "x of dtype float16"),
    (dict(x=np.zeros(4)), ValueError, "at least 2 dims"),
    (dict(x=np.zeros((0, 4, 3))), ValueError, "non-empty"),
    (dict(num_groups=3), ValueError, "divide the 4 channels"),
    (dict(num_groups=0), ValueError, "num_groups >= 1"),
    (dict(num_groups=2.0), TypeError, "num_groups to be an int"),
    (dict(num_groups=True), TypeError, "num_groups to be an int"),
    (dict(gamma=np.ones(3)), ValueError, r"gamma of shape \(4,\)"),
    (dict(gamma=np.ones(4, dtype=np.int32)), TypeError, "gamma of dtype"),
    (dict(beta=np.ones((4, 1))), ValueError, r"beta of shape \(4,\)"),
    (dict(axis=0), ValueError, "batch axis"),
    (dict(axis=3), ValueError, "out of range"),
    (dict(axis=1.0), TypeError, "axis to be an int"),
    (dict(eps=0.0), ValueError, "eps > 0"),
    (dict(eps=float("nan")), ValueError, "eps > 0"),
    (dict(eps="1e-5"), TypeError, "eps to be a float"),
    (dict(backend="bogus"), ValueError, "backend"),
])
def test_group_norm_bad_input(kwargs, exc, match):
    args = dict(x=np.zeros((2, 4, 3)), num_groups=2, gamma=np.ones(4), beta=np.zeros(4))
    args.update(kwargs)
    x = args.pop("x")
    g = args.pop("num_groups")
    gamma, beta = args.pop("gamma"), args.pop("beta")
    with pytest.raises(exc, match=match):
        group_norm(x, g, gamma, beta, **args)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=np.zeros((2, 4), dtype=np.int64)), TypeError, "x of dtype float16"),
    (dict(x=np.zeros((2, 5))), ValueError, r"normalized_shape \(4,\)"),
    (dict(x=np.zeros((0, 4))), ValueError, "non-empty"),
    (dict(ns=()), ValueError, "at least one dim"),
    (dict(ns="4"), TypeError, "int or a sequence"),
    (dict(ns=(4.0,)), TypeError, "to be an int"),
    (dict(ns=(0,)), ValueError, ">= 1"),
    (dict(ns=(3, 4)), ValueError, "at least 2 dims|last 2 dim"),
    (dict(gamma=np.ones(5)), ValueError, r"gamma of shape \(4,\)"),
    (dict(beta=np.ones(4, dtype=bool)), TypeError, "beta of dtype"),
    (dict(eps=-1.0), ValueError, "eps > 0"),
])
def test_layer_norm_bad_input(kwargs, exc, match):
    args = dict(x=np.zeros((2, 4)), ns=(4,), gamma=np.ones(4), beta=np.zeros(4))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        layer_norm(args.pop("x"), args.pop("ns"), args.pop("gamma"), args.pop("beta"), **args)


def test_backward_bad_input(rng):
    x = rng.standard_normal((2, 4, 3))
    _, gcache = group_norm(x, 2, np.ones(4), np.zeros(4))
    _, lcache = layer_norm(x, (4, 3), np.ones((4, 3)), np.zeros((4, 3)))
    assert isinstance(gcache, GroupNormCache)
    with pytest.raises(ValueError, match=r"dy of shape \(2, 4, 3\)"):
        group_norm_backward(np.zeros((2, 4)), gcache)
    with pytest.raises(TypeError, match="dy of dtype"):
        group_norm_backward(np.zeros((2, 4, 3), dtype=np.int64), gcache)
    with pytest.raises(TypeError, match="GroupNormCache"):
        group_norm_backward(x, None)
    with pytest.raises(ValueError, match="from group_norm, got one from layer_norm"):
        group_norm_backward(x, lcache)
    with pytest.raises(ValueError, match="from layer_norm, got one from group_norm"):
        layer_norm_backward(x, gcache)
    with pytest.raises(ValueError, match="dy of shape"):
        layer_norm_backward(x[:1], lcache)
