"""A small NumPy network toolkit around the batch-normalization layers.

Just enough to build and train the demo's networks, and your own: layers with ``forward``,
``backward``, ``params``, ``grads``, ``train()`` and ``eval()`` (the protocol
:class:`batchnorm.BatchNorm` follows), a softmax cross-entropy loss, three optimisers, a
:class:`Sequential` container and builders for an MLP and a small CNN.

Examples
--------
>>> import numpy as np
>>> from batchnorm import BatchNorm
>>> from batchnorm.nn import Linear, ReLU, Sequential, SoftmaxCrossEntropy, SGD
>>> rng = np.random.default_rng(0)
>>> net = Sequential([Linear(64, 100, rng=rng), BatchNorm(100, dtype=np.float64), ReLU(),
...                   Linear(100, 10, rng=rng)])
>>> loss_fn, opt = SoftmaxCrossEntropy(), SGD(net.params, lr=0.1)
>>> x, y = rng.standard_normal((32, 64)), rng.integers(0, 10, 32)
>>> loss = loss_fn(net(x), y)
>>> _ = net.backward(loss_fn.backward())
>>> opt.step(net.grads)
"""

from .builders import cnn, init_std, mlp
from .deploy import fold_batchnorm, recompute_batchnorm_stats
from .freeze import batchnorm_layers, freeze_batchnorm, unfreeze_batchnorm
from .fuse import fuse_activations
from .layers import Conv2d, Flatten, Layer, Linear, MaxPool2d, ReLU, Sigmoid, col2im, im2col
from .losses import SoftmaxCrossEntropy, softmax
from .optim import SGD, Adam, Momentum, Optimizer
from .sequential import Sequential
from .torch_state import export_torch_state, load_torch_state

__all__ = [
    "SGD",
    "Adam",
    "Conv2d",
    "Flatten",
    "Layer",
    "Linear",
    "MaxPool2d",
    "Momentum",
    "Optimizer",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "batchnorm_layers",
    "cnn",
    "col2im",
    "export_torch_state",
    "fold_batchnorm",
    "freeze_batchnorm",
    "fuse_activations",
    "im2col",
    "init_std",
    "load_torch_state",
    "mlp",
    "recompute_batchnorm_stats",
    "softmax",
    "unfreeze_batchnorm",
]
