"""GroupNorm and LayerNorm layers (against torch.nn), and the toolkit builders' norm= option."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm import BatchNorm, GroupNorm, LayerNorm
from batchnorm.gradcheck import check_layer
from batchnorm.nn import cnn, mlp
from helpers import assert_same_state, snapshot

FD_TOL = 1e-7


def _state(layer):
    """Snapshot of everything but the cache, and the cache object itself (a failed call must
    keep the very same one)."""
    return {k: v for k, v in snapshot(layer).items() if k != "_cache"}, layer._cache


def _assert_same(before, layer):
    state, cache = before
    assert layer._cache is cache
    saved = layer._cache
    try:
        layer._cache = None
        state = {**state, "_cache": None}
        assert_same_state(state, layer)
    finally:
        layer._cache = saved


def _randomize(layer, rng):
    for p in layer.params.values():
        p[...] = rng.standard_normal(p.shape)


# --- PyTorch oracle ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,groups,axis", [
    ((6, 8), 4, 1), ((4, 6, 9), 3, 1), ((3, 8, 5, 4), 2, 1), ((3, 5, 4, 8), 8, -1),
    ((2, 4, 3, 3, 3), 1, 1),
])
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_layer_matches_torch(shape, groups, axis, affine, backend, rng):
    torch = pytest.importorskip("torch")
    c = shape[axis]
    layer = GroupNorm(groups, c, affine=affine, axis=axis, dtype=np.float64, backend=backend)
    ref = torch.nn.GroupNorm(groups, c, eps=1e-5, affine=affine).double()
    if affine:
        _randomize(layer, rng)
        with torch.no_grad():
            ref.weight.copy_(torch.tensor(layer.gamma))
            ref.bias.copy_(torch.tensor(layer.beta))
    x = rng.standard_normal(shape) * 2 + 5
    dy = rng.standard_normal(shape)
    xt = torch.tensor(np.moveaxis(x, axis, 1).copy(), requires_grad=True)
    yt = ref(xt)
    yt.backward(torch.tensor(np.moveaxis(dy, axis, 1).copy()))
    y = layer(x)
    dx = layer.backward(dy)
    np.testing.assert_allclose(np.moveaxis(y, axis, 1), yt.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(np.moveaxis(dx, axis, 1), xt.grad.numpy(), atol=1e-10)
    if affine:
        np.testing.assert_allclose(layer.dgamma, ref.weight.grad.numpy(), atol=1e-9)
        np.testing.assert_allclose(layer.dbeta, ref.bias.grad.numpy(), atol=1e-9)
    else:
        assert layer.params == {} and layer.grads == {} and layer.dgamma is None


@pytest.mark.parametrize("shape,ns", [((6, 8), 8), ((4, 6, 9), (6, 9)), ((2, 3, 4, 5), (4, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_layer_matches_torch(shape, ns, affine, backend, rng):
    torch = pytest.importorskip("torch")
    layer = LayerNorm(ns, elementwise_affine=affine, dtype=np.float64, backend=backend)
    ref = torch.nn.LayerNorm(ns, eps=1e-5, elementwise_affine=affine).double()
    if affine:
        _randomize(layer, rng)
        with torch.no_grad():
            ref.weight.copy_(torch.tensor(layer.gamma))
            ref.bias.copy_(torch.tensor(layer.beta))
    x = rng.standard_normal(shape) - 4
    dy = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer(x), yt.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), atol=1e-10)
    if affine:
        assert layer.gamma.shape == layer.dgamma.shape == tuple(ref.weight.shape)
        np.testing.assert_allclose(layer.dgamma, ref.weight.grad.numpy(), atol=1e-9)
        np.testing.assert_allclose(layer.dbeta, ref.bias.grad.numpy(), atol=1e-9)


# --- finite differences -----------------------------------------------------------------------


@pytest.mark.parametrize("make,shape", [
    (lambda be: GroupNorm(2, 4, dtype=np.float64, backend=be), (3, 4, 5)),
    (lambda be: GroupNorm(3, 3, axis=-1, dtype=np.float64, backend=be), (2, 4, 3)),
    (lambda be: GroupNorm(1, 4, affine=False, dtype=np.float64, backend=be), (2, 4, 2, 2)),
    (lambda be: LayerNorm((3, 4), dtype=np.float64, backend=be), (2, 3, 4)),
    (lambda be: LayerNorm(5, elementwise_affine=False, dtype=np.float64, backend=be), (3, 5)),
])
def test_layer_gradients_finite_differences(make, shape, backend, rng):
    layer = make(backend)
    _randomize(layer, rng)
    res = check_layer(layer, rng.standard_normal(shape))
    assert set(res.errors) == {"dx"} | {"d" + k for k in layer.params}
    assert res.passed(FD_TOL), res.errors


# --- layer behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: GroupNorm(2, 4), lambda: LayerNorm((4, 3))])
def test_train_and_eval_compute_the_same(make, rng):
    layer = make()
    _randomize(layer, rng)
    x = rng.standard_normal((5, 4, 3)).astype(np.float32)
    y_train = layer(x)
    assert layer.eval() is layer and not layer.training
    np.testing.assert_array_equal(layer(x), y_train)
    assert layer.train() is layer and layer.training


def test_float32_params_with_float64_input(rng):
    layer = GroupNorm(2, 4)  # float32 parameters
    x = rng.standard_normal((3, 4, 5))
    y = layer(x)
    assert y.dtype == np.float64
    layer.backward(np.ones_like(x))
    assert layer.dgamma.dtype == layer.dbeta.dtype == np.float32
    assert set(layer.grads) == {"gamma", "beta"}
    assert layer.params["gamma"] is layer.gamma


def test_params_are_updated_in_place_by_optimisers(rng):
    layer = LayerNorm(4, dtype=np.float64)
    x = rng.standard_normal((3, 4))
    y0 = layer(x)
    layer.params["beta"] += 1.0
    np.testing.assert_allclose(layer(x), y0 + 1.0)


def test_repr_and_attributes():
    gn = GroupNorm(2, 6, eps=1e-3, affine=False, axis=-1, dtype=np.float64, backend="numpy")
    assert repr(gn) == ("GroupNorm(2, 6, eps=0.001, affine=False, axis=-1, dtype=float64, "
                        "backend='numpy')")
    assert (gn.num_groups, gn.num_channels, gn.gamma, gn.beta) == (2, 6, None, None)
    ln = LayerNorm([3, 4], backend="numpy")
    assert ln.normalized_shape == (3, 4) and ln.gamma.shape == (3, 4)
    assert repr(ln) == ("LayerNorm((3, 4), eps=1e-05, elementwise_affine=True, dtype=float32, "
                        "backend='numpy')")


def test_state_dict_round_trip(rng):
    a = LayerNorm((2, 3), dtype=np.float64)
    _randomize(a, rng)
    state = a.state_dict()
    assert set(state) == {"gamma", "beta"} and state["gamma"] is not a.gamma
    b = LayerNorm((2, 3), dtype=np.float32)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.gamma, a.gamma.astype(np.float32))
    np.testing.assert_array_equal(b.beta, a.beta.astype(np.float32))
    assert b.gamma.dtype == np.float32
    assert GroupNorm(1, 2, affine=False).state_dict() == {}
    b.reset_parameters()
    np.testing.assert_array_equal(b.gamma, 1)
    np.testing.assert_array_equal(b.beta, 0)


@pytest.mark.parametrize("state,exc,match", [
    ({"gamma": np.ones(4)}, KeyError, "missing"),
    ({"gamma": np.ones(4), "beta": np.ones(4), "x": np.ones(4)}, KeyError, "unexpected"),
    ({"gamma": np.ones(3), "beta": np.ones(4)}, ValueError, r"gamma of shape \(4,\)"),
    ({"gamma": np.ones(4, dtype=np.int64), "beta": np.ones(4)}, TypeError, "float dtype"),
    ({"gamma": np.ones(4), "beta": np.full(4, np.nan)}, ValueError, "finite beta"),
    ({"gamma": np.full(4, 1e300), "beta": np.ones(4)}, ValueError, "fits float32"),
])
def test_load_state_dict_errors_change_nothing(state, exc, match, rng):
    layer = GroupNorm(2, 4)
    _randomize(layer, rng)
    before = _state(layer)
    with pytest.raises(exc, match=match):
        layer.load_state_dict(state)
    _assert_same(before, layer)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((3, 4), {}, ValueError, "divide num_channels"),
    ((0, 4), {}, ValueError, "num_groups >= 1"),
    ((2, 0), {}, ValueError, "num_channels >= 1"),
    ((2.0, 4), {}, TypeError, "num_groups to be an int"),
    ((2, True), {}, TypeError, "num_channels to be an int"),
    ((2, 4), {"axis": 0}, ValueError, "batch axis"),
    ((2, 4), {"axis": "1"}, TypeError, "axis to be an int"),
    ((2, 4), {"eps": 0}, ValueError, "eps > 0"),
    ((2, 4), {"dtype": np.int32}, TypeError, "dtype of dtype float16"),
    ((2, 4), {"backend": "bogus"}, ValueError, "backend"),
])
def test_groupnorm_constructor_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GroupNorm(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    (((),), {}, ValueError, "at least one dim"),
    (((3, -1),), {}, ValueError, ">= 1"),
    ((2.5,), {}, TypeError, "int or a sequence"),
    ((4,), {"eps": -1e-5}, ValueError, "eps > 0"),
    ((4,), {"dtype": np.complex64}, TypeError, "dtype of dtype float16"),
])
def test_layernorm_constructor_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LayerNorm(*args, **kwargs)


@pytest.mark.parametrize("make,x,exc,match", [
    (lambda: GroupNorm(2, 4), np.zeros((3, 5, 2)), ValueError, r"x.shape\[1\] == num_channels"),
    (lambda: GroupNorm(2, 4, axis=-1), np.zeros((3, 2, 5)), ValueError, "num_channels == 4"),
    (lambda: GroupNorm(2, 4), np.zeros(4), ValueError, "at least 2 dims"),
    (lambda: GroupNorm(2, 4), np.zeros((0, 4)), ValueError, "non-empty"),
    (lambda: GroupNorm(2, 4), np.zeros((3, 4), dtype=np.int64), TypeError, "x of dtype"),
    (lambda: LayerNorm((4, 3)), np.zeros((2, 3, 4)), ValueError, "normalized_shape"),
    (lambda: LayerNorm(4), np.zeros((2, 4), dtype=np.int8), TypeError, "x of dtype"),
])
def test_forward_errors_change_nothing(make, x, exc, match, rng):
    layer = make()
    _randomize(layer, rng)
    if isinstance(layer, LayerNorm):
        good = rng.standard_normal((3, *layer.normalized_shape))
    else:
        good = rng.standard_normal((3, 2, 4) if layer.axis == -1 else (3, 4, 2))
    layer(good)
    layer.backward(np.ones_like(good))
    before = _state(layer)
    with pytest.raises(exc, match=match):
        layer(x)
    _assert_same(before, layer)


def test_replaced_parameters_are_checked(rng):
    layer = GroupNorm(2, 4)
    layer.gamma = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"gamma of shape \(4,\)"):
        layer(rng.standard_normal((2, 4)))
    assert layer._cache is None


def test_backward_errors_change_nothing(rng):
    layer = GroupNorm(2, 4)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((2, 4)))
    x = rng.standard_normal((2, 4, 3))
    layer(x)
    layer.backward(rng.standard_normal(x.shape))
    before = _state(layer)
    with pytest.raises(ValueError, match=r"dy of shape \(2, 4, 3\)"):
        layer.backward(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="dy of dtype"):
        layer.backward(np.zeros((2, 4, 3), dtype=np.int32))
    _assert_same(before, layer)


# --- the toolkit builders ---------------------------------------------------------------------


def test_cnn_norm_choices():
    kw = dict(channels=(4, 8), hidden=(12,), backend="numpy")
    layers = cnn((1, 8, 8), 3, norm="group", groups=2, **kw).layers
    gns = [la for la in layers if isinstance(la, GroupNorm)]
    assert [(g.num_groups, g.num_channels) for g in gns] == [(2, 4), (2, 8), (2, 12)]
    layers = cnn((1, 8, 8), 3, norm="layer", **kw).layers
    lns = [la for la in layers if isinstance(la, LayerNorm)]
    assert [ln.normalized_shape for ln in lns] == [(4, 8, 8), (8, 4, 4), (12,)]
    a = cnn((1, 8, 8), 3, norm="batch", **kw)
    b = cnn((1, 8, 8), 3, batchnorm=True, **kw)
    assert [repr(la) for la in a.layers] == [repr(la) for la in b.layers]
    assert sum(isinstance(la, BatchNorm) for la in a.layers) == 3
    none = cnn((1, 8, 8), 3, norm=None, **kw).layers
    assert not any(isinstance(la, (BatchNorm, GroupNorm, LayerNorm)) for la in none)


def test_norm_callable_gets_the_per_sample_shape():
    seen = []

    def make(shape):
        seen.append(shape)
        return GroupNorm(shape[0], shape[0], dtype=np.float64)  # instance norm

    net = cnn((2, 4, 4), 3, channels=(3,), hidden=(5,), norm=make)
    assert seen == [(3, 4, 4), (5,)]
    assert net(np.random.default_rng(0).standard_normal((2, 2, 4, 4))).shape == (2, 3)


def test_norm_does_not_change_the_weights():
    a = mlp(4, 2, (4, 4), norm="layer", rng=np.random.default_rng(3))
    b = mlp(4, 2, (4, 4), rng=np.random.default_rng(3))
    wa = [v for k, v in a.params.items() if k.endswith("W")]
    wb = [v for k, v in b.params.items() if k.endswith("W")]
    for u, v in zip(wa, wb, strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_cnn_with_group_or_layer_norm_gradients(norm, backend, rng):
    net = cnn((1, 4, 4), 3, channels=(4,), hidden=(4,), norm=norm, groups=2, rng=rng,
              backend=backend)
    res = check_layer(net, rng.standard_normal((2, 1, 4, 4)))
    assert "d1.gamma" in res.errors and "d0.W" in res.errors
    assert res.passed(FD_TOL), res.errors


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(norm="instance"), ValueError, "expected norm 'batch', 'group', 'layer'"),
    (dict(norm="group", batchnorm=True), ValueError, "either batchnorm=True or norm"),
    (dict(norm="group", groups=0), ValueError, "groups to be an int >= 1"),
    (dict(norm="group", groups=3), ValueError, "divide num_channels"),
])
def test_builder_norm_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mlp(4, 2, (4,), **kwargs)
