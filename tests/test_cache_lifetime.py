"""What a forward keeps for backward: edits of the input between forward and backward cannot
change the gradients (every dtype, every backend, layers and kernels), and the input is
released as soon as nothing can need it."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import functional as F

DTYPES = [np.float16, np.float32, np.float64]


def _edit(x: np.ndarray) -> None:
    """In-place edits a user might make after the forward: scale, shift, permute rows."""
    x *= 3
    x += 1
    x[:] = x[::-1].copy()


def _grads(layer, x, dy, edit):
    layer.forward(x)
    if edit:
        _edit(x)
    dx = layer.backward(dy)
    return dx, None if layer.dgamma is None else layer.dgamma.copy(), (
        None if layer.dbeta is None else layer.dbeta.copy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["train", "eval", "frozen-affine"])
@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((4, 3, 5), 1), ((4, 5, 3), -1)])
def test_editing_x_in_place_after_forward_does_not_change_the_gradient(
    backend, dtype, mode, shape, axis
):
    rng = np.random.default_rng(1)
    x0 = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    warm = rng.standard_normal(shape) + 3
    out = []
    for edit in (False, True):
        layer = bn.BatchNorm(shape[axis], axis=axis, dtype=np.float64, backend=backend)
        layer.gamma[:] = np.linspace(0.5, 2, shape[axis])
        layer.forward(warm)  # running statistics away from 0, 1
        if mode == "eval":
            layer.eval()
        elif mode == "frozen-affine":
            layer.freeze(trainable_affine=True)
        out.append(_grads(layer, x0.copy(), dy, edit))
    for name, a, b in zip(("dx", "dgamma", "dbeta"), out[0], out[1], strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train_flg", [True, False])
def test_book_layer_gradient_ignores_edits_of_x(backend, dtype, train_flg):
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((6, 4)).astype(dtype)
    dy = rng.standard_normal((6, 4)).astype(dtype)
    out = []
    for edit in (False, True):
        layer = bn.BatchNormalization(np.linspace(0.5, 2, 4), np.zeros(4), backend=backend)
        x = x0.copy()
        layer.forward(x, train_flg)
        if edit:
            _edit(x)
        out.append((layer.backward(dy), layer.dgamma.copy()))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_cache_ignores_edits_of_x(backend, dtype):
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((5, 3, 4)).astype(dtype)
    dy = rng.standard_normal(x0.shape).astype(dtype)
    gamma, beta = np.array([1.0, 2.0, 0.5]), np.zeros(3)
    out = []
    for edit in (False, True):
        x = x0.copy()
        _, cache = F.batch_norm_train(x, gamma, beta, backend=backend)
        if edit:
            _edit(x)
        out.append(F.batch_norm_backward(dy, cache))
    for a, b in zip(out[0], out[1], strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# lifetime


def _freed(ref) -> bool:
    gc.collect()
    return ref() is None


@pytest.mark.parametrize("mode", ["train", "eval", "frozen-affine"])
def test_backward_releases_what_the_forward_kept(backend, mode):
    layer = bn.BatchNorm(3, dtype=np.float64, backend=backend)
    if mode == "eval":
        layer.eval()
    elif mode == "frozen-affine":
        layer.freeze(trainable_affine=True)
    x = np.random.default_rng(0).standard_normal((8, 3))
    layer.forward(x)
    kept = weakref.ref(layer._cache.x3)
    layer.backward(np.ones_like(x))
    assert _freed(kept)
    with pytest.raises(RuntimeError, match="forward call first"):
        layer.backward(np.ones_like(x))  # one backward per forward, as autograd


@pytest.mark.parametrize(
    "kwargs,setup",
    [
        (dict(affine=False), "eval"),
        (dict(), "frozen"),  # frozen without trainable gamma/beta: a fixed affine map
    ],
)
def test_input_is_not_kept_where_backward_does_not_read_it(backend, kwargs, setup):
    layer = bn.BatchNorm(3, dtype=np.float64, backend=backend, **kwargs)
    layer.forward(np.random.default_rng(0).standard_normal((8, 3)) + 2)
    layer.eval() if setup == "eval" else layer.freeze()
    x = np.random.default_rng(1).standard_normal((8, 3))
    ref = weakref.ref(x)
    y = layer.forward(x)
    del x
    assert _freed(ref)
    # backward still gives the gradient of the fixed transform
    dy = np.random.default_rng(2).standard_normal(y.shape)
    scale = (1 if layer.gamma is None else layer.gamma) / np.sqrt(layer.running_var + layer.eps)
    np.testing.assert_allclose(layer.backward(dy), dy * scale, rtol=1e-14)
    assert layer.dgamma is None and layer.dbeta is None and layer.grads == {}


def test_training_forward_does_not_keep_the_users_array(backend):
    layer = bn.BatchNorm(3, dtype=np.float32, backend=backend)
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    ref = weakref.ref(x)
    layer.forward(x)
    del x
    assert _freed(ref)  # the layer keeps its own copy, not the caller's array


def test_a_read_only_input_is_kept_without_a_copy_and_a_writeable_one_is_copied():
    from batchnorm.functional import read_only

    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    _, cache = bn.batch_norm_train(x, None, None)
    assert not np.shares_memory(cache.x3, x)  # writeable: copied
    x.setflags(write=False)
    assert read_only(x)
    _, cache = bn.batch_norm_train(x, None, None)
    assert np.shares_memory(cache.x3, x)  # nothing can write to it: kept as it is
    # a read-only view of writeable memory is copied
    base = rng.standard_normal((16, 4)).astype(np.float32)
    view = base[:]
    view.setflags(write=False)
    assert not read_only(view)
    _, cache = bn.batch_norm_train(view, None, None)
    assert not np.shares_memory(cache.x3, base)
    # memory from a bytearray can be written through the bytearray: copied; bytes cannot
    ro = np.frombuffer(bytes(x.tobytes()), dtype=np.float32).reshape(16, 4)
    rw = np.frombuffer(bytearray(x.tobytes()), dtype=np.float32).reshape(16, 4)
    rw.setflags(write=False)
    assert read_only(ro) and not read_only(rw)


@pytest.mark.parametrize("shape,axis", [((64, 32, 40), 1), ((2048, 40), 1), ((64, 40, 32), -1)])
def test_a_large_input_is_copied_by_the_backend_and_edits_do_not_matter(backend, shape, axis):
    """Large inputs take the numba backend's multi-threaded copy: same values, own memory."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, cache = bn.batch_norm_train(x, None, None, axis=axis, backend=backend)
    assert not np.shares_memory(cache.x3, x)
    np.testing.assert_array_equal(cache.x3.reshape(-1), np.moveaxis(x, axis, 1).reshape(-1)
                                  if axis == 1 else x.reshape(-1))
    ref = bn.batch_norm_backward(dy, bn.batch_norm_train(x.copy(), None, None, axis=axis,
                                                         backend=backend)[1])
    x *= 3.0  # an in-place edit after the forward
    got = bn.batch_norm_backward(dy, cache)
    np.testing.assert_array_equal(got[0], ref[0])
