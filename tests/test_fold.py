"""Folding batch norm into the Linear/Conv2d before it: the functional fold (with PyTorch's
fusion as the oracle) and whole toolkit models (eval outputs equal, the original untouched)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import batchnorm
from batchnorm import BatchNorm, fold_batchnorm
from batchnorm.nn import (
    Conv2d,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    cnn,
    mlp,
)
from batchnorm.nn import fold_batchnorm as fold_model
from helpers import seed_of

# Eval outputs of a folded and an unfolded model: float32 round-off (a few ulps of the
# activations' scale), float64 far tighter.
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


def _trained_bn(bn: BatchNorm, rng: np.random.Generator) -> BatchNorm:
    """Give a layer non-trivial parameters and running statistics."""
    c = bn.num_features
    if bn.affine:
        bn.gamma[:] = rng.uniform(0.5, 2.0, c)
        bn.beta[:] = rng.standard_normal(c)
    bn.running_mean[:] = rng.standard_normal(c)
    bn.running_var[:] = rng.uniform(0.2, 3.0, c)
    bn.num_batches_tracked = 7
    return bn


def _randomise(model, rng: np.random.Generator):
    for layer in model.layers:
        if isinstance(layer, BatchNorm) and layer.track_running_stats:
            _trained_bn(layer, rng)
        elif isinstance(layer, (Linear, Conv2d)) and layer.b is not None:
            layer.b[:] = rng.standard_normal(layer.b.shape)
    return model


def _state(model) -> list:
    """Every array and flag of every layer (nested Sequentials too), copied, for 'the original
    is unchanged'."""
    out = []
    for layer in model.layers:
        if isinstance(layer, Sequential):
            out += [(Sequential, {"training": layer.training})] + _state(layer)
            continue
        d = {}
        for k, v in vars(layer).items():
            if k in ("backend", "_cache", "_x"):
                continue
            d[k] = v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v)
        out.append((type(layer), d))
    return out


def _assert_same(before: list, model) -> None:
    after = _state(model)
    assert [t for t, _ in before] == [t for t, _ in after]
    for (_, a), (_, b) in zip(before, after, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], np.ndarray):
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
                assert a[k].dtype == b[k].dtype
            else:
                assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------
# the functional fold


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_linear_in_out_matches_layer_then_bn(dtype, with_bias, affine):
    rng = np.random.default_rng(seed_of((dtype, with_bias, affine)))
    w = rng.standard_normal((6, 4)).astype(dtype)  # (in, out): x @ W + b
    b = rng.standard_normal(4).astype(dtype) if with_bias else None
    mean, var = rng.standard_normal(4), rng.uniform(0.1, 2.0, 4)
    gamma = rng.uniform(0.5, 2.0, 4) if affine else None
    beta = rng.standard_normal(4) if affine else None
    wf, bf = fold_batchnorm(w, b, mean, var, gamma, beta, 1e-3, out_axis=1)
    assert wf.dtype == bf.dtype == dtype and wf.shape == w.shape and bf.shape == (4,)
    x = rng.standard_normal((9, 6))
    z = x @ w.astype(np.float64) + (0 if b is None else b)
    want = batchnorm.batch_norm_inference(z, gamma, beta, mean, var, axis=1, eps=1e-3)
    np.testing.assert_allclose(x @ wf.astype(np.float64) + bf, want, **TOL[dtype])


def test_fold_is_computed_in_float64_and_rounded_once():
    # A float16 weight: the result is the float64 product rounded once, not a float16 chain.
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 5)).astype(np.float16)
    mean, var, gamma = rng.standard_normal(3), rng.uniform(0.1, 2, 3), rng.uniform(0.5, 2, 3)
    wf, bf = fold_batchnorm(w, None, mean, var, gamma, None, 1e-5)
    scale = gamma / np.sqrt(var + 1e-5)
    np.testing.assert_array_equal(wf, (w.astype(np.float64) * scale[:, None]).astype(np.float16))
    np.testing.assert_array_equal(bf, (-mean * scale).astype(np.float16))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_matches_pytorch_fusion(kind, with_bias):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    torch.manual_seed(seed_of((kind, with_bias)))
    if kind == "linear":
        layer = torch.nn.Linear(7, 5, bias=with_bias, dtype=torch.float64)
        bn = torch.nn.BatchNorm1d(5, eps=1e-3, dtype=torch.float64)
        fuse = fuse_linear_bn_eval
    else:
        layer = torch.nn.Conv2d(3, 5, 3, bias=with_bias, dtype=torch.float64)
        bn = torch.nn.BatchNorm2d(5, eps=1e-3, dtype=torch.float64)
        fuse = fuse_conv_bn_eval
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    layer.eval()
    bn.eval()
    fused = fuse(layer, bn)
    b = None if layer.bias is None else layer.bias.detach().numpy()
    wf, bf = fold_batchnorm(
        layer.weight.detach().numpy(), b, bn.running_mean.numpy(), bn.running_var.numpy(),
        bn.weight.detach().numpy(), bn.bias.detach().numpy(), bn.eps, out_axis=0,
    )
    np.testing.assert_allclose(wf, fused.weight.detach().numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(bf, fused.bias.detach().numpy(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(weight=np.ones((3, 4), np.int64)), TypeError, "expected weight of dtype float"),
        (dict(weight=np.float64(1.0)), ValueError, "at least 1 dim"),
        (dict(out_axis=2), ValueError, "out of range"),
        (dict(out_axis=1), ValueError, r"expected mean of shape \(4,\)"),
        (dict(bias=np.zeros(4)), ValueError, r"expected bias of shape \(3,\)"),
        (dict(gamma=np.ones(2)), ValueError, r"expected gamma of shape \(3,\)"),
        (dict(beta=np.array(["a", "b", "c"])), TypeError, "expected beta of dtype float"),
        (dict(eps=0.0), ValueError, "expected eps > 0"),
        (dict(var=np.array([1.0, -1.0, np.nan])), ValueError, r"var \+ eps > 0"),
    ],
)
def test_fold_bad_input(kwargs, exc, match):
    args = dict(weight=np.ones((3, 4)), bias=None, mean=np.zeros(3), var=np.ones(3),
                gamma=None, beta=None, eps=1e-5)
    out_axis = kwargs.pop("out_axis", 0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fold_batchnorm(**args, out_axis=out_axis)


# ---------------------------------------------------------------------------------------------
# whole models


def _check_folded(model, x, dtype, n_bn_left: int):
    rng = np.random.default_rng(seed_of(repr(model)))
    _randomise(model, rng)
    model.train()  # folding must not depend on the mode the model is in
    before = _state(model)
    folded = fold_model(model)
    _assert_same(before, model)
    assert model.training and all(layer.training for layer in model.layers)
    assert not folded.training
    assert sum(isinstance(la, BatchNorm) for la in folded.layers) == n_bn_left
    want = model.eval().forward(x)
    got = folded.forward(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL[dtype])
    # No array is shared: training the original does not change the folded model.
    params = model.params
    for v in params.values():
        v += 1.0
    np.testing.assert_array_equal(folded.forward(x), got)
    return folded


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("unbiased", [False, True])
def test_fold_mlp(dtype, unbiased):
    model = mlp(12, 5, hidden=(16, 8), batchnorm=True, dtype=dtype)
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            layer.unbiased = unbiased
    # Train a few steps so that the running statistics are those the layer itself made.
    rng = np.random.default_rng(3)
    for _ in range(3):
        model.forward((rng.standard_normal((20, 12)) * 3 + 1).astype(dtype))
    x = rng.standard_normal((10, 12)).astype(dtype)
    folded = _check_folded(model, x, dtype, n_bn_left=0)
    assert [type(la) for la in folded.layers] == [Linear, ReLU, Linear, ReLU, Linear]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_cnn_per_channel(dtype):
    model = cnn((2, 8, 8), 4, channels=(3, 5), hidden=(6,), batchnorm=True, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((4, 2, 8, 8)).astype(dtype)
    folded = _check_folded(model, x, dtype, n_bn_left=0)
    assert sum(type(la) is Conv2d for la in folded.layers) == 2


def test_fold_conv_with_stride_pad_and_no_bias():
    conv = Conv2d(3, 4, 3, stride=2, pad=1, bias=False, rng=np.random.default_rng(5))
    model = Sequential([conv, BatchNorm(4, axis=-3, dtype=np.float64), ReLU()])
    x = np.random.default_rng(6).standard_normal((2, 3, 7, 7))
    folded = _check_folded(model, x, np.float64, n_bn_left=0)
    new = folded.layers[0]
    assert (new.stride, new.pad, new.kernel_size) == (2, 1, 3) and new.b is not None


@pytest.mark.parametrize("axis", [1, -1])
def test_fold_linear_features_last(axis):
    # For Linear's (N, out) output, axis=-1 (channels-last) is the feature axis too.
    model = Sequential([Linear(5, 3), BatchNorm(3, axis=axis, dtype=np.float32), ReLU()])
    x = np.random.default_rng(7).standard_normal((6, 5))
    _check_folded(model, x, np.float64, n_bn_left=0)


def test_fold_bn_without_affine():
    model = Sequential([Linear(4, 3, dtype=np.float32), BatchNorm(3, affine=False), ReLU(),
                        Linear(3, 2, dtype=np.float32)])
    x = np.random.default_rng(8).standard_normal((5, 4)).astype(np.float32)
    _check_folded(model, x, np.float32, n_bn_left=0)


def test_fold_two_batch_norms_in_a_row():
    model = Sequential([Linear(4, 3), BatchNorm(3, dtype=np.float64),
                        BatchNorm(3, dtype=np.float64)])
    x = np.random.default_rng(9).standard_normal((5, 4))
    folded = _check_folded(model, x, np.float64, n_bn_left=0)
    assert len(folded.layers) == 1


def test_fold_nested_sequential():
    inner = Sequential([Linear(4, 3), BatchNorm(3, dtype=np.float64), ReLU()])
    model = Sequential([inner, Linear(3, 2), BatchNorm(2, dtype=np.float64)])
    x = np.random.default_rng(10).standard_normal((5, 4))
    for layer in inner.layers:
        if isinstance(layer, BatchNorm):
            _trained_bn(layer, np.random.default_rng(11))
    folded = _check_folded(model, x, np.float64, n_bn_left=0)
    assert [type(la) for la in folded.layers[0].layers] == [Linear, ReLU]


def test_unfoldable_batch_norms_are_kept():
    rng = np.random.default_rng(12)
    layers = [
        BatchNorm(4, dtype=np.float64),  # first layer: nothing before it
        Linear(4, 6), ReLU(), BatchNorm(6, dtype=np.float64),  # after an activation
        Linear(6, 6),
        BatchNorm(6, dtype=np.float64, track_running_stats=False),  # batch stats in eval
    ]
    model = Sequential(layers)
    x = rng.standard_normal((5, 4))
    folded = _check_folded(model, x, np.float64, n_bn_left=3)
    assert [type(la) for la in folded.layers] == [type(la) for la in layers]


def test_conv_then_bn_on_another_axis_is_kept():
    # BatchNorm over the last axis of (N, C, H, W) is per column, not per channel.
    model = Sequential([Conv2d(2, 3, 3, pad=1), BatchNorm(5, axis=-1, dtype=np.float64)])
    x = np.random.default_rng(13).standard_normal((2, 2, 5, 5))
    _check_folded(model, x, np.float64, n_bn_left=1)
    with pytest.raises(ValueError, match=r"layer 1 .*axis -1 is not the feature axis 1"):
        fold_model(model, strict=True)


@pytest.mark.parametrize(
    "layers, match",
    [
        ([ReLU(), BatchNorm(3)], "layer 1 .*not directly preceded by a Linear or Conv2d"),
        ([Linear(4, 3), BatchNorm(3, track_running_stats=False)], "track_running_stats=False"),
        ([Conv2d(1, 3, 1), BatchNorm(3, axis=2)], "axis 2 is not the feature axis"),
        ([Linear(4, 3), MaxPool2d(1), BatchNorm(3)], "not directly preceded"),
    ],
)
def test_strict_names_the_layer_and_the_reason(layers, match):
    model = Sequential(layers)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        fold_model(model, strict=True)
    _assert_same(before, model)


def test_strict_folds_what_it_can():
    model = mlp(6, 2, hidden=(4,), batchnorm=True)
    folded = fold_model(model, strict=True)
    assert not any(isinstance(la, BatchNorm) for la in folded.layers)


def test_fold_needs_a_sequential():
    with pytest.raises(TypeError, match="expected a Sequential"):
        fold_model(Linear(2, 2))


def test_folded_model_runs_after_flatten():
    # The CNN's tail: Flatten then Linear + BatchNorm.
    model = Sequential([Conv2d(1, 2, 3, pad=1), BatchNorm(2, dtype=np.float64), ReLU(),
                        Flatten(), Linear(2 * 4 * 4, 3), BatchNorm(3, dtype=np.float64)])
    x = np.random.default_rng(14).standard_normal((3, 1, 4, 4))
    folded = _check_folded(model, x, np.float64, n_bn_left=0)
    assert [type(la) for la in folded.layers] == [Conv2d, ReLU, Flatten, Linear]


def test_group_norm_is_kept_even_when_strict():
    from batchnorm import GroupNorm

    model = Sequential([Conv2d(2, 4, 3, pad=1), GroupNorm(2, 4, dtype=np.float64), ReLU(),
                        Conv2d(4, 4, 1), BatchNorm(4, dtype=np.float64)])
    x = np.random.default_rng(15).standard_normal((3, 2, 5, 5))
    folded = _check_folded(model, x, np.float64, n_bn_left=0)
    assert [type(la) for la in fold_model(model, strict=True).layers] == [
        Conv2d, GroupNorm, ReLU, Conv2d]
    assert [type(la) for la in folded.layers] == [Conv2d, GroupNorm, ReLU, Conv2d]


def test_frozen_batch_norm_folds():
    model = mlp(5, 2, hidden=(4,), batchnorm=True)
    _bn = [la for la in model.layers if isinstance(la, BatchNorm)][0]
    _bn.freeze(trainable_affine=True)
    x = np.random.default_rng(16).standard_normal((3, 5))
    _check_folded(model, x, np.float64, n_bn_left=0)
