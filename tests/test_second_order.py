"""batch_norm_double_backward: against PyTorch's double backward and against float64 finite
differences of batch_norm_backward, training and eval caches, every layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from batchnorm import (
    batch_norm_backward,
    batch_norm_double_backward,
    batch_norm_inference,
    batch_norm_train,
)
from helpers import numerical_grad, rel_error, seed_of

# (shape, axis): 2-D, 3-D, NCHW, channels-last and a feature axis in the middle.
LAYOUTS = [
    pytest.param((6, 3), 1, id="2d"),
    pytest.param((4, 3, 5), 1, id="ncl"),
    pytest.param((3, 2, 3, 4), 1, id="nchw"),
    pytest.param((3, 3, 4, 2), -1, id="nhwc"),
]
EPS = 1e-3


def _problem(shape, axis, affine, seed):
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    c = shape[ax]
    x = rng.standard_normal(shape) * 2.0 + 0.5
    gamma = rng.uniform(0.5, 2.0, c) if affine else None
    beta = rng.standard_normal(c) if affine else None
    stats = (rng.standard_normal(c), rng.uniform(0.5, 2.0, c))
    dy = rng.standard_normal(shape)
    ddx = rng.standard_normal(shape)
    ddg = rng.standard_normal(c) if affine else None
    ddb = rng.standard_normal(c) if affine else None
    return x, gamma, beta, stats, dy, ddx, ddg, ddb


def _forward(x, gamma, beta, stats, axis, training, backend="numpy"):
    if training:
        return batch_norm_train(x, gamma, beta, axis=axis, eps=EPS, backend=backend)
    return batch_norm_inference(x, gamma, beta, *stats, axis=axis, eps=EPS, backend=backend,
                                return_cache=True)


def _scalar(x, gamma, beta, stats, dy, ddx, ddg, ddb, axis, training) -> float:
    """<dx, ddx> + <dgamma, ddgamma> + <dbeta, ddbeta> through the library's own backward."""
    _, cache = _forward(x, gamma, beta, stats, axis, training)
    dx, dg, db = batch_norm_backward(dy, cache)
    s = float(np.sum(dx * ddx))
    if ddg is not None:
        s += float(np.sum(dg * ddg))
    if ddb is not None:
        s += float(np.sum(db * ddb))
    return s


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_matches_torch_double_backward(shape, axis, affine, training):
    torch = pytest.importorskip("torch")
    x, gamma, beta, stats, dy, ddx, ddg, ddb = _problem(
        shape, axis, affine, seed_of((shape, axis, affine, training))
    )
    _, cache = _forward(x, gamma, beta, stats, axis, training)
    gx, gg, gdy = batch_norm_double_backward(cache, dy, ddx, ddg, ddb)

    # PyTorch normalises over dim 1: move our feature axis there.
    ax = axis % len(shape)

    def to_t(a):
        return torch.tensor(np.moveaxis(a, ax, 1), dtype=torch.float64)

    xt = to_t(x).requires_grad_()
    dyt = to_t(dy).requires_grad_()
    wt = None if gamma is None else torch.tensor(gamma).requires_grad_()
    bt = None if beta is None else torch.tensor(beta).requires_grad_()
    rm, rv = (None, None) if training else (torch.tensor(stats[0]), torch.tensor(stats[1]))
    yt = torch.nn.functional.batch_norm(xt, rm, rv, wt, bt, training=training, eps=EPS)
    inputs = [xt] + ([wt, bt] if affine else [])
    first = torch.autograd.grad(yt, inputs, dyt, create_graph=True)
    loss = (first[0] * to_t(ddx)).sum()
    if affine:
        loss = loss + (first[1] * torch.tensor(ddg)).sum() + (first[2] * torch.tensor(ddb)).sum()
    wrt = [xt, dyt] + ([wt] if affine else [])
    got = torch.autograd.grad(loss, wrt, allow_unused=True)
    tx = np.zeros(shape) if got[0] is None else np.moveaxis(got[0].detach().numpy(), 1, ax)
    tdy = np.moveaxis(got[1].detach().numpy(), 1, ax)
    assert gx.shape == gdy.shape == shape
    np.testing.assert_allclose(gx, tx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gdy, tdy, rtol=1e-10, atol=1e-10)
    if affine:
        np.testing.assert_allclose(gg, got[2].detach().numpy(), rtol=1e-10, atol=1e-10)
    else:
        assert gg is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_matches_finite_differences_of_backward(shape, axis, affine, training):
    x, gamma, beta, stats, dy, ddx, ddg, ddb = _problem(
        shape, axis, affine, seed_of(("fd", shape, axis, affine, training))
    )
    _, cache = _forward(x, gamma, beta, stats, axis, training)
    gx, gg, gdy = batch_norm_double_backward(cache, dy, ddx, ddg, ddb)

    def f():
        return _scalar(x, gamma, beta, stats, dy, ddx, ddg, ddb, axis, training)

    assert rel_error(gx, numerical_grad(f, x), floor=1e-3) < 1e-6
    assert rel_error(gdy, numerical_grad(f, dy)) < 1e-6
    if affine:
        assert rel_error(gg, numerical_grad(f, gamma)) < 1e-6
    if not training and not affine:
        # Fixed statistics: dx does not depend on x; only <dgamma, ddgamma> would.
        assert not gx.any()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_directional_derivative(training):
    # Move x, gamma and dy at once along a random direction: the change of the scalar is the
    # inner product of the direction with (gx, ggamma, gdy).
    shape, axis = (5, 4, 3), 1
    x, gamma, beta, stats, dy, ddx, ddg, ddb = _problem(shape, axis, True, 42)
    _, cache = _forward(x, gamma, beta, stats, axis, training)
    gx, gg, gdy = batch_norm_double_backward(cache, dy, ddx, ddg, ddb)
    rng = np.random.default_rng(43)
    vx, vg, vdy = rng.standard_normal(shape), rng.standard_normal(4), rng.standard_normal(shape)
    h = 1e-5

    def at(t):
        return _scalar(x + t * vx, gamma + t * vg, beta, stats, dy + t * vdy, ddx, ddg, ddb,
                       axis, training)

    numeric = (at(h) - at(-h)) / (2 * h)
    analytic = np.sum(gx * vx) + np.sum(gg * vg) + np.sum(gdy * vdy)
    assert abs(numeric - analytic) < 1e-7 * max(1.0, abs(analytic))


def test_only_some_second_order_weights(backend):
    # ddgamma and ddbeta None mean 0; caches of every backend hold the same statistics.
    shape, axis = (8, 3, 2), 1
    x, gamma, beta, stats, dy, ddx, ddg, ddb = _problem(shape, axis, True, 7)
    _, cache = _forward(x, gamma, beta, stats, axis, True, backend=backend)
    got = batch_norm_double_backward(cache, dy, ddx)
    want = batch_norm_double_backward(cache, dy, ddx, np.zeros(3), np.zeros(3))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    _, ref_cache = _forward(x, gamma, beta, stats, axis, True)
    for a, b in zip(got, batch_norm_double_backward(ref_cache, dy, ddx), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

    # ddbeta alone: <dbeta, ddbeta> = <sum(dy), ddbeta> depends on dy only.
    gx, gg, gdy = batch_norm_double_backward(cache, dy, np.zeros(shape), None, ddb)
    np.testing.assert_array_equal(gx, 0)
    np.testing.assert_array_equal(gg, 0)
    np.testing.assert_allclose(gdy, np.broadcast_to(ddb[None, :, None], shape))


def test_float32_with_a_large_mean_is_computed_in_float64():
    # x = 1e4 + noise in float32: the result equals the float64 computation on the same values
    # (float32 rounding of the result only), not a float32 cancellation.
    rng = np.random.default_rng(3)
    x32 = (1e4 + rng.standard_normal((64, 5))).astype(np.float32)
    g32 = rng.uniform(0.5, 2, 5).astype(np.float32)
    b32 = np.zeros(5, np.float32)
    dy32 = rng.standard_normal(x32.shape).astype(np.float32)
    ddx32 = rng.standard_normal(x32.shape).astype(np.float32)
    ddg = rng.standard_normal(5)
    _, c32 = batch_norm_train(x32, g32, b32, eps=EPS)
    _, c64 = batch_norm_train(x32.astype(np.float64), g32.astype(np.float64),
                              b32.astype(np.float64), eps=EPS)
    got = batch_norm_double_backward(c32, dy32, ddx32, ddg)
    want = batch_norm_double_backward(c64, dy32.astype(np.float64), ddx32.astype(np.float64), ddg)
    assert [a.dtype for a in got] == [np.float32, np.float32, np.float32]
    for a, b in zip(got, want, strict=True):
        assert rel_error(a, b) < 1e-6


def test_float16_input_returns_float16():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3)).astype(np.float16)
    _, cache = batch_norm_train(x, np.ones(3, np.float32), None, eps=EPS)
    gx, gg, gdy = batch_norm_double_backward(cache, x, x, np.ones(3))
    assert gx.dtype == gdy.dtype == np.float16 and gg.dtype == np.float32


def test_bad_input():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3))
    _, cache = batch_norm_train(x, np.ones(3), np.zeros(3))
    _, plain = batch_norm_train(x, None, None)
    with pytest.raises(TypeError, match="expected a BatchNormCache"):
        batch_norm_double_backward({"mean": 0}, x, x)
    with pytest.raises(ValueError, match=r"expected dy of shape \(4, 3\)"):
        batch_norm_double_backward(cache, x[:2], x)
    with pytest.raises(ValueError, match=r"expected ddx of shape \(4, 3\)"):
        batch_norm_double_backward(cache, x, x.T)
    with pytest.raises(TypeError, match="expected ddx of dtype float"):
        batch_norm_double_backward(cache, x, x.astype(int))
    with pytest.raises(ValueError, match=r"expected ddgamma of shape \(3,\)"):
        batch_norm_double_backward(cache, x, x, np.ones(4))
    with pytest.raises(ValueError, match=r"expected ddbeta of shape \(3,\)"):
        batch_norm_double_backward(cache, x, x, None, np.ones((3, 1)))
    with pytest.raises(ValueError, match="expected ddgamma None for a forward without gamma"):
        batch_norm_double_backward(plain, x, x, np.ones(3))
    # The cache of a SyncBatchNorm over several ranks: statistics of 8 values, input of 4.
    synced = dataclasses.replace(cache, count=8)
    with pytest.raises(ValueError, match="statistics over several processes are not supported"):
        batch_norm_double_backward(synced, x, x)
