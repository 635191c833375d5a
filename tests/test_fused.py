"""The fused activation (batch norm + ReLU in one layer) and the output buffers (``out=``,
``reuse_outputs``)."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.nn.layers import ReLU
from batchnorm.reducers import LocalReducer
from helpers import assert_same_state, numerical_grad, rel_error, seed_of, snapshot

# (shape, axis): rows, planes and channels-last; small ones run the serial kernels, the large
# ones (>= 2**15 values) the parallel ones.
LAYOUTS = [
    ((16, 7), 1),
    ((6, 5, 4, 3), 1),
    ((4, 3, 5, 6), -1),
    ((4096, 24), 1),
    ((16, 8, 17, 19), 1),
    ((8, 9, 11, 40), -1),
]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _data(shape, axis, dtype, affine=True, offset=0.0):
    rng = np.random.default_rng(seed_of((shape, axis, np.dtype(dtype).name, affine, offset)))
    c = shape[axis]
    x = (offset + rng.normal(0.5, 2.0, shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    g = rng.normal(1.0, 0.5, c).astype(dtype) if affine else None
    b = rng.normal(0.0, 0.5, c).astype(dtype) if affine else None
    return x, dy, g, b


def _unfused_train(x, dy, g, b, axis, backend):
    """BatchNorm, then the toolkit's ReLU: the definition the fused layer must equal."""
    y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=backend)
    relu = ReLU()
    out = relu.forward(y)
    dx, dg, db = bn.batch_norm_backward(relu.backward(dy), cache)
    return out, dx, dg, db


# ---------------------------------------------------------------------------------------------
# the kernels: equal to batch norm followed by ReLU


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_train_equals_batchnorm_then_relu(backend, shape, axis, dtype, affine):
    x, dy, g, b = _data(shape, axis, dtype, affine)
    y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=backend, activation="relu")
    dx, dg, db = bn.batch_norm_backward(dy, cache)
    want = _unfused_train(x, dy, g, b, axis, backend)
    assert y.dtype == dx.dtype == dtype
    assert (y >= 0).all() and (y == 0).any() and (y > 0).any()
    for got, ref in zip((y, dx, dg, db), want, strict=True):
        if ref is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, ref, **TOL[dtype])


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_inference_equals_batchnorm_then_relu(backend, shape, axis, dtype):
    x, dy, g, b = _data(shape, axis, dtype)
    c = shape[axis]
    m = np.linspace(-1, 2, c)
    v = np.linspace(0.5, 3, c)
    y, cache = bn.batch_norm_inference(x, g, b, m, v, axis=axis, backend=backend,
                                       activation="relu", return_cache=True)
    dx, dg, db = bn.batch_norm_backward(dy, cache)
    y0, c0 = bn.batch_norm_inference(x, g, b, m, v, axis=axis, backend=backend,
                                     return_cache=True)
    relu = ReLU()
    want = (relu.forward(y0), *bn.batch_norm_backward(relu.backward(dy), c0))
    for got, ref in zip((y, dx, dg, db), want, strict=True):
        np.testing.assert_allclose(got, ref, **TOL[dtype])
    # without a cache too
    y2 = bn.batch_norm_inference(x, g, b, m, v, axis=axis, backend=backend, activation="relu")
    np.testing.assert_array_equal(y2, y)


def test_numba_fused_equals_numpy_reference_on_large_mean_data():
    pytest.importorskip("numba")
    for shape, axis in LAYOUTS:
        x, dy, g, b = _data(shape, axis, np.float32, offset=1e4)
        outs = []
        for be in ("numpy", "numba"):
            y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=be, activation="relu")
            outs.append((y, *bn.batch_norm_backward(dy, cache)))
        for got, ref in zip(*outs, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,axis", [((12, 4), 1), ((4, 3, 5), 1), ((3, 4, 5), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_gradients_match_finite_differences(backend, shape, axis, training):
    x, dy, g, b = _data(shape, axis, np.float64)
    c = shape[axis]
    m, v = np.linspace(0, 1, c), np.linspace(1, 2, c)

    def fwd(x_, g_, b_):
        if training:
            return bn.batch_norm_train(x_, g_, b_, axis=axis, backend=backend,
                                       activation="relu")
        return bn.batch_norm_inference(x_, g_, b_, m, v, axis=axis, backend=backend,
                                       activation="relu", return_cache=True)

    y, cache = fwd(x, g, b)
    dx, dg, db = bn.batch_norm_backward(dy, cache)
    # Finite differences need every pre-activation value away from the kink at 0.
    if training:
        y0 = bn.batch_norm_train(x, g, b, axis=axis, backend=backend)[0]
    else:
        y0 = bn.batch_norm_inference(x, g, b, m, v, axis=axis, backend=backend)
    assert np.abs(y0).min() > 1e-3 and (y0 < 0).any()
    xc, gc, bc = x.copy(), g.copy(), b.copy()

    def loss():
        return float(np.sum(fwd(xc, gc, bc)[0] * dy))

    assert rel_error(dx, numerical_grad(loss, xc)) < 1e-6
    assert rel_error(dg, numerical_grad(loss, gc)) < 1e-6
    assert rel_error(db, numerical_grad(loss, bc)) < 1e-6


def test_derivative_at_exact_zeros_is_zero_as_in_the_toolkit_relu(backend):
    # Per feature -1, 0, 1 (and -2, 0, 2): mean 0, so x_hat and y are exactly 0 in the middle.
    x = np.array([[-1.0, -2.0], [0.0, 0.0], [1.0, 2.0]])
    dy = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    y, cache = bn.batch_norm_train(x, None, None, backend=backend, activation="relu")
    assert y[1, 0] == 0 and y[1, 1] == 0
    dx, _, _ = bn.batch_norm_backward(dy, cache)
    _, dx_ref, _, _ = _unfused_train(x, dy, None, None, 1, backend)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    # the gradient at the zeros: dy there does not count
    dy2 = dy.copy()
    dy2[1] = 100.0
    np.testing.assert_allclose(bn.batch_norm_backward(dy2, cache)[0], dx, atol=1e-12)


def test_nan_stays_nan_in_eval_mode(backend):
    x = np.array([[np.nan, -5.0], [1.0, 5.0]])
    y = bn.batch_norm_inference(x, None, None, np.zeros(2), np.ones(2), backend=backend,
                                activation="relu")
    assert np.isnan(y[0, 0]) and y[0, 1] == 0 and y[1, 1] > 0


@pytest.mark.parametrize("shape,channels_last", [((16, 5), False), ((6, 3, 5, 4), False),
                                                 ((6, 5, 4, 3), True)])
def test_fused_matches_torch_relu_of_batch_norm(backend, shape, channels_last):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed_of((shape, channels_last)))
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[-1] if channels_last else shape[1]
    g = rng.normal(1, 0.5, c).astype(np.float32)
    b = rng.normal(0, 0.5, c).astype(np.float32)
    axis = -1 if channels_last else 1

    def to_t(a):
        return np.ascontiguousarray(np.moveaxis(a, -1, 1) if channels_last else a)

    def from_t(t):
        a = t.detach().numpy()
        return np.moveaxis(a, 1, -1) if channels_last else a

    for training in (True, False):
        m = rng.normal(size=c).astype(np.float32)
        v = rng.uniform(0.5, 2, c).astype(np.float32)
        xt = torch.tensor(to_t(x), requires_grad=True)
        gt = torch.tensor(g, requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        yt = torch.relu(torch.nn.functional.batch_norm(
            xt, None if training else torch.tensor(m), None if training else torch.tensor(v),
            gt, bt, training=training, eps=1e-5))
        yt.backward(torch.tensor(to_t(dy)))
        if training:
            y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=backend,
                                           activation="relu")
        else:
            y, cache = bn.batch_norm_inference(x, g, b, m, v, axis=axis, backend=backend,
                                               activation="relu", return_cache=True)
        dx, dg, db = bn.batch_norm_backward(dy, cache)
        np.testing.assert_allclose(y, from_t(yt), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, from_t(xt.grad), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_float16_is_computed_in_float32(backend):
    x, dy, g, b = _data((64, 6), 1, np.float32)
    y, cache = bn.batch_norm_train(x.astype(np.float16), g, b, backend=backend,
                                   activation="relu")
    dx, _, _ = bn.batch_norm_backward(dy.astype(np.float16), cache)
    assert y.dtype == dx.dtype == np.float16
    ref_y, ref_dx, _, _ = _unfused_train(x.astype(np.float16).astype(np.float32),
                                         dy.astype(np.float16).astype(np.float32), g, b, 1,
                                         backend)
    np.testing.assert_allclose(y, ref_y, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(dx, ref_dx, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bad,err,match", [
    ("tanh", ValueError, "expected activation None or 'relu', got 'tanh'"),
    (1, TypeError, "expected activation None or 'relu', got 1"),
])
def test_unknown_activation_is_rejected(bad, err, match):
    x = np.ones((4, 3))
    with pytest.raises(err, match=match):
        bn.batch_norm_train(x, None, None, activation=bad)
    with pytest.raises(err, match=match):
        bn.batch_norm_inference(x, None, None, np.zeros(3), np.ones(3), activation=bad)
    with pytest.raises(err, match=match):
        bn.BatchNorm(3, activation=bad)
    layer = bn.BatchNorm(3)
    with pytest.raises(err, match=match):
        layer.activation = bad
    assert layer.activation is None


# ---------------------------------------------------------------------------------------------
# the layer: training, eval, frozen, the reducer seam, saving


def _pair(backend, c, axis, dtype=np.float64, **kw):
    fused = bn.BatchNorm(c, axis=axis, dtype=dtype, backend=backend, activation="relu", **kw)
    plain = bn.BatchNorm(c, axis=axis, dtype=dtype, backend=backend, **kw)
    for layer in (fused, plain):
        layer.gamma[:] = np.linspace(0.5, 1.5, c)
        layer.beta[:] = np.linspace(-0.5, 0.5, c)
    return fused, plain


@pytest.mark.parametrize("shape,axis", [((32, 6), 1), ((4, 6, 5, 5), 1), ((4, 5, 5, 6), -1)])
def test_layer_equals_batchnorm_then_relu_in_every_mode(backend, shape, axis):
    fused, plain = _pair(backend, shape[axis], axis)
    relu = ReLU()
    rng = np.random.default_rng(seed_of(shape))
    for mode in ("train", "train", "eval", "frozen"):
        if mode == "eval":
            fused.eval()
            plain.eval()
        elif mode == "frozen":
            fused.train().freeze()
            plain.train().freeze()
        x = rng.normal(1.0, 2.0, shape)
        dy = rng.standard_normal(shape)
        y = fused.forward(x)
        y_ref = relu.forward(plain.forward(x))
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        dx = fused.backward(dy)
        dx_ref = plain.backward(relu.backward(dy))
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
        if mode == "frozen":  # no trainable gamma/beta: no parameter gradients
            assert fused.dgamma is None and plain.dgamma is None
        else:
            np.testing.assert_allclose(fused.dgamma, plain.dgamma, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(fused.dbeta, plain.dbeta, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(fused.running_mean, plain.running_mean)
        np.testing.assert_array_equal(fused.running_var, plain.running_var)


class _PairReducer(LocalReducer):
    """Statistics and gradient sums over this batch and a fixed other one (two "processes")."""

    local = False

    def __init__(self, other_x3, other_dy3):
        self.other_x3, self.other_dy3, self.center = other_x3, other_dy3, None

    def moments(self, backend, x3, *, check_finite, shape):
        both = np.concatenate([x3, self.other_x3], axis=0)
        mean, var = backend.moments(both)
        return both.shape[0] * both.shape[2], mean, var

    def grad_sums(self, sum_dy, sum_dy_xc):
        from batchnorm.backends import get_backend

        o_dy, o_xc = get_backend("numpy").grad_sums(self.other_dy3, self.other_x3, self.center)
        return sum_dy + o_dy, sum_dy_xc + o_xc


@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((4, 3, 5), 1), ((4, 5, 3), -1)])
def test_fused_activation_through_a_reducer_that_communicates(backend, shape, axis, rng):
    # What SyncBatchNorm does: the mask is applied to each process's dy before the sums are
    # reduced, so the other process contributes its masked dy.
    x = rng.standard_normal(shape) * 3 + 1
    other = rng.standard_normal(shape) * 2 - 1
    dy, dy_other = rng.standard_normal(shape), rng.standard_normal(shape)
    full = bn.BatchNorm(shape[axis], axis=axis, dtype=np.float64, backend=backend,
                        activation="relu")
    y_full = full.forward(np.concatenate([x, other]))
    dx_full = full.backward(np.concatenate([dy, dy_other]))
    ax = axis % len(shape)
    n = shape[0]
    masked_other = dy_other * (y_full[n:] > 0)
    reducer = _PairReducer(F.as_3d(other, ax, other.dtype), F.as_3d(masked_other, ax,
                                                                     other.dtype))
    half = bn.BatchNorm(shape[axis], axis=axis, dtype=np.float64, backend=backend,
                        reducer=reducer, activation="relu")
    y = half.forward(x)
    reducer.center = half._cache.center
    dx = half.backward(dy)
    np.testing.assert_allclose(y, y_full[:n], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_full[:n], rtol=1e-10, atol=1e-12)


def test_activation_is_saved_and_loaded_and_shown(tmp_path):
    layer = bn.BatchNorm(3, activation="relu")
    assert "activation='relu'" in repr(layer)
    layer.save(tmp_path / "l.npz")
    assert bn.load(tmp_path / "l.npz").activation == "relu"
    bn.BatchNorm(3).save(tmp_path / "p.npz")
    assert bn.load(tmp_path / "p.npz").activation is None


def test_syncbatchnorm_takes_the_activation_and_converting_keeps_it():
    pytest.importorskip("mpi4py")
    from batchnorm.distributed import SyncBatchNorm, convert_sync_batchnorm

    layer = SyncBatchNorm(4, activation="relu", reuse_outputs=True)
    assert layer.activation == "relu" and layer.reuse_outputs
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    ref = bn.BatchNorm(4, activation="relu")
    np.testing.assert_allclose(layer.forward(x), ref.forward(x), rtol=1e-6, atol=1e-6)
    conv = convert_sync_batchnorm(bn.BatchNorm(4, activation="relu"))
    assert isinstance(conv, SyncBatchNorm) and conv.activation == "relu"


# ---------------------------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("shape,axis", LAYOUTS[:3] + LAYOUTS[4:5])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_out_receives_y_and_dx(backend, shape, axis, activation):
    x, dy, g, b = _data(shape, axis, np.float32)
    y_ref, c_ref = bn.batch_norm_train(x, g, b, axis=axis, backend=backend,
                                       activation=activation)
    dx_ref = bn.batch_norm_backward(dy, c_ref)[0]
    out_y = np.full(shape, np.nan, np.float32)
    out_dx = np.full(shape, np.nan, np.float32)
    y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=backend,
                                   activation=activation, out=out_y)
    assert y is out_y
    dx = bn.batch_norm_backward(dy, cache, out=out_dx)[0]
    assert dx is out_dx
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    c = shape[axis]
    out_i = np.empty_like(x)
    yi = bn.batch_norm_inference(x, g, b, np.zeros(c), np.ones(c), axis=axis, backend=backend,
                                 activation=activation, out=out_i)
    assert yi is out_i
    np.testing.assert_array_equal(
        yi, bn.batch_norm_inference(x, g, b, np.zeros(c), np.ones(c), axis=axis,
                                    backend=backend, activation=activation))


def test_out_of_float16_input(backend):
    x, dy, g, b = _data((32, 4), 1, np.float16)
    out = np.empty_like(x)
    y, cache = bn.batch_norm_train(x, g, b, backend=backend, out=out)
    assert y is out
    np.testing.assert_array_equal(y, bn.batch_norm_train(x, g, b, backend=backend)[0])
    dx = bn.batch_norm_backward(dy, cache, out=np.empty_like(x))[0]
    np.testing.assert_array_equal(dx, bn.batch_norm_backward(dy, cache)[0])


def test_bad_out_is_rejected_with_what_was_expected():
    x = np.random.default_rng(0).standard_normal((8, 4))
    dy = np.ones_like(x)
    cases = [
        ([0.0] * 32, TypeError, "expected out to be an ndarray for y, got list"),
        (np.empty((8, 5)), ValueError, r"expected out of shape \(8, 4\) for y, got \(8, 5\)"),
        (np.empty((8, 4), np.float32), TypeError, "expected out of dtype float64 for y"),
        (np.empty((4, 8)).T, ValueError, "expected a C-contiguous out for y"),
        (x, ValueError, "expected out for y to share no memory with x"),
    ]
    ro = np.empty((8, 4))
    ro.flags.writeable = False
    cases.append((ro, ValueError, "expected a writeable out for y"))
    for out, err, match in cases:
        with pytest.raises(err, match=match):
            bn.batch_norm_train(x, None, None, out=out)
        with pytest.raises(err, match=match):
            bn.batch_norm_inference(x, None, None, np.zeros(4), np.ones(4), out=out)
    y, cache = bn.batch_norm_train(x, None, None, activation="relu")
    for out, what in ((dy, "dy"), (y, "the forward output")):
        with pytest.raises(ValueError, match=f"expected out for dx to share no memory with "
                                             f"{what}"):
            bn.batch_norm_backward(dy, cache, out=out)
    # The cache owns a copy of x, so dx may go into x itself.
    want = bn.batch_norm_backward(dy, cache)[0]
    x_buf = x.copy()
    _, cache = bn.batch_norm_train(x_buf, None, None, activation="relu")
    np.testing.assert_array_equal(bn.batch_norm_backward(dy, cache, out=x_buf)[0], want)
    # a view that overlaps x only in part
    big = np.zeros((16, 4))
    with pytest.raises(ValueError, match="share no memory with x"):
        bn.batch_norm_train(big[:8], None, None, out=big[4:12])
    # no overlap: fine
    np.testing.assert_array_equal(bn.batch_norm_train(big[:8], None, None, out=big[8:])[0],
                                  bn.batch_norm_train(big[:8], None, None)[0])


# ---------------------------------------------------------------------------------------------
# reuse_outputs


@pytest.mark.parametrize("activation", [None, "relu"])
def test_reuse_outputs_writes_into_the_same_arrays(backend, activation):
    rng = np.random.default_rng(3)
    reuse = bn.BatchNorm(6, backend=backend, activation=activation, reuse_outputs=True)
    fresh = bn.BatchNorm(6, backend=backend, activation=activation)
    ys, dxs = [], []
    for _ in range(3):
        x = rng.standard_normal((40, 6, 3, 3)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        y, y_ref = reuse.forward(x), fresh.forward(x)
        np.testing.assert_array_equal(y, y_ref)
        dx, dx_ref = reuse.backward(dy), fresh.backward(dy)
        np.testing.assert_array_equal(dx, dx_ref)
        ys.append(y)
        dxs.append(dx)
    assert ys[0] is ys[1] is ys[2] and dxs[0] is dxs[1] is dxs[2]
    assert ys[0] is not dxs[0]
    # off by default: new arrays per call
    assert fresh.forward(x) is not fresh.forward(x)
    # a new shape gets a new array
    assert reuse.forward(x[:5]) is not ys[0]


def test_reuse_outputs_never_overwrites_its_own_input(backend):
    layer = bn.BatchNorm(4, dtype=np.float64, backend=backend, reuse_outputs=True,
                         activation="relu")
    x = np.random.default_rng(1).standard_normal((16, 4))
    y1 = layer.forward(x).copy()
    y = layer.forward(layer.forward(x))  # its own previous output as input
    ref = bn.BatchNorm(4, dtype=np.float64, backend=backend, activation="relu")
    np.testing.assert_allclose(y, ref.forward(ref.forward(x)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.forward(x), y1, rtol=1e-12)
    with pytest.raises(TypeError, match="reuse_outputs"):
        bn.BatchNorm(4, reuse_outputs="yes")


def test_failed_forward_with_reuse_changes_no_state(backend):
    layer = bn.BatchNorm(3, dtype=np.float64, backend=backend, reuse_outputs=True,
                         activation="relu")
    layer.forward(np.random.default_rng(0).standard_normal((8, 3)))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="expected x.shape"):
        layer.forward(np.ones((8, 4)))
    assert_same_state(before, layer)


# ---------------------------------------------------------------------------------------------
# batchnorm.nn: the builders' option, fuse_activations, folding


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_builders_fuse_batchnorm_and_relu(backend, kind):
    from batchnorm.nn import cnn, mlp

    rng = np.random.default_rng(5)
    if kind == "mlp":
        x = rng.standard_normal((16, 12))

        def build(**kw):
            return mlp(12, 4, (10, 8), batchnorm=True, backend=backend, **kw)
    else:
        x = rng.standard_normal((6, 2, 8, 8))

        def build(**kw):
            return cnn((2, 8, 8), 4, channels=(3, 5), hidden=(7,), batchnorm=True,
                       backend=backend, **kw)

    fused, plain = build(fuse_activation=True), build()
    n_bn = sum(isinstance(layer, bn.BatchNorm) for layer in plain.layers)
    assert len(fused.layers) == len(plain.layers) - n_bn
    assert all(layer.activation == "relu" for layer in fused.layers
               if isinstance(layer, bn.BatchNorm))
    dy = rng.standard_normal((x.shape[0], 4))
    np.testing.assert_allclose(fused.forward(x), plain.forward(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fused.backward(dy), plain.backward(dy), rtol=1e-10, atol=1e-12)
    for a, b in zip(fused.grads.values(), plain.grads.values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # folding for deployment keeps the ReLU as its own layer
    from batchnorm.nn import fold_batchnorm

    fused.eval()
    plain.eval()
    folded = fold_batchnorm(fused)
    assert not any(isinstance(layer, bn.BatchNorm) for layer in folded.layers)
    np.testing.assert_allclose(folded.forward(x), plain.forward(x), rtol=1e-9, atol=1e-10)


def test_fuse_activations_only_fuses_batchnorm_then_relu():
    from batchnorm.nn import Linear, ReLU, Sequential, Sigmoid, fuse_activations, mlp

    done = bn.BatchNorm(3, activation="relu")
    layers = [Linear(4, 3), bn.BatchNorm(3), Sigmoid(), Linear(3, 3), ReLU(), done, ReLU(),
              Sequential([bn.BatchNorm(3), ReLU()])]
    net = fuse_activations(Sequential(layers))
    kinds = [type(layer).__name__ for layer in net.layers]
    # BatchNorm -> Sigmoid stays; a lone ReLU stays; a second ReLU after a fused layer stays
    assert kinds == ["Linear", "BatchNorm", "Sigmoid", "Linear", "ReLU", "BatchNorm", "ReLU",
                     "Sequential"]
    assert net.layers[1].activation is None and net.layers[5] is done
    assert [type(layer).__name__ for layer in net.layers[7].layers] == ["BatchNorm"]
    with pytest.raises(TypeError, match="expected fuse_activation to be a bool, got 'yes'"):
        mlp(4, 2, (3,), batchnorm=True, fuse_activation="yes")
    # group norm: nothing to fuse
    g = mlp(4, 2, (4,), norm="group", groups=2, fuse_activation=True)
    assert any(type(layer).__name__ == "ReLU" for layer in g.layers)


# ---------------------------------------------------------------------------------------------
# batchnorm bench: the fused and reuse rows (a smoke run; no timing is asserted)


def test_bench_reports_fused_and_reuse_rows(capsys):
    pytest.importorskip("numba")
    import json

    from batchnorm.apps import bench

    rc = bench.main(["--cases", "small,layer", "--modes", "train,relu",
                     "--impls", "numpy,numba,numba-reuse,numba-unfused", "--repeat", "2",
                     "--no-first-call", "--no-progress", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    rows = {(r["case"], r["mode"]): r for r in d["results"]}
    # relu mode only for the kernel cases; the unfused implementation only in relu mode
    assert set(rows) == {("small", "train"), ("small", "relu"), ("layer", "train")}
    assert set(rows["small", "relu"]["median_ms"]) == {"numpy", "numba", "numba-reuse",
                                                       "numba-unfused"}
    assert set(rows["small", "train"]["median_ms"]) == {"numpy", "numba", "numba-reuse"}
    assert rows["small", "relu"]["speedup_fused"] > 0
    assert rows["small", "relu"]["bytes"] == 10 * 32 * 128 * 4
    assert rows["small", "train"]["speedup_fused"] is None
    assert "BN+ReLU" in bench.table(d["results"], d["copy_gbs"])
