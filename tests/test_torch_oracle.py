"""PyTorch as an outside oracle: outputs, gradients and running statistics."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from helpers import seed_of

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-5, 1e-6


def _t(a, grad=False):
    return torch.tensor(a, requires_grad=grad)


@pytest.mark.parametrize(
    "shape,channels_last",
    [((16, 5), False), ((8, 4, 7), False), ((6, 3, 5, 4), False), ((4, 3, 3, 4, 2), False),
     ((6, 5, 4, 3), True), ((4, 3, 4, 2, 5), True)],
)
@pytest.mark.parametrize("affine", [True, False])
def test_kernels_match_torch_functional(backend, shape, channels_last, affine):
    rng = np.random.default_rng(seed_of((shape, channels_last, affine)))
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    c = shape[-1] if channels_last else shape[1]
    g = rng.normal(1, 0.5, c).astype(np.float32) if affine else None
    b = rng.normal(0, 0.5, c).astype(np.float32) if affine else None
    dy = rng.normal(size=shape).astype(np.float32)
    axis = -1 if channels_last else 1

    # torch wants channels on dim 1
    def to_torch(a):
        return np.moveaxis(a, -1, 1) if channels_last else a

    def from_torch(a):
        return np.moveaxis(a, 1, -1) if channels_last else a

    xt = _t(np.ascontiguousarray(to_torch(x)), True)
    gt = _t(g, True) if affine else None
    bt = _t(b, True) if affine else None
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
    yt.backward(_t(np.ascontiguousarray(to_torch(dy))))

    y, cache = bn.batch_norm_train(x, g, b, axis=axis, eps=1e-5, backend=backend)
    dx, dg, db = bn.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(y, from_torch(yt.detach().numpy()), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, from_torch(xt.grad.numpy()), rtol=RTOL, atol=ATOL)
    if affine:
        np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=RTOL, atol=ATOL * 10)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=RTOL, atol=ATOL * 10)

    # inference with given statistics, and its (frozen) gradient
    m = rng.normal(size=c).astype(np.float32)
    v = rng.uniform(0.5, 2, c).astype(np.float32)
    xt = _t(np.ascontiguousarray(to_torch(x)), True)
    gt = _t(g, True) if affine else None
    bt = _t(b, True) if affine else None
    yt = torch.nn.functional.batch_norm(xt, _t(m), _t(v), gt, bt, training=False, eps=1e-5)
    yt.backward(_t(np.ascontiguousarray(to_torch(dy))))
    y, cache = bn.batch_norm_inference(x, g, b, m, v, axis=axis, backend=backend,
                                       return_cache=True)
    dx, dg, db = bn.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(y, from_torch(yt.detach().numpy()), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, from_torch(xt.grad.numpy()), rtol=RTOL, atol=ATOL)
    if affine:
        np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=RTOL, atol=ATOL * 10)


@pytest.mark.parametrize(
    "torch_cls,shape",
    [("BatchNorm1d", (12, 6)), ("BatchNorm1d", (6, 4, 9)), ("BatchNorm2d", (5, 3, 6, 4)),
     ("BatchNorm3d", (3, 2, 4, 3, 5)), ("BatchNorm2d-channels-last", (5, 6, 4, 3)),
     ("BatchNorm3d-channels-last", (3, 4, 3, 5, 2))],
)
@pytest.mark.parametrize("torch_momentum", [0.1, 0.3, None])
def test_layer_matches_torch_modules(backend, torch_cls, shape, torch_momentum):
    """momentum = 1 - m and unbiased=True reproduce torch.nn.BatchNorm*d(momentum=m)."""
    rng = np.random.default_rng(seed_of((torch_cls, shape, torch_momentum)))
    channels_last = torch_cls.endswith("-channels-last")
    axis = -1 if channels_last else 1
    c = shape[axis]
    ref = getattr(torch.nn, torch_cls.split("-")[0])(c, momentum=torch_momentum, eps=1e-5)
    ours = bn.BatchNorm(
        c, axis=axis, momentum=None if torch_momentum is None else 1 - torch_momentum,
        unbiased=True, eps=1e-5, backend=backend,
    )

    def torch_view(a):  # torch keeps channels on dim 1; its channels_last format is a stride
        t = _t(np.ascontiguousarray(np.moveaxis(a, -1, 1)) if channels_last else a)
        return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 and channels_last \
            else t

    def ours_view(t):
        a = t.detach().numpy()
        return np.moveaxis(a, 1, -1) if channels_last else a

    with torch.no_grad():
        ref.weight.copy_(_t(rng.normal(1, 0.3, c).astype(np.float32)))
        ref.bias.copy_(_t(rng.normal(0, 0.3, c).astype(np.float32)))
    ours.gamma[:] = ref.weight.detach().numpy()
    ours.beta[:] = ref.bias.detach().numpy()
    for step in range(4):
        x = rng.normal(step, 1 + step, shape).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        xt = torch_view(x).requires_grad_(True)
        ref.zero_grad()
        yt = ref(xt)
        yt.backward(torch_view(dy))
        y = ours(x)
        dx = ours.backward(dy)
        np.testing.assert_allclose(y, ours_view(yt), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(dx, ours_view(xt.grad), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ours.dgamma, ref.weight.grad.numpy(), rtol=RTOL, atol=1e-5)
        np.testing.assert_allclose(ours.dbeta, ref.bias.grad.numpy(), rtol=RTOL, atol=1e-5)
        np.testing.assert_allclose(ours.running_mean, ref.running_mean.numpy(), rtol=RTOL,
                                   atol=ATOL)
        np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), rtol=RTOL)
        assert ours.num_batches_tracked == int(ref.num_batches_tracked)
    ref.eval()
    ours.eval()
    x = rng.normal(size=shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    xt = torch_view(x).requires_grad_(True)
    ref.zero_grad()
    yt = ref(xt)
    yt.backward(torch_view(dy))
    np.testing.assert_allclose(ours(x), ours_view(yt), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours.backward(dy), ours_view(xt.grad), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours.dgamma, ref.weight.grad.numpy(), rtol=RTOL, atol=1e-5)


def test_single_value_per_channel_is_an_error_in_both():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm1d(3)(torch.ones(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        bn.BatchNorm(3)(np.ones((1, 3), np.float32))
