"""The pure kernels: gradients, exactness, dtypes and errors, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.functional import batch_norm_backward, batch_norm_inference, batch_norm_train
from helpers import numerical_grad, rel_error, seed_of

# shape, feature axis
LAYOUTS = [
    ((6, 3), 1),
    ((6, 3), -1),
    ((3, 7), 0),
    ((4, 3, 5), 1),
    ((4, 5, 3), -1),
    ((3, 2, 3, 2), 1),
    ((3, 2, 3, 2), -1),
    ((3, 2, 3, 2), 2),
    ((2, 2, 2, 3, 2), 1),
    ((2, 2, 2, 3, 2), -1),
    ((2, 3, 2, 2, 2), 3),
]
GRAD_TOL = 1e-6


def _params(rng, c, affine):
    if not affine:
        return None, None
    return rng.normal(1.0, 0.5, c), rng.normal(0.0, 0.5, c)


def _input(rng, shape, order):
    x = rng.normal(0.5, 2.0, shape)
    return np.asfortranarray(x) if order == "F" else x


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("training", [True, False])
def test_kernel_gradients_match_finite_differences(backend, shape, axis, affine, order, training):
    rng = np.random.default_rng(seed_of((shape, axis, affine, order, training)))
    c = shape[axis]
    x = _input(rng, shape, order)
    gamma, beta = _params(rng, c, affine)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    w = rng.normal(size=shape)

    def forward():
        if training:
            return batch_norm_train(x, gamma, beta, axis=axis, backend=backend)
        return batch_norm_inference(
            x, gamma, beta, mean, var, axis=axis, backend=backend, return_cache=True
        )

    def loss():
        return float(np.sum(forward()[0] * w))

    _, cache = forward()
    dx, dgamma, dbeta = batch_norm_backward(w, cache)
    assert rel_error(dx, numerical_grad(loss, x)) < GRAD_TOL
    if affine:
        assert rel_error(dgamma, numerical_grad(loss, gamma)) < GRAD_TOL
        assert rel_error(dbeta, numerical_grad(loss, beta)) < GRAD_TOL
    else:
        assert dgamma is None and dbeta is None


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_training_output_has_zero_mean_unit_variance(backend, shape, axis, rng):
    x = rng.normal(3.0, 5.0, shape)
    y, cache = batch_norm_train(x, None, None, axis=axis, eps=1e-12, backend=backend)
    ax = axis % len(shape)
    red = tuple(i for i in range(len(shape)) if i != ax)
    np.testing.assert_allclose(y.mean(axis=red), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=red), 1, rtol=1e-9)
    np.testing.assert_allclose(cache.mean, x.mean(axis=red), rtol=1e-13)
    np.testing.assert_allclose(cache.var, x.var(axis=red), rtol=1e-12)
    assert cache.count == x.size // shape[ax]


def test_layouts_agree(backend, rng):
    """(N, C, H, W) on axis 1 and its channels-last transpose on axis -1 are the same math."""
    x = rng.normal(size=(4, 3, 5, 6))
    g, b = rng.normal(size=3), rng.normal(size=3)
    y1, c1 = batch_norm_train(x, g, b, axis=1, backend=backend)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y2, c2 = batch_norm_train(xl, g, b, axis=-1, backend=backend)
    np.testing.assert_allclose(y1, y2.transpose(0, 3, 1, 2), rtol=1e-12, atol=1e-12)
    dy = rng.normal(size=x.shape)
    d1 = batch_norm_backward(dy, c1)
    d2 = batch_norm_backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)), c2)
    np.testing.assert_allclose(d1[0], d2[0].transpose(0, 3, 1, 2), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d1[1], d2[1], rtol=1e-10)
    np.testing.assert_allclose(d1[2], d2[2], rtol=1e-10)


# float16 cannot hold std-1 data at mean 1e4 (its values there are 8 apart), so float16 gets
# the same ratio of mean to spread that it can resolve: mean 1e3, std 4.
LARGE_MEAN = [(np.float16, 1e3, 4.0, 4e-3), (np.float32, 1e4, 1.0, 2e-6),
              (np.float64, 1e4, 1.0, 1e-12)]


@pytest.mark.parametrize("dtype,center,spread,tol", LARGE_MEAN)
@pytest.mark.parametrize("shape,axis", [((256, 8), 1), ((16, 4, 8, 8), 1), ((16, 8, 8, 4), -1)])
def test_large_mean_normalises_like_the_shifted_batch(
    backend, dtype, center, spread, tol, shape, axis
):
    """Data with a mean far above its spread must give what the same data moved to mean 0
    gives. The one-pass formula E[x^2] - E[x]^2 loses every digit here in float32.
    """
    rng = np.random.default_rng(1)
    x = (center + spread * rng.normal(size=shape)).astype(dtype)
    shifted = (x.astype(np.float64) - center).astype(dtype)  # exact: same values, mean ~0
    np.testing.assert_array_equal(shifted.astype(np.float64) + center, x.astype(np.float64))
    c = shape[axis]
    g = rng.normal(1, 0.2, c).astype(dtype)
    b = rng.normal(0, 0.2, c).astype(dtype)
    y, cache = batch_norm_train(x, g, b, axis=axis, backend=backend)
    ys, caches = batch_norm_train(shifted, g, b, axis=axis, backend=backend)
    assert y.dtype == dtype
    assert (caches.var > 0.5 * spread**2).all()  # the data do vary: the check is not vacuous
    np.testing.assert_allclose(y.astype(np.float64), ys.astype(np.float64), rtol=0, atol=tol * 4)
    np.testing.assert_allclose(cache.var, caches.var, rtol=tol)
    np.testing.assert_allclose(cache.mean - center, caches.mean, atol=tol * 10 * spread)
    dy = rng.normal(size=shape).astype(dtype)
    dx, dg, db = batch_norm_backward(dy, cache)
    dxs, dgs, dbs = batch_norm_backward(dy, caches)
    np.testing.assert_allclose(dx.astype(np.float64), dxs.astype(np.float64), atol=tol * 40)
    np.testing.assert_allclose(dg.astype(np.float64), dgs.astype(np.float64), rtol=tol * 40)


def test_long_float32_reduction_stays_exact(backend):
    """2**21 float32 values per feature: float32 accumulation would drift; float64 does not."""
    rng = np.random.default_rng(2)
    x64 = 100.0 + rng.normal(size=(2**21, 1))
    x = x64.astype(np.float32)
    _, cache = batch_norm_train(x, None, None, backend=backend)
    ref = x.astype(np.float64)
    np.testing.assert_allclose(cache.mean, ref.mean(), rtol=1e-12)
    np.testing.assert_allclose(cache.var, ref.var(), rtol=1e-6)


def _extreme_float32(case: str, layout: str) -> tuple[np.ndarray, int]:
    """Finite float32 batches whose squared deviations leave float32's range.

    "huge": values around 1e20, two of them 3e19 away per feature (their squares, 9e38,
    overflow float32; the variance, 2e37, fits). "tiny": values around 1e-25 (their squares
    underflow to zero). Layout "rows" is (100, 3); "planes" the same values as (25, 3, 4).
    """
    rng = np.random.default_rng(13)
    if case == "huge":
        x = np.float32(1e20) + np.float32(1e18) * rng.standard_normal((100, 3), np.float32)
        x[0] += np.float32(3e19)
        x[1] -= np.float32(3e19)
    else:
        x = np.float32(1e-25) * rng.standard_normal((100, 3), np.float32)
    if layout == "planes":
        return np.ascontiguousarray(x.reshape(25, 4, 3).transpose(0, 2, 1)), 1
    return x, 1


@pytest.mark.parametrize("layout", ["rows", "planes"])
@pytest.mark.parametrize("case", ["huge", "tiny"])
def test_float32_statistics_do_not_overflow_or_underflow(backend, case, layout):
    """The NumPy backend squared float32 deviations in float32: a batch around 1e20 got an
    infinite variance (and the layer refused it), one around 1e-25 a variance of zero."""
    x, axis = _extreme_float32(case, layout)
    assert x.dtype == np.float32 and np.isfinite(x).all()
    ref = x.astype(np.float64)
    red = (0, 2) if x.ndim == 3 else (0,)
    _, cache = batch_norm_train(x, None, None, axis=axis, backend=backend)
    np.testing.assert_allclose(cache.var, ref.var(axis=red), rtol=1e-6)
    np.testing.assert_allclose(cache.mean, ref.mean(axis=red), rtol=1e-6)
    layer = bn.BatchNorm(3, dtype=np.float32, backend=backend)
    layer.forward(x)
    want = bn.BatchNorm(3, dtype=np.float64, backend="numpy")
    want.forward(ref)
    np.testing.assert_allclose(layer.running_var, want.running_var, rtol=1e-6)
    np.testing.assert_allclose(layer.running_mean, want.running_mean, rtol=1e-6)


@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_float32_gradients_do_not_overflow(backend, layout):
    """dy * (x - mean) beyond float32's range (1e20 * 3e19) while the gradients fit: the
    products must not overflow (both backends gave NaN and Inf)."""
    x, axis = _extreme_float32("huge", layout)
    rng = np.random.default_rng(14)
    dy = np.float32(1e20) * rng.standard_normal(x.shape, np.float32)
    g = rng.normal(1, 0.2, 3).astype(np.float32)
    b = rng.normal(0, 0.2, 3).astype(np.float32)
    _, cache = batch_norm_train(x, g, b, axis=axis, backend=backend)
    got = batch_norm_backward(dy, cache)
    _, cache64 = batch_norm_train(x.astype(np.float64), g, b, axis=axis, backend="numpy")
    want = batch_norm_backward(dy.astype(np.float64), cache64)
    for name, a, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        assert a.dtype == np.float32 and np.isfinite(a).all(), name
        np.testing.assert_allclose(a, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_are_kept_and_float16_is_computed_in_float32(backend, dtype, rng):
    x = rng.normal(size=(8, 3, 4)).astype(dtype)
    g = np.ones(3, np.float32)
    b = np.zeros(3, np.float32)
    y, cache = batch_norm_train(x, g, b, backend=backend)
    assert y.dtype == dtype
    yi = batch_norm_inference(x, g, b, cache.mean, cache.var, backend=backend)
    assert yi.dtype == dtype
    dx, dg, db = batch_norm_backward(np.ones_like(x), cache)
    assert dx.dtype == dtype and dg.dtype == np.float32 and db.dtype == np.float32
    if dtype == np.float16:
        y32, _ = batch_norm_train(x.astype(np.float32), g, b, backend=backend)
        np.testing.assert_array_equal(y, y32.astype(np.float16))


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
def test_byte_swapped_input_is_computed_like_native(backend, dtype, rng):
    x = rng.normal(3, 2, (6, 4, 5)).astype(dtype)
    native = x.astype(np.dtype(dtype).newbyteorder("="))
    g = rng.normal(size=4).astype(">f4")
    y, cache = batch_norm_train(x, g, None, backend=backend)
    y0, cache0 = batch_norm_train(native, g.astype(np.float32), None, backend=backend)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, y0)
    dy = rng.normal(size=x.shape).astype(dtype)
    for a, b in zip(batch_norm_backward(dy, cache), batch_norm_backward(dy, cache0), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex128, np.bool_, object])
def test_non_float_input_is_a_type_error(dtype):
    x = np.ones((4, 3), dtype=dtype)
    with pytest.raises(TypeError, match=r"expected x of dtype float16, float32 or float64, got"):
        batch_norm_train(x, None, None)
    with pytest.raises(TypeError, match="expected x of dtype"):
        batch_norm_inference(x, None, None, np.zeros(3), np.ones(3))


def test_inference_uses_the_given_statistics(backend, rng):
    x = rng.normal(size=(5, 4, 3))
    g, b = rng.normal(size=4), rng.normal(size=4)
    m, v = rng.normal(size=4), rng.uniform(1, 2, 4)
    y = batch_norm_inference(x, g, b, m, v, eps=1e-3, backend=backend)
    ref = g[:, None] * (x - m[:, None]) / np.sqrt(v[:, None] + 1e-3) + b[:, None]
    np.testing.assert_allclose(y, ref, rtol=1e-12)


def test_errors_name_what_was_expected_and_what_came():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"at least 2 dims .* got 1-D of shape \(3,\)"):
        batch_norm_train(np.zeros(3), None, None)
    with pytest.raises(ValueError, match=r"axis 2 is out of range for input with 2 dims"):
        batch_norm_train(x, None, None, axis=2)
    with pytest.raises(ValueError, match=r"axis -3 is out of range"):
        batch_norm_train(x, None, None, axis=-3)
    with pytest.raises(ValueError, match=r"expected gamma with 3 values .*got shape \(4,\)"):
        batch_norm_train(x, np.ones(4), None)
    with pytest.raises(ValueError, match=r"expected beta with 3 values"):
        batch_norm_train(x, None, np.ones((3, 1)))
    with pytest.raises(ValueError, match=r"expected var with 3 values"):
        batch_norm_inference(x, None, None, np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match=r"expected at least one value per feature"):
        batch_norm_train(np.zeros((0, 3)), None, None)
    with pytest.raises(ValueError, match=r"expected eps > 0, got -1"):
        batch_norm_train(x, None, None, eps=-1)
    with pytest.raises(TypeError, match=r"expected gamma of dtype"):
        batch_norm_train(x, np.ones(3, int), None)
    _, cache = batch_norm_train(x + np.arange(4)[:, None], None, None)
    with pytest.raises(ValueError, match=r"expected dy of shape \(4, 3\) .*got \(3, 4\)"):
        batch_norm_backward(np.zeros((3, 4)), cache)
    with pytest.raises(TypeError, match=r"expected dy of dtype"):
        batch_norm_backward(np.zeros((4, 3), int), cache)
    with pytest.raises(ValueError, match=r"expected backend 'auto', 'numpy' or 'numba'"):
        batch_norm_train(x, None, None, backend="cuda")


def test_kernels_do_not_modify_their_inputs(backend, rng):
    x = rng.normal(size=(6, 4, 3))
    g, b = rng.normal(size=4), rng.normal(size=4)
    copies = [a.copy() for a in (x, g, b)]
    y, cache = batch_norm_train(x, g, b, backend=backend)
    dy = rng.normal(size=x.shape)
    dyc = dy.copy()
    batch_norm_backward(dy, cache)
    for a, c in zip((x, g, b, dy), (*copies, dyc), strict=True):
        np.testing.assert_array_equal(a, c)


def test_nan_propagates_through_the_kernels(backend):
    x = np.ones((4, 2))
    x[0, 1] = np.nan
    y, cache = batch_norm_train(x, None, None, backend=backend)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, 0]).all()
    assert np.isnan(cache.mean[1])


def test_update_running_stats_conventions():
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    mean, var = np.array([1.0, 2.0]), np.array([4.0, 8.0])
    m, v = bn.update_running_stats(rm, rv, mean, var, 5, momentum=0.9, num_batches_tracked=1)
    np.testing.assert_allclose(m, 0.1 * mean, rtol=1e-7)
    np.testing.assert_allclose(v, 0.9 + 0.1 * var, rtol=1e-7)
    assert m.dtype == np.float32 and v.dtype == np.float32
    m, v = bn.update_running_stats(
        rm, rv, mean, var, 5, momentum=0.9, num_batches_tracked=1, unbiased=True
    )
    np.testing.assert_allclose(v, 0.9 + 0.1 * var * 5 / 4, rtol=1e-7)
    m, v = bn.update_running_stats(rm, rv, mean, var, 5, momentum=None, num_batches_tracked=1)
    np.testing.assert_allclose(m, mean)
    np.testing.assert_allclose(v, var)
    assert rm.tolist() == [0, 0] and rv.tolist() == [1, 1]
