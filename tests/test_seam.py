"""The one orchestration path: the reducer seam, fused kernels equal to the generic path,
frozen layers, and the checks that live in one place."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.backends import Backend, get_backend
from batchnorm.reducers import LOCAL, LocalReducer
from helpers import assert_same_state, numerical_grad, rel_error, snapshot

# ---------------------------------------------------------------------------------------------
# a reducer plugged into BatchNorm: two "processes" in one, through the seam alone


class _PairReducer(LocalReducer):
    """Statistics and gradient sums over this batch and a fixed other batch (what an MPI
    reducer does for two ranks), to test that the seam is the only place that decides."""

    local = False

    def __init__(self, other_x3, other_dy3=None):
        self.other_x3 = other_x3
        self.other_dy3 = other_dy3
        self.center = None

    def moments(self, backend, x3, *, check_finite, shape):
        both = np.concatenate([x3, self.other_x3], axis=0)
        mean, var = backend.moments(both)
        return both.shape[0] * both.shape[2], mean, var

    def grad_sums(self, sum_dy, sum_dy_xc):
        o_dy, o_xc = get_backend("numpy").grad_sums(self.other_dy3, self.other_x3, self.center)
        return sum_dy + o_dy, sum_dy_xc + o_xc


@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((4, 3, 5), 1), ((4, 5, 3), -1)])
def test_a_reducer_alone_turns_batchnorm_into_a_two_process_layer(backend, shape, axis, rng):
    x = rng.standard_normal(shape) * 3 + 1
    other = rng.standard_normal(shape) * 2 - 1
    dy, dy_other = rng.standard_normal(shape), rng.standard_normal(shape)
    full = bn.BatchNorm(shape[axis], axis=axis, dtype=np.float64, backend=backend)
    y_full = full.forward(np.concatenate([x, other]))
    dx_full = full.backward(np.concatenate([dy, dy_other]))

    ax = axis % len(shape)

    def as3(a):
        return F.as_3d(a, ax, a.dtype)

    reducer = _PairReducer(as3(other), as3(dy_other))
    half = bn.BatchNorm(shape[axis], axis=axis, dtype=np.float64, backend=backend,
                        reducer=reducer)
    y = half.forward(x)
    reducer.center = half._cache.center
    dx = half.backward(dy)
    n = shape[0]
    np.testing.assert_allclose(y, y_full[:n], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_full[:n], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(half.running_mean, full.running_mean, rtol=1e-12)
    np.testing.assert_allclose(half.running_var, full.running_var, rtol=1e-12)


def test_syncbatchnorm_overrides_no_private_method_of_batchnorm():
    from batchnorm.distributed import SyncBatchNorm

    own = {k for k in vars(SyncBatchNorm) if k.startswith("_") and not k.startswith("__")}
    assert not own & set(dir(bn.BatchNorm)), own
    assert not {"forward", "backward"} & set(vars(SyncBatchNorm))


def test_eval_mode_and_frozen_layers_never_use_the_reducer(rng):
    class _Refuses(LocalReducer):
        local = False

        def moments(self, *a, **k):
            raise AssertionError("the reducer was asked")

    layer = bn.BatchNorm(3, dtype=np.float64, reducer=_Refuses())
    x = rng.standard_normal((5, 3))
    layer.eval().forward(x)
    layer.train().freeze().forward(x)
    layer.backward(x)
    with pytest.raises(AssertionError, match="the reducer was asked"):
        layer.unfreeze().forward(x)


# ---------------------------------------------------------------------------------------------
# the fused small-input kernels give the generic path's bits


class _Generic(Backend):
    """The numba backend's four primitives without its fused methods."""

    name = "generic"

    def __init__(self):
        nb = get_backend("numba")
        self.moments, self.affine = nb.moments, nb.affine
        self.grad_sums, self.grad_input = nb.grad_sums, nb.grad_input


@pytest.mark.parametrize("shape,axis", [((16, 7), 1), ((4, 6, 5), 1), ((3, 5, 4, 6), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_numba_steps_are_bit_for_bit_the_generic_path(shape, axis, dtype, affine, rng):
    pytest.importorskip("numba")
    c = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 100).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    for training in (True, False):
        outs = []
        for be in ("numba", _Generic()):
            if training:
                y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=be)
            else:
                m, v = rng.standard_normal(c) * 0 + 99, np.full(c, 4.0)
                y, cache = bn.batch_norm_inference(x, g, b, m, v, axis=axis, backend=be,
                                                   return_cache=True)
            outs.append((y, *bn.batch_norm_backward(dy, cache), cache.mean, cache.var))
        for fused, generic in zip(*outs, strict=True):
            if fused is None:
                assert generic is None
                continue
            np.testing.assert_array_equal(fused, generic)
            assert fused.dtype == generic.dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("momentum", [0.9, None])
def test_fused_running_update_is_bit_for_bit_the_generic_one(dtype, unbiased, momentum, rng):
    pytest.importorskip("numba")
    rm, rv = rng.standard_normal(9).astype(dtype), rng.random(9).astype(dtype)
    mean, var = rng.standard_normal(9), rng.random(9) * 5
    kw = dict(momentum=momentum, num_batches_tracked=3, unbiased=unbiased)
    fused = F.running_step(rm, rv, mean, var, 7, backend=get_backend("numba"), **kw)
    generic = F.running_step(rm, rv, mean, var, 7, **kw)
    public = F.update_running_stats(rm, rv, mean, var, 7, **kw)
    assert fused[2] is generic[2] is True
    for a, e, p in zip(fused[:2], generic[:2], public, strict=True):
        np.testing.assert_array_equal(a, e)
        np.testing.assert_array_equal(p, e)
        assert a.dtype == e.dtype == dtype


# ---------------------------------------------------------------------------------------------
# frozen layers (torchvision's FrozenBatchNorm2d)


def test_frozen_layer_uses_and_keeps_its_running_statistics_in_training(backend, rng):
    layer = bn.BatchNorm(4, dtype=np.float64, backend=backend)
    layer.forward(rng.standard_normal((32, 4)) * 2 + 3)  # running statistics away from 0/1
    layer.gamma[:] = rng.standard_normal(4)
    frozen_state = layer.state_dict()
    x, dy = rng.standard_normal((8, 4)), rng.standard_normal((8, 4))
    layer.freeze()
    assert layer.training and layer.frozen
    y = layer.forward(x)
    dx = layer.backward(dy)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, frozen_state[k], err_msg=k)
    ref = bn.BatchNorm(4, dtype=np.float64, backend=backend)
    ref.load_state_dict(frozen_state)
    ref.eval()
    np.testing.assert_allclose(y, ref.forward(x), rtol=1e-12)
    np.testing.assert_allclose(dx, ref.backward(dy), rtol=1e-12)
    assert layer.params == {} and layer.grads == {}
    layer.unfreeze()
    assert set(layer.params) == {"gamma", "beta"}
    layer.forward(x)
    assert layer.num_batches_tracked == frozen_state["num_batches_tracked"] + 1


def test_frozen_layer_backward_is_the_gradient_of_the_fixed_transform(rng):
    layer = bn.BatchNorm(3, dtype=np.float64).freeze(trainable_affine=True)
    layer.running_mean[:] = [1.0, -2.0, 0.5]
    layer.running_var[:] = [4.0, 0.25, 1.0]
    layer.gamma[:] = [1.5, -0.5, 2.0]
    x, dy = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    layer.forward(x)
    dx = layer.backward(dy)
    num = numerical_grad(lambda: float(np.sum(layer.forward(x) * dy)), x)
    assert rel_error(dx, num) < 1e-7
    assert set(layer.params) == {"gamma", "beta"}  # trainable_affine keeps them


def test_freeze_needs_running_statistics_and_changes_nothing_when_it_refuses():
    layer = bn.BatchNorm(3, track_running_stats=False)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        layer.freeze()
    assert_same_state(before, layer)
    with pytest.raises(TypeError, match="trainable_affine"):
        bn.BatchNorm(3).freeze(trainable_affine="yes")


def test_freeze_batchnorm_freezes_every_layer_of_a_model_or_none(rng):
    from batchnorm.nn import (
        Linear,
        ReLU,
        Sequential,
        batchnorm_layers,
        freeze_batchnorm,
        unfreeze_batchnorm,
    )

    net = Sequential([Linear(4, 6, rng=rng), bn.BatchNorm(6, dtype=np.float64), ReLU(),
                      Sequential([Linear(6, 3, rng=rng), bn.BatchNorm(3, dtype=np.float64)])])
    assert len(list(batchnorm_layers(net))) == 2
    freeze_batchnorm(net)
    assert all(layer.frozen for layer in batchnorm_layers(net))
    assert not any(k.endswith(("gamma", "beta")) for k in net.params)
    unfreeze_batchnorm(net)
    assert not any(layer.frozen for layer in batchnorm_layers(net))
    bad = Sequential([bn.BatchNorm(3), bn.BatchNorm(3, track_running_stats=False)])
    with pytest.raises(ValueError, match="running statistics"):
        freeze_batchnorm(bad)
    assert not bad[0].frozen


# ---------------------------------------------------------------------------------------------
# checks in one place (issue: reliability, "smaller ones")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"eps": "1e-5"}, TypeError, "expected eps to be a positive float"),
        ({"affine": "no"}, TypeError, "expected affine to be True or False"),
        ({"track_running_stats": 1}, TypeError, "expected track_running_stats"),
        ({"backend": 123}, TypeError, "expected backend 'auto', 'numpy', 'numba', a Backend"),
        ({"num_features": True}, TypeError, "expected num_features to be an int"),
    ],
)
def test_layer_arguments_of_the_wrong_type_are_refused(kwargs, error, match):
    kw = {"num_features": 3, **kwargs}
    with pytest.raises(error, match=match):
        bn.BatchNorm(**kw)


def test_unknown_backend_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="BATCHNORM_BACKEND='bogus'"):
        bn.BatchNorm(3)


@pytest.mark.parametrize("momentum", [5, -0.5, float("nan")])
def test_update_running_stats_refuses_a_momentum_outside_0_1(momentum):
    v = np.ones(3)
    with pytest.raises(ValueError, match=r"expected momentum in \[0, 1\]"):
        F.update_running_stats(v, v, v, v, 4, momentum=momentum, num_batches_tracked=1)


def test_book_layer_refuses_integer_nan_or_negative_running_statistics():
    g, b = np.ones(2), np.zeros(2)
    with pytest.raises(TypeError, match="expected running_mean of dtype float16, float32"):
        bn.BatchNormalization(g, b, running_mean=np.array([0, 1]))
    with pytest.raises(ValueError, match="expected finite running_var"):
        bn.BatchNormalization(g, b, running_var=np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="expected running_var >= 0"):
        bn.BatchNormalization(g, b, running_var=np.array([-1.0, 1.0]))


def test_read_only_running_statistics_raise_before_anything_changes(backend, rng):
    for book in (False, True):
        if book:
            layer = bn.BatchNormalization(np.ones(3), np.zeros(3), backend=backend,
                                          running_mean=np.zeros(3), running_var=np.ones(3))
            call = layer.forward
        else:
            layer = bn.BatchNorm(3, dtype=np.float64, backend=backend)
            call = layer.forward
        layer.running_var.flags.writeable = False
        before = snapshot(layer)
        with pytest.raises(ValueError, match="expected a writeable running_var"):
            call(rng.standard_normal((6, 3)) + 10)
        assert_same_state(before, layer)


def test_float16_running_statistics_that_would_overflow_raise_and_change_nothing(backend, rng):
    layer = bn.BatchNorm(3, dtype=np.float16, momentum=0.0, backend=backend)
    layer.forward((rng.standard_normal((64, 3)) * 10).astype(np.float16))  # fits
    before = snapshot(layer)
    x = (rng.standard_normal((64, 3)) * 300).astype(np.float16)  # variance ~9e4 > 65504
    with pytest.raises(ValueError, match="expected new running statistics that fit float16"):
        layer.forward(x)
    assert_same_state(before, layer)
    assert np.isfinite(layer.running_var).all()


def test_a_reducer_failure_in_the_checks_reaches_the_reducer_guard(rng):
    seen = []

    class _Guarded(LocalReducer):
        local = False

        def guard(self, phase):
            import contextlib

            @contextlib.contextmanager
            def g():
                try:
                    yield
                except Exception as err:
                    seen.append((phase, type(err).__name__))
                    raise

            return g()

    layer = bn.BatchNorm(3, dtype=np.float64, reducer=_Guarded())
    with pytest.raises(ValueError, match="num_features"):
        layer.forward(rng.standard_normal((4, 5)))
    assert seen == [("forward", "ValueError")]
    assert LOCAL.guard("forward") is LOCAL.guard("backward")


def test_layers_take_the_fused_running_update(rng, monkeypatch):
    """The statistics that compiled code returns carry a dtype equal to, but not the same
    object as, np.dtype(float64); the fused update must still be taken."""
    pytest.importorskip("numba")
    nb = get_backend("numba")
    taken = []
    real = type(nb).running_update

    def spy(self, *args):
        out = real(self, *args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(type(nb), "running_update", spy)
    bn.BatchNorm(4, backend="numba").forward(rng.standard_normal((16, 4)).astype(np.float32))
    bn.BatchNormalization(np.ones(4), np.zeros(4), backend="numba").forward(
        rng.standard_normal((16, 4))
    )
    assert taken == [True, True]
