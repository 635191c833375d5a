"""The layers: gradients, running statistics, modes, state, and errors that change nothing."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from helpers import assert_same_state, numerical_grad, rel_error, seed_of, snapshot

GRAD_TOL = 1e-6
LAYOUTS = [
    ((6, 3), 1),
    ((6, 3), -1),
    ((4, 3, 5), 1),
    ((4, 5, 3), -1),
    ((3, 2, 3, 2), 1),
    ((3, 2, 3, 2), -1),
    ((3, 3, 2, 2), 0),
    ((2, 2, 2, 3, 2), 1),
    ((2, 2, 2, 3, 2), -1),
]


def _train_a_little(layer, rng, shape, steps=3):
    for _ in range(steps):
        layer(rng.normal(1.0, 2.0, shape))


# ---------------------------------------------------------------------------------------------
# BatchNorm: gradients


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-stats"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_batchnorm_gradients(backend, shape, axis, affine, mode, order):
    rng = np.random.default_rng(seed_of((shape, axis, affine, mode, order)))
    c = shape[axis]
    layer = bn.BatchNorm(
        c, axis=axis, affine=affine, dtype=np.float64, backend=backend,
        track_running_stats=(mode != "eval-no-stats"),
    )
    if affine:
        layer.gamma[:] = rng.normal(1, 0.5, c)
        layer.beta[:] = rng.normal(0, 0.5, c)
    _train_a_little(layer, rng, shape)
    if mode != "train":
        layer.eval()
    x = rng.normal(0.5, 2.0, shape)
    if order == "F":
        x = np.asfortranarray(x)
    w = rng.normal(size=shape)

    def loss():
        return float(np.sum(layer(x) * w))

    layer(x)
    dx = layer.backward(w)
    assert dx.shape == shape
    assert rel_error(dx, numerical_grad(loss, x)) < GRAD_TOL
    if affine:
        dgamma, dbeta = layer.dgamma.copy(), layer.dbeta.copy()
        assert rel_error(dgamma, numerical_grad(loss, layer.gamma)) < GRAD_TOL
        assert rel_error(dbeta, numerical_grad(loss, layer.beta)) < GRAD_TOL
        assert layer.grads["gamma"] is layer.dgamma
    else:
        assert layer.dgamma is None and layer.grads == {} and layer.params == {}


def test_eval_backward_is_the_gradient_of_a_fixed_affine_map(backend, rng):
    layer = bn.BatchNorm(3, dtype=np.float64, backend=backend)
    _train_a_little(layer, rng, (8, 3))
    layer.eval()
    x = rng.normal(size=(5, 3))
    dy = rng.normal(size=(5, 3))
    layer(x)
    dx = layer.backward(dy)
    scale = layer.gamma / np.sqrt(layer.running_var + layer.eps)
    np.testing.assert_allclose(dx, dy * scale, rtol=1e-12)
    x_hat = (x - layer.running_mean) / np.sqrt(layer.running_var + layer.eps)
    np.testing.assert_allclose(layer.dgamma, (dy * x_hat).sum(0), rtol=1e-10)
    np.testing.assert_allclose(layer.dbeta, dy.sum(0), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# BatchNorm: running statistics


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("unbiased", [False, True])
def test_running_stats_after_one_and_several_steps(backend, momentum, unbiased):
    rng = np.random.default_rng(3)
    layer = bn.BatchNorm(4, momentum=momentum, unbiased=unbiased, dtype=np.float64,
                         backend=backend)
    rm, rv = np.zeros(4), np.ones(4)
    for step in range(1, 5):
        x = rng.normal(step, step, (7, 4, 3))
        layer(x)
        m = x.mean(axis=(0, 2))
        v = x.var(axis=(0, 2), ddof=1 if unbiased else 0)
        rm = momentum * rm + (1 - momentum) * m
        rv = momentum * rv + (1 - momentum) * v
        np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(layer.running_var, rv, rtol=1e-12)
        assert layer.num_batches_tracked == step


def test_momentum_none_is_the_cumulative_average(backend, rng):
    layer = bn.BatchNorm(2, momentum=None, unbiased=True, dtype=np.float64, backend=backend)
    xs = [rng.normal(i, 1 + i, (10, 2)) for i in range(5)]
    for x in xs:
        layer(x)
    np.testing.assert_allclose(layer.running_mean, np.mean([x.mean(0) for x in xs], 0))
    np.testing.assert_allclose(layer.running_var, np.mean([x.var(0, ddof=1) for x in xs], 0))


def test_eval_mode_uses_and_keeps_running_stats(backend, rng):
    layer = bn.BatchNorm(3, backend=backend)
    _train_a_little(layer, rng, (16, 3, 2))
    before = snapshot(layer)
    assert layer.eval() is layer and not layer.training
    x = rng.normal(size=(4, 3, 2)).astype(np.float32)
    y = layer(x)
    ref = (x - layer.running_mean[:, None]) / np.sqrt(layer.running_var[:, None] + layer.eps)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_array_equal(getattr(layer, k), before[k])
    assert layer.train() is layer and layer.training


def test_eval_accepts_one_value_per_feature(backend):
    layer = bn.BatchNorm(3, backend=backend).eval()
    assert layer(np.ones((1, 3), np.float32)).shape == (1, 3)


def test_without_running_stats_eval_uses_batch_stats(backend, rng):
    layer = bn.BatchNorm(3, track_running_stats=False, dtype=np.float64, backend=backend)
    assert layer.running_mean is None and layer.num_batches_tracked is None
    x = rng.normal(5, 3, (9, 3))
    y_train = layer(x)
    y_eval = layer.eval()(x)
    np.testing.assert_array_equal(y_train, y_eval)
    np.testing.assert_allclose(y_eval.mean(0), 0, atol=1e-12)
    assert "running_mean" not in layer.state_dict()


def test_reset(backend, rng):
    layer = bn.BatchNorm(3, backend=backend)
    _train_a_little(layer, rng, (5, 3))
    layer.gamma += 1
    layer.reset_running_stats()
    assert layer.num_batches_tracked == 0 and (layer.running_var == 1).all()
    assert (layer.running_mean == 0).all() and (layer.gamma == 2).all()
    layer.reset_parameters()
    assert (layer.gamma == 1).all() and (layer.beta == 0).all()


def test_repr_and_defaults():
    layer = bn.BatchNorm(8, backend="numpy")
    r = repr(layer)
    assert r.startswith("BatchNorm(8, axis=1, eps=1e-05, momentum=0.9, affine=True")
    assert "dtype=float32" in r and "backend='numpy'" in r
    assert layer.gamma.dtype == np.float32 and layer.running_var.dtype == np.float32
    assert set(layer.params) == {"gamma", "beta"}


def test_optimizer_updates_params_in_place(backend, rng):
    layer = bn.BatchNorm(3, dtype=np.float64, backend=backend)
    x = rng.normal(size=(8, 3))
    y0 = layer(x)
    layer.backward(np.ones_like(y0))
    for k, p in layer.params.items():
        p -= 0.5 * (layer.grads[k] + 1.0)
    y1 = layer(x)
    np.testing.assert_allclose(y1, y0 * 0.5 + (-0.5 * (np.ones(3) * 8 + 1)), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# BatchNorm: state_dict, save, load


def test_state_dict_round_trip(tmp_path, backend, rng):
    layer = bn.BatchNorm(4, axis=-1, momentum=0.8, unbiased=True, eps=1e-3, dtype=np.float64,
                         backend=backend)
    _train_a_little(layer, rng, (6, 5, 4))
    layer.gamma[:] = rng.normal(size=4)
    sd = layer.state_dict()
    assert set(sd) == {"gamma", "beta", "running_mean", "running_var", "num_batches_tracked"}
    sd["gamma"][:] = 0  # a copy: the layer is not changed through it
    assert not (layer.gamma == 0).any()
    other = bn.BatchNorm(4, axis=-1, dtype=np.float64, backend=backend)
    other.load_state_dict(layer.state_dict())
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(getattr(other, k), v)
    path = tmp_path / "bn.npz"
    layer.save(path)
    loaded = bn.load(path)
    assert repr(loaded).replace(loaded.backend.name, "") == repr(layer).replace(
        layer.backend.name, ""
    )
    x = rng.normal(size=(3, 5, 4))
    np.testing.assert_array_equal(loaded.eval()(x), layer.eval()(x))
    assert loaded.num_batches_tracked == 3


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda d: d.pop("beta"), KeyError, r"missing \['beta'\]"),
        (lambda d: d.update(extra=np.ones(3)), KeyError, r"unexpected \['extra'\]"),
        (lambda d: d.update(gamma=np.ones(4)), ValueError, r"expected gamma of shape \(3,\)"),
        (lambda d: d.update(running_var=np.ones(3, int)), TypeError, r"running_var of a float"),
        (lambda d: d.update(num_batches_tracked=np.array(1.5)), TypeError, r"integer scalar"),
        (lambda d: d.update(gamma=np.full(3, 1e300)), ValueError, r"finite gamma that fits"),
        (lambda d: d.update(beta=np.array([0, np.nan, 0])), ValueError, r"finite beta"),
        (lambda d: d.update(running_var=-np.ones(3)), ValueError, r"running_var >= 0, got min"),
    ],
)
def test_load_state_dict_refuses_and_changes_nothing(change, error, match, rng):
    layer = bn.BatchNorm(3, backend="numpy")
    _train_a_little(layer, rng, (5, 3))
    state = {k: v + 1 for k, v in layer.state_dict().items()}
    change(state)
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        layer.load_state_dict(state)
    assert_same_state(before, layer)


def test_numpy_scalars_in_the_configuration_save(tmp_path):
    layer = bn.BatchNorm(3, momentum=np.float32(0.5), eps=np.float64(1e-3))
    layer.save(tmp_path / "bn.npz")
    loaded = bn.load(tmp_path / "bn.npz")
    assert loaded.momentum == 0.5 and loaded.eps == 1e-3


def test_load_refuses_pickled_object_arrays(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, gamma=np.array([{"a": 1}], dtype=object), config=np.array("{}"))
    with pytest.raises(ValueError, match=r"no 'num_features'"):
        bn.load(path)
    np.savez(path, gamma=np.ones(3))
    with pytest.raises(ValueError, match=r"has no 'config' entry"):
        bn.load(path)


# ---------------------------------------------------------------------------------------------
# BatchNorm: errors leave the layer as it was


def _bad_calls():
    return [
        (lambda m: m(np.ones(3, np.float32)), ValueError, r"at least 2 dims .*got 1-D"),
        (lambda m: m(np.ones((4, 5), np.float32)), ValueError,
         r"expected x.shape\[1\] == num_features == 3, got x of shape \(4, 5\)"),
        (lambda m: m(np.ones((4, 3), np.int64)), TypeError, r"float32 or float64, got int64"),
        (lambda m: m(np.ones((4, 3), np.complex64)), TypeError, r"got complex64"),
        (lambda m: m(np.ones((1, 3), np.float32)), ValueError,
         r"more than 1 value per feature in training, got x of shape \(1, 3\)"),
        (lambda m: m(np.full((4, 3), np.nan, np.float32)), ValueError, r"NaN or Inf in 3 feature"),
        (lambda m: m(np.array([[1, 2, np.inf]] * 4, np.float32)), ValueError,
         r"NaN or Inf in 1 feature\(s\) \[2\]"),
        (lambda m: m.backward(np.ones((5, 3), np.float32)), ValueError,
         r"expected dy of shape \(4, 3\) .*got \(5, 3\)"),
        (lambda m: m.backward(np.ones((4, 3), np.int32)), TypeError, r"expected dy of dtype"),
    ]


@pytest.mark.parametrize("call,error,match", _bad_calls())
def test_bad_calls_raise_and_change_nothing(backend, call, error, match, rng):
    layer = bn.BatchNorm(3, backend=backend)
    _train_a_little(layer, rng, (4, 3))
    layer.backward(np.ones((4, 3), np.float32))
    layer(rng.normal(size=(4, 3)).astype(np.float32))  # a cache for the backward calls
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        call(layer)
    assert_same_state(before, layer)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("gamma", np.full(1, 2.0, np.float32), r"expected gamma of shape \(3,\) \(num_features\), "
         r"got shape \(1,\)"),
        ("beta", np.zeros(5, np.float32), r"expected beta of shape \(3,\)"),
        ("running_mean", np.zeros(200000, np.float32), r"expected running_mean of shape \(3,\)"),
        ("running_var", [1.0, 1.0, 1.0], r"expected running_var of shape \(3,\) .*got list"),
        ("gamma", np.ones(3, np.int32), r"expected gamma of dtype float16, float32 or float64"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_replaced_arrays_of_the_wrong_size_are_refused(backend, name, value, match, training,
                                                       rng):
    layer = bn.BatchNorm(3, backend=backend)
    _train_a_little(layer, rng, (4, 3))
    layer.train(training)
    setattr(layer, name, value)
    before = snapshot(layer)
    with pytest.raises((ValueError, TypeError), match=match):
        layer(rng.normal(size=(4, 3)).astype(np.float32))
    assert_same_state(before, layer)


def test_book_layer_refuses_replaced_arrays_of_the_wrong_size(backend, rng):
    layer, _, _ = _book(rng, 3, backend=backend)
    layer.forward(rng.normal(size=(4, 3)))
    layer.running_var = np.ones(4)
    with pytest.raises(ValueError, match=r"expected running_var with 3 values .*got shape \(4,\)"):
        layer.forward(rng.normal(size=(4, 3)), train_flg=False)
    layer.running_var = np.ones(3)
    layer.beta = np.zeros(2)
    with pytest.raises(ValueError, match=r"expected beta with 3 values"):
        layer.forward(rng.normal(size=(4, 3)))


def test_empty_training_batch_names_the_shape(backend):
    layer = bn.BatchNorm(3, backend=backend)
    with pytest.raises(ValueError, match=r"got x of shape \(0, 3\)"):
        layer(np.ones((0, 3), np.float32))
    layer = bn.BatchNorm(3, track_running_stats=False, backend=backend).eval()
    with pytest.raises(ValueError, match=r"expected a non-empty batch, got x of shape \(0, 3\)"):
        layer(np.ones((0, 3), np.float32))


def test_axis_out_of_range_and_backward_before_forward(rng):
    layer = bn.BatchNorm(3, axis=3)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match=r"backward called before forward"):
        layer.backward(np.ones((4, 3), np.float32))
    assert_same_state(before, layer)
    layer(rng.normal(size=(2, 2, 2, 3)).astype(np.float32))
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"axis 3 is out of range for input with 2 dims"):
        layer(np.ones((4, 3), np.float32))
    assert_same_state(before, layer)
    assert layer.num_batches_tracked == 1


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_features": 0}, ValueError, r"num_features >= 1, got 0"),
        ({"num_features": 2.0}, TypeError, r"num_features to be an int"),
        ({"num_features": 2, "momentum": 1.5}, ValueError, r"momentum in \[0, 1\], got 1.5"),
        ({"num_features": 2, "eps": 0}, ValueError, r"eps > 0"),
        ({"num_features": 2, "dtype": np.int32}, TypeError, r"expected dtype of dtype"),
        ({"num_features": 2, "backend": "gpu"}, ValueError, r"got 'gpu'"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        bn.BatchNorm(**kwargs)


def test_eval_passes_nan_through_elementwise(backend):
    layer = bn.BatchNorm(2, backend=backend).eval()
    x = np.array([[np.nan, 1.0], [2.0, 3.0]], np.float32)
    y = layer(x)
    assert np.isnan(y[0, 0]) and np.isfinite(y[1]).all() and np.isfinite(y[:, 1]).all()


# ---------------------------------------------------------------------------------------------
# BatchNormalization: the book's interface


def _book(rng, size, **kw):
    gamma = rng.normal(1, 0.3, size)
    beta = rng.normal(0, 0.3, size)
    return bn.BatchNormalization(gamma, beta, **kw), gamma, beta


@pytest.mark.parametrize(
    "shape,size",
    [((6, 4), 4), ((4, 3, 5), 3), ((3, 2, 3, 2), 2), ((3, 2, 3, 2), 12), ((2, 2, 2, 2, 3), 2),
     ((5, 2, 2, 2, 3), 24)],
)
@pytest.mark.parametrize("train_flg", [True, False])
def test_book_layer_gradients(backend, shape, size, train_flg):
    rng = np.random.default_rng(seed_of((shape, size, train_flg)))
    layer, gamma, beta = _book(rng, size, backend=backend)
    for _ in range(2):
        layer.forward(rng.normal(1, 2, shape))
    x = rng.normal(0.5, 2, shape)
    w = rng.normal(size=shape)

    def loss():
        return float(np.sum(layer.forward(x, train_flg) * w))

    layer.forward(x, train_flg)
    dx = layer.backward(w)
    dgamma, dbeta = layer.dgamma.copy(), layer.dbeta.copy()
    assert dgamma.shape == gamma.shape
    assert rel_error(dx, numerical_grad(loss, x)) < GRAD_TOL
    assert rel_error(dgamma, numerical_grad(loss, gamma)) < GRAD_TOL
    assert rel_error(dbeta, numerical_grad(loss, beta)) < GRAD_TOL


def test_book_layer_per_channel_and_per_activation(backend, rng):
    x = rng.normal(2, 3, (6, 2, 3, 3))
    per_channel, _, _ = _book(rng, 2, backend=backend)
    per_channel.gamma[:] = 1
    per_channel.beta[:] = 0
    y = per_channel.forward(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    per_act = bn.BatchNormalization(np.ones(18), np.zeros(18), backend=backend)
    y = per_act.forward(x)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=0), x.var(axis=0) / (x.var(axis=0) + 1e-6), rtol=1e-9)
    assert per_act.running_mean.shape == (18,)
    with pytest.raises(ValueError, match=r"gamma of shape \(5,\) fits neither .*expected 2 or 18"):
        bn.BatchNormalization(np.ones(5), np.zeros(5)).forward(x)


def test_book_layer_shares_gamma_and_beta_with_the_optimiser(backend, rng):
    params = {"gamma1": np.ones(3), "beta1": np.zeros(3)}
    layer = bn.BatchNormalization(params["gamma1"], params["beta1"], backend=backend)
    assert layer.gamma is params["gamma1"] and layer.beta is params["beta1"]
    x = rng.normal(size=(5, 3))
    y0 = layer.forward(x)
    params["gamma1"] -= 0.5  # what the book's SGD does
    params["beta1"] += 1.0
    y1 = layer.forward(x)
    np.testing.assert_allclose(y1, 0.5 * y0 + 1.0, rtol=1e-12)


def test_book_layer_running_stats_start_at_zero_and_one(backend, rng):
    layer, _, _ = _book(rng, 3, momentum=0.9, backend=backend)
    assert layer.running_mean is None
    x = rng.normal(4, 2, (10, 3))
    y = layer.forward(x, train_flg=False)  # inference before training: not x * 1000
    np.testing.assert_allclose(y, layer.gamma * x / np.sqrt(1 + 1e-6) + layer.beta, rtol=1e-12)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    layer.forward(x)
    np.testing.assert_allclose(layer.running_mean, 0.1 * x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * x.var(0), rtol=1e-12)
    assert layer.eps == 1e-6


def test_book_layer_keeps_given_running_stats(backend, rng):
    rm, rv = np.full(3, 2.0), np.full(3, 4.0)
    layer = bn.BatchNormalization(np.ones(3), np.zeros(3), 0.5, rm, rv, backend=backend)
    x = rng.normal(size=(4, 3))
    np.testing.assert_allclose(layer.forward(x, False), (x - 2) / np.sqrt(4 + 1e-6))
    layer.forward(x)
    assert layer.running_mean is rm
    np.testing.assert_allclose(rm, 1 + 0.5 * x.mean(0))


def test_book_layer_one_sample_batch_warns(backend, rng):
    layer, gamma, beta = _book(rng, 3, backend=backend)
    x = rng.normal(size=(1, 3))
    with pytest.warns(UserWarning, match=r"one value per feature"):
        y = layer.forward(x)
    np.testing.assert_allclose(y, beta[None, :])
    np.testing.assert_array_equal(layer.backward(np.ones((1, 3))), 0)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: m.forward(np.ones((4, 5))), ValueError, r"expected x of shape \(N, 3\)"),
        (lambda m: m.forward(np.ones(3)), ValueError, r"2 to 5 dims, got 1-D"),
        (lambda m: m.forward(np.ones((2, 3, 1, 1, 1, 1))), ValueError, r"2 to 5 dims, got 6-D"),
        (lambda m: m.forward(np.ones((4, 3), int)), TypeError, r"float64, got int64"),
        (lambda m: m.forward(np.array([[np.nan, 1, 2]] * 3)), ValueError, r"NaN or Inf"),
        (lambda m: m.backward(np.ones((2, 3))), ValueError, r"expected dout of shape \(4, 3\)"),
    ],
)
def test_book_layer_errors_change_nothing(backend, call, error, match, rng):
    layer, _, _ = _book(rng, 3, backend=backend)
    layer.forward(rng.normal(size=(4, 3)))
    layer.backward(np.ones((4, 3)))
    layer.forward(rng.normal(size=(4, 3)))  # a cache for the backward call
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        call(layer)
    assert_same_state(before, layer)


def test_book_layer_running_stats_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"expected running_var with 2 values .*got \(3,\)"):
        bn.BatchNormalization(np.ones(2), np.zeros(2), 0.9, np.zeros(2), np.ones(3))


def test_book_layer_backward_before_forward():
    layer = bn.BatchNormalization(np.ones(2), np.zeros(2))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"gamma and beta of the same size"):
        bn.BatchNormalization(np.ones(2), np.zeros(3))
