"""The toolkit: finite-difference gradients of every layer, shapes, optimisers, containers."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm import BatchNorm
from batchnorm.gradcheck import check_layer, numerical_gradient
from batchnorm.nn import (
    SGD,
    Adam,
    Conv2d,
    Flatten,
    Linear,
    MaxPool2d,
    Momentum,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    cnn,
    col2im,
    im2col,
    init_std,
    mlp,
    softmax,
)

TOL = 1e-7


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def assert_grads_ok(layer, x, tol=TOL):
    res = check_layer(layer, x)
    assert res.errors, "nothing was checked"
    assert res.passed(tol), res.errors
    return res


# --- finite-difference checks, float64 --------------------------------------------------------


def test_linear_gradients(rng):
    res = assert_grads_ok(Linear(5, 3, rng=rng), rng.standard_normal((4, 5)))
    assert set(res.errors) == {"dx", "dW", "db"}


def test_linear_without_bias_gradients(rng):
    layer = Linear(5, 3, rng=rng, bias=False)
    assert set(layer.params) == {"W"}
    assert_grads_ok(layer, rng.standard_normal((4, 5)))


def test_relu_gradients(rng):
    x = np.sign(rng.standard_normal((4, 6))) * (0.1 + rng.random((4, 6)))
    assert_grads_ok(ReLU(), x)


def test_sigmoid_gradients_and_no_overflow(rng):
    assert_grads_ok(Sigmoid(), 3 * rng.standard_normal((4, 6)))
    y = Sigmoid()(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(y, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 1, 0), (2, 2, 0), (3, 2, 1)])
def test_conv2d_gradients(rng, k, stride, pad):
    layer = Conv2d(2, 3, k, stride=stride, pad=pad, rng=rng)
    res = assert_grads_ok(layer, rng.standard_normal((2, 2, 5, 6)))
    assert set(res.errors) == {"dx", "dW", "db"}


@pytest.mark.parametrize("k,stride", [(2, None), (3, 1), (2, 1)])
def test_maxpool_gradients(rng, k, stride):
    # Distinct values 0.1 apart: the maximum of a window cannot change under the FD step.
    x = 0.1 * rng.permutation(2 * 2 * 5 * 4).reshape(2, 2, 5, 4).astype(np.float64)
    assert_grads_ok(MaxPool2d(k, stride), x)


def test_flatten_gradients_and_shape(rng):
    x = rng.standard_normal((3, 2, 4, 5))
    layer = Flatten()
    assert layer(x).shape == (3, 40)
    assert_grads_ok(layer, x)


def test_softmax_cross_entropy_gradient(rng):
    logits = rng.standard_normal((6, 4)) * 3
    labels = rng.integers(0, 4, 6)
    fn = SoftmaxCrossEntropy()
    fn(logits, labels)
    analytic = fn.backward()
    numeric = numerical_gradient(lambda: fn(logits, labels), logits)
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-9)
    # The data-parallel scaling multiplies the gradient.
    fn(logits, labels)
    np.testing.assert_allclose(fn.backward(0.25), 0.25 * analytic, rtol=1e-15)


def test_softmax_cross_entropy_value_and_stability():
    fn = SoftmaxCrossEntropy()
    logits = np.array([[1000.0, 0.0], [0.0, 0.0]])
    loss = fn(logits, np.array([0, 1]))
    assert np.isfinite(loss)
    assert loss == pytest.approx(np.log(2) / 2)
    np.testing.assert_allclose(softmax(logits).sum(axis=1), 1.0)


def test_softmax_cross_entropy_sum_reduction(rng):
    logits = rng.standard_normal((5, 3)) * 2
    labels = rng.integers(0, 3, 5)
    mean_fn, sum_fn = SoftmaxCrossEntropy(), SoftmaxCrossEntropy(reduction="sum")
    assert sum_fn(logits, labels) == pytest.approx(5 * mean_fn(logits, labels), rel=1e-14)
    analytic = sum_fn.backward()
    np.testing.assert_allclose(analytic, 5 * mean_fn.backward(), rtol=1e-14)
    numeric = numerical_gradient(lambda: sum_fn(logits, labels), logits)
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-8)


def test_softmax_cross_entropy_sum_of_an_empty_batch_is_zero():
    # What a data-parallel process with an empty shard computes (GlobalMeanLoss).
    fn = SoftmaxCrossEntropy(reduction="sum")
    assert fn(np.zeros((0, 4)), np.zeros(0, dtype=np.int64)) == 0.0
    d = fn.backward(0.5)
    assert d.shape == (0, 4)


def test_softmax_cross_entropy_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="expected reduction 'mean' or 'sum', got 'none'"):
        SoftmaxCrossEntropy(reduction="none")


def test_softmax_cross_entropy_rejects_bad_labels():
    fn = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match="labels in"):
        fn(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match="integer labels"):
        fn(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="before forward"):
        SoftmaxCrossEntropy().backward()


def test_mlp_with_batchnorm_gradients(rng):
    net = mlp(6, 3, (5, 4), batchnorm=True, rng=rng, backend="numpy")
    res = assert_grads_ok(net, rng.standard_normal((7, 6)))
    assert "d1.gamma" in res.errors and "d0.W" in res.errors


def test_cnn_with_batchnorm_gradients(rng):
    net = cnn((1, 4, 4), 3, channels=(2,), hidden=(4,), batchnorm=True, rng=rng,
              backend="numpy")
    bn = net[1]
    assert isinstance(bn, BatchNorm) and bn.axis == 1 and bn.num_features == 2
    assert_grads_ok(net, rng.standard_normal((3, 1, 4, 4)))


def test_mlp_with_batchnorm_eval_mode_gradients(rng):
    net = mlp(6, 3, (5,), batchnorm=True, rng=rng, backend="numpy")
    net(rng.standard_normal((8, 6)))  # some running statistics
    assert_grads_ok(net.eval(), rng.standard_normal((4, 6)))


# --- im2col -------------------------------------------------------------------------------------


def test_conv2d_matches_direct_convolution(rng):
    x = rng.standard_normal((2, 3, 6, 5))
    layer = Conv2d(3, 4, 3, stride=2, pad=1, rng=rng)
    layer.b[:] = rng.standard_normal(4)
    y = layer(x)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho, wo = (6 + 2 - 3) // 2 + 1, (5 + 2 - 3) // 2 + 1
    assert y.shape == (2, 4, ho, wo)
    ref = np.zeros_like(y)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
            ref[:, :, i, j] = np.einsum("nchw,fchw->nf", patch, layer.W) + layer.b
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_col2im_is_the_adjoint_of_im2col(rng):
    # <im2col(x), c> == <x, col2im(c)> for every x and c.
    x = rng.standard_normal((2, 3, 5, 4))
    cols = im2col(x, 3, 2, stride=2, pad=1)
    c = rng.standard_normal(cols.shape)
    lhs = np.sum(cols * c)
    rhs = np.sum(x * col2im(c, x.shape, 3, 2, stride=2, pad=1))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_maxpool_values(rng):
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(MaxPool2d(2)(x)[0, 0], [[5, 7], [13, 15]])


# --- protocol, container, optimisers -----------------------------------------------------------


def test_sequential_names_and_shares_arrays(rng):
    net = mlp(4, 2, (3,), batchnorm=True, rng=rng)
    assert list(net.params) == ["0.W", "0.b", "1.gamma", "1.beta", "3.W", "3.b"]
    assert net.params["0.W"] is net[0].W
    net.train()
    net.backward(np.ones_like(net(rng.standard_normal((5, 4)))))
    assert list(net.grads) == list(net.params)
    assert all(g.shape == net.params[k].shape for k, g in net.grads.items())


def test_train_eval_reach_batchnorm(rng):
    net = mlp(4, 2, (3,), batchnorm=True, rng=rng)
    assert net.eval() is net
    assert not net[1].training
    net.train()
    assert net[1].training


def test_predict_restores_mode(rng):
    net = mlp(4, 3, (3,), batchnorm=True, rng=rng)
    net(rng.standard_normal((6, 4)))
    pred = net.predict(rng.standard_normal((5, 4)))
    assert pred.shape == (5,) and net.training and net[1].training


def test_same_rng_state_gives_same_weights_with_and_without_bn():
    a = mlp(4, 2, (3, 3), batchnorm=True, rng=np.random.default_rng(7), weight_init=0.01)
    b = mlp(4, 2, (3, 3), batchnorm=False, rng=np.random.default_rng(7), weight_init=0.01)
    wa = [v for k, v in a.params.items() if k.endswith("W")]
    wb = [v for k, v in b.params.items() if k.endswith("W")]
    assert len(wa) == len(wb) == 3
    for u, v in zip(wa, wb, strict=True):
        np.testing.assert_array_equal(u, v)
    assert np.std(wa[0]) < 0.05


def test_init_std():
    assert init_std("he", 50) == pytest.approx(0.2)
    assert init_std("xavier", 25) == pytest.approx(0.2)
    assert init_std(1e-3, 50) == 1e-3
    with pytest.raises(ValueError):
        init_std("bogus", 3)
    with pytest.raises(ValueError):
        init_std(0.0, 3)


def test_layer_errors(rng):
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        Linear(5, 3)(np.zeros((2, 4)))
    with pytest.raises(RuntimeError, match="before forward"):
        Linear(5, 3).backward(np.zeros((2, 3)))
    layer = Linear(5, 3)
    layer(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="dy of shape"):
        layer.backward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="does not fit"):
        Conv2d(1, 1, 5)(np.zeros((1, 1, 3, 3)))
    with pytest.raises(ValueError, match="too small"):
        cnn((1, 2, 2), channels=(2, 2))


def _quadratic_problem():
    target = np.array([1.0, -2.0, 3.0])
    p = {"w": np.zeros(3)}
    return target, p


@pytest.mark.parametrize("make", [
    lambda p: SGD(p, lr=0.1),
    lambda p: Momentum(p, lr=0.05, momentum=0.9),
    lambda p: Adam(p, lr=0.1),
])
def test_optimisers_minimise_a_quadratic(make):
    target, p = _quadratic_problem()
    w = p["w"]
    opt = make(p)
    for _ in range(500):
        opt.step({"w": w - target})  # gradient of |w - target|^2 / 2
    assert p["w"] is w  # updated in place
    np.testing.assert_allclose(w, target, atol=1e-3)


def test_optimiser_first_steps():
    p = {"w": np.array([1.0])}
    SGD(p, lr=0.5).step({"w": np.array([2.0])})
    assert p["w"][0] == 0.0
    p = {"w": np.array([0.0])}
    m = Momentum(p, lr=1.0, momentum=0.5)
    m.step({"w": np.array([1.0])})
    m.step({"w": np.array([1.0])})
    assert p["w"][0] == pytest.approx(-1.0 - 1.5)
    p = {"w": np.array([0.0])}
    Adam(p, lr=0.1).step({"w": np.array([123.0])})
    assert p["w"][0] == pytest.approx(-0.1, rel=1e-6)  # bias-corrected first step is lr * sign


def test_optimiser_needs_gradients():
    with pytest.raises(ValueError, match="no gradient"):
        SGD({"w": np.zeros(2)}, lr=0.1).step({"w": None})
    with pytest.raises(ValueError, match="learning rate"):
        SGD({"w": np.zeros(2)}, lr=0.0)


def test_training_a_tiny_network_lowers_the_loss(rng):
    x = rng.standard_normal((64, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    net = Sequential([Linear(4, 8, rng=rng), BatchNorm(8, dtype=np.float64), ReLU(),
                      Linear(8, 2, rng=rng)])
    loss_fn, opt = SoftmaxCrossEntropy(), SGD(net.params, lr=0.2)
    first = loss_fn(net(x), y)
    for _ in range(100):
        loss_fn(net(x), y)
        net.backward(loss_fn.backward())
        opt.step(net.grads)
    assert loss_fn(net(x), y) < 0.5 * first
    assert np.mean(net.predict(x) == y) > 0.9
