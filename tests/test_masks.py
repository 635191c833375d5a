"""Masked batch statistics: ``BatchNorm.forward(x, mask)`` and ``batch_norm_train(..., mask=)``
against PyTorch (``batch_norm`` on the gathered valid values, autograd of the full masked
function), float64 finite differences, exactness for large means, float16, state, errors and the
padded-sequences example."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
from helpers import assert_same_state, numerical_grad, rel_error, seed_of, snapshot

ROOT = Path(__file__).resolve().parents[1]
TOL = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=2e-5, atol=2e-5)}

# (shape, axis, mask shape): the mask has x's shape without the feature axis, or x's dims with
# size 1 on the feature axis; dims of size 1 broadcast.
CASES = [
    ((12, 4), 1, (12,)),
    ((5, 3, 7), 1, (5, 7)),
    ((4, 3, 5, 6), 1, (4, 5, 6)),
    ((5, 7, 3), -1, (5, 7)),
    ((5, 3, 7), 1, (5, 1, 7)),
    ((6, 3, 4), 1, (6, 1)),
    ((4, 2, 3, 5), -1, (4, 1, 3)),
    ((4, 2, 3, 5), -1, (4, 2, 3, 1)),
]


def _full_mask(mask, shape, axis):
    """The mask broadcast to x without the feature axis (the test's own reading of the rule)."""
    ax = axis % len(shape)
    without = shape[:ax] + shape[ax + 1:]
    if mask.ndim == len(shape):
        mask = np.squeeze(mask, axis=ax)
    return np.broadcast_to(mask, without)


def _random_mask(rng, mshape, shape, axis):
    mask = rng.random(mshape) > 0.35
    full = _full_mask(mask, shape, axis)
    if full.sum() < 3:
        mask = np.ones(mshape, bool)
    return mask


@pytest.mark.parametrize("shape, axis, mshape", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_masked_batchnorm_matches_torch(backend, shape, axis, mshape, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed_of((shape, axis, mshape, dtype)))
    c = shape[axis]
    layer = bn.BatchNorm(c, axis=axis, dtype=dtype, momentum=0.6, unbiased=True, backend=backend)
    layer.gamma[:] = rng.uniform(0.5, 2, c)
    layer.beta[:] = rng.normal(size=c)
    rm = torch.zeros(c, dtype=torch.float64)
    rv = torch.ones(c, dtype=torch.float64)
    for step in range(2):
        x = (rng.normal(size=shape) * (1 + step) + 3).astype(dtype)
        mask = _random_mask(rng, mshape, shape, axis)
        # Padding with values far away: counting them would change everything.
        full = _full_mask(mask, shape, axis)
        x = np.where(np.expand_dims(full, axis % len(shape)), x, dtype(-50))
        dy = rng.normal(size=shape).astype(dtype)
        y = layer.forward(x, mask)
        dx = layer.backward(dy)

        xt = torch.tensor(np.moveaxis(x.astype(np.float64), axis, -1), requires_grad=True)
        gt = torch.tensor(layer.gamma.astype(np.float64), requires_grad=True)
        bt = torch.tensor(layer.beta.astype(np.float64), requires_grad=True)
        valid = xt[torch.tensor(np.ascontiguousarray(full))]  # (M, C): gathered valid values
        # torch's batch_norm on the gathered values: the running statistics (torch momentum is
        # the weight of the new value) and the output at the valid positions.
        y_valid = torch.nn.functional.batch_norm(valid.detach(), rm, rv, gt.detach(),
                                                 bt.detach(), training=True, momentum=0.4,
                                                 eps=layer.eps)
        # The full function: those statistics applied at every position; its autograd.
        var, mean = torch.var_mean(valid, dim=0, unbiased=False)
        yt = (xt - mean) / torch.sqrt(var + layer.eps) * gt + bt
        yt.backward(torch.tensor(np.moveaxis(dy.astype(np.float64), axis, -1)))

        tol = TOL[dtype]
        y_last = np.moveaxis(y, axis, -1)
        np.testing.assert_allclose(y_last[full], y_valid.numpy(), **tol)
        np.testing.assert_allclose(y, np.moveaxis(yt.detach().numpy(), -1, axis), **tol)
        np.testing.assert_allclose(dx, np.moveaxis(xt.grad.numpy(), -1, axis), **tol)
        np.testing.assert_allclose(layer.dgamma, gt.grad.numpy(), **tol)
        np.testing.assert_allclose(layer.dbeta, bt.grad.numpy(), **tol)
        np.testing.assert_allclose(layer.running_mean, rm.numpy(), **tol)
        np.testing.assert_allclose(layer.running_var, rv.numpy(), **tol)


@pytest.mark.parametrize("shape, axis, mshape", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_masked_backward_matches_finite_differences(backend, shape, axis, mshape, affine):
    rng = np.random.default_rng(seed_of((shape, axis, mshape, affine)))
    c = shape[axis]
    x = rng.normal(size=shape) * 2 + 1
    w = rng.normal(size=shape)
    mask = _random_mask(rng, mshape, shape, axis)
    g = rng.uniform(0.5, 2, c) if affine else None
    b = rng.normal(size=c) if affine else None

    def loss():
        return float(np.sum(w * bn.batch_norm_train(x, g, b, axis=axis, mask=mask,
                                                    backend=backend)[0]))

    _, cache = bn.batch_norm_train(x, g, b, axis=axis, mask=mask, backend=backend)
    dx, dg, db = bn.batch_norm_backward(w, cache)
    assert rel_error(dx, numerical_grad(loss, x)) < 1e-7
    if affine:
        assert rel_error(dg, numerical_grad(loss, g)) < 1e-7
        assert rel_error(db, numerical_grad(loss, b)) < 1e-7
    else:
        assert dg is None and db is None


def test_masked_out_values_get_only_the_direct_gradient(backend, rng):
    x = rng.normal(size=(6, 3, 4))
    mask = np.ones((6, 4), bool)
    mask[4:] = False
    g = np.array([0.5, 1.0, 2.0])
    _, cache = bn.batch_norm_train(x, g, None, mask=mask, backend=backend)
    dy = rng.normal(size=x.shape)
    dx, _, _ = bn.batch_norm_backward(dy, cache)
    k = (g / np.sqrt(cache.var + 1e-5))[None, :, None]
    np.testing.assert_allclose(dx[4:], k * dy[4:], rtol=1e-12)
    # Masked-out inputs do not enter the statistics: changing them changes no valid output.
    x2 = x.copy()
    x2[4:] += 100
    y1 = bn.batch_norm_train(x, g, None, mask=mask, backend=backend)[0]
    y2 = bn.batch_norm_train(x2, g, None, mask=mask, backend=backend)[0]
    np.testing.assert_allclose(y1[:4], y2[:4], rtol=1e-13)


def test_all_true_mask_is_no_mask(backend, rng):
    x = rng.normal(size=(7, 3, 5)).astype(np.float32)
    g, b = np.linspace(0.5, 2, 3).astype(np.float32), np.zeros(3, np.float32)
    y0, c0 = bn.batch_norm_train(x, g, b, backend=backend)
    y1, c1 = bn.batch_norm_train(x, g, b, mask=np.ones((7, 5), bool), backend=backend)
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c1.var, c0.var, rtol=1e-12)
    dy = rng.normal(size=x.shape).astype(np.float32)
    for a, b_ in zip(bn.batch_norm_backward(dy, c1), bn.batch_norm_backward(dy, c0),
                     strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)


def test_masked_statistics_exact_for_a_large_mean(backend, rng):
    x = (1e4 + rng.normal(size=(64, 3, 8))).astype(np.float32)
    mask = rng.random((64, 8)) > 0.5
    _, cache = bn.batch_norm_train(x, None, None, mask=mask, backend=backend)
    valid = np.moveaxis(x, 1, -1)[mask].astype(np.float64)
    np.testing.assert_allclose(cache.mean, valid.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cache.var, valid.var(axis=0), rtol=1e-6)
    assert cache.count == mask.sum()


def test_masked_float16_is_computed_in_float32(backend, rng):
    x = rng.normal(3, 2, size=(16, 4, 6)).astype(np.float16)
    mask = rng.random((16, 6)) > 0.3
    layer = bn.BatchNorm(4, dtype=np.float32, backend=backend)
    y = layer.forward(x, mask)
    assert y.dtype == np.float16
    ref = bn.BatchNorm(4, dtype=np.float32, backend=backend).forward(x.astype(np.float32), mask)
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert layer.backward(np.ones_like(x)).dtype == np.float16


def test_mask_in_eval_mode(rng):
    x = rng.normal(size=(8, 3, 5))
    mask = rng.random((8, 5)) > 0.5
    layer = bn.BatchNorm(3, dtype=np.float64, backend="numpy")
    layer.forward(x, mask)
    layer.eval()
    # Running statistics: the mask has no effect.
    np.testing.assert_array_equal(layer.forward(x, mask), layer.forward(x))
    with pytest.raises(TypeError, match="mask of dtype bool"):
        layer.forward(x, mask.astype(int))
    # Without running statistics, eval mode uses the masked batch statistics.
    free = bn.BatchNorm(3, dtype=np.float64, track_running_stats=False, backend="numpy").eval()
    y, _ = bn.batch_norm_train(x, free.gamma, free.beta, mask=mask, backend="numpy")
    np.testing.assert_allclose(free.forward(x, mask), y, rtol=1e-13)
    with pytest.raises(ValueError, match="got 0 for each of the 3 features"):
        free.forward(x, np.zeros((8, 5), bool))


@pytest.mark.parametrize(
    "mask, exc, needle",
    [
        (np.ones((8, 5), dtype=np.int64), TypeError, "mask of dtype bool.*got int64"),
        (np.ones((8, 5), dtype=np.float32), TypeError, "mask of dtype bool"),
        (np.ones((8, 4), bool), ValueError, r"mask of shape \(8, 5\).*got shape \(8, 4\)"),
        (np.ones((8, 3, 5), bool), ValueError, r"broadcastable to \(8, 1, 5\)"),
        (np.ones((8,), bool), ValueError, r"got shape \(8,\)"),
        (np.ones((2, 8, 1, 5), bool), ValueError, "got shape"),
        ([[True] * 5] * 8 + [[True] * 5], ValueError, r"got shape \(9, 5\)"),
    ],
)
def test_bad_mask_is_a_clear_error_and_changes_nothing(mask, exc, needle, rng):
    layer = bn.BatchNorm(3, dtype=np.float64, backend="numpy")
    x = rng.normal(size=(8, 3, 5))
    before = snapshot(layer)
    with pytest.raises(exc, match=needle):
        layer.forward(x, mask)
    assert_same_state(before, layer)
    with pytest.raises(exc, match=needle):
        bn.batch_norm_train(x, None, None, mask=mask)


@pytest.mark.parametrize("valid", [0, 1])
def test_too_few_valid_values_in_training_names_the_count(valid, rng):
    layer = bn.BatchNorm(3, dtype=np.float64, backend="numpy")
    x = rng.normal(size=(8, 3, 5))
    mask = np.zeros((8, 5), bool)
    mask.flat[:valid] = True
    before = snapshot(layer)
    with pytest.raises(ValueError, match=f"at least 2 valid.*got {valid} for each of the 3 "
                                         "features.*nothing was updated"):
        layer.forward(x, mask)
    assert_same_state(before, layer)


def test_list_mask_and_python_bools_are_accepted(rng):
    x = rng.normal(size=(4, 2))
    y_list = bn.batch_norm_train(x, None, None, mask=[True, True, False, True])[0]
    y_arr = bn.batch_norm_train(x, None, None, mask=np.array([1, 1, 0, 1], bool))[0]
    np.testing.assert_array_equal(y_list, y_arr)


def test_masked_running_statistics_use_the_valid_count(rng):
    x = rng.normal(size=(5, 2, 4))
    mask = np.zeros((5, 4), bool)
    mask[:, :2] = True  # 10 valid values per feature
    layer = bn.BatchNorm(2, dtype=np.float64, momentum=0.0, unbiased=True, backend="numpy")
    layer.forward(x, mask)
    valid = x[:, :, :2].transpose(0, 2, 1).reshape(-1, 2)
    np.testing.assert_allclose(layer.running_mean, valid.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, valid.var(axis=0, ddof=1), rtol=1e-12)


def test_masked_sequences_example_runs(capsys):
    ns = runpy.run_path(str(ROOT / "examples" / "masked_sequences.py"), run_name="example")
    assert ns["main"]() == 0
    out = capsys.readouterr().out
    assert "ok: the mask removes the padding" in out


@pytest.mark.parametrize("variant", ["mask", "ghost", "renorm", "all"])
@pytest.mark.parametrize("reuse", [False, True])
def test_variants_with_a_fused_relu_and_reused_outputs(backend, variant, reuse):
    """Masks, ghost batches and Batch Renorm with ``activation="relu"`` equal the same layer
    followed by a ReLU, forward and backward (and write into the reused output arrays)."""
    rng = np.random.default_rng(seed_of((variant, reuse)))
    kw = dict(dtype=np.float64, backend=backend)
    if variant in ("ghost", "all"):
        kw["virtual_batch_size"] = 4
    if variant in ("renorm", "all"):
        fused = bn.BatchRenorm(3, rmax=1.5, dmax=0.5, activation="relu", reuse_outputs=reuse,
                               **kw)
        plain = bn.BatchRenorm(3, rmax=1.5, dmax=0.5, **kw)
    else:
        fused = bn.BatchNorm(3, activation="relu", reuse_outputs=reuse, **kw)
        plain = bn.BatchNorm(3, **kw)
    for layer in (fused, plain):
        layer.gamma[:] = [0.5, 1.0, 2.0]
        layer.beta[:] = [0.1, -0.2, 0.3]
    for _ in range(2):
        x = rng.normal(size=(10, 3, 5)) * 2 + 1
        mask = None
        if variant in ("mask", "all"):
            mask = rng.random((10, 5)) > 0.3
            mask[:, :2] = True
        dy = rng.normal(size=x.shape)
        y = fused.forward(x, mask)
        y_ref = np.maximum(plain.forward(x, mask), 0)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        dx = fused.backward(dy)
        dx_ref = plain.backward(dy * (y_ref > 0))
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fused.dgamma, plain.dgamma, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(fused.running_var, plain.running_var)
