"""Test accuracy of the digits MLP with batch norm's running averages against recomputed
population statistics (``batchnorm.nn.recompute_batchnorm_stats``, Ioffe & Szegedy 2015,
Algorithm 2).

The network, data and training are the demo's: scikit-learn's 8x8 digits (1,437 train / 360
test, the demo's split), an MLP 64 -> 5 x 100 -> 10 with batch norm after each hidden affine
layer, He initialisation, SGD on batches of 100 for 30 epochs, float64. Several settings vary
one thing: the learning rate, batch norm's momentum (the weight of the old running value), or
the number of epochs. After training, the same network is evaluated twice on the test set:
with the running averages the layers kept during training, and after recomputing the
statistics from one pass over the training set in batches of 100 (the training batch size).

Usage, from the repository root (needs scikit-learn, as the demo does):
``.venv/bin/python examples/population_stats.py``
"""

from __future__ import annotations

import sys

import numpy as np

from batchnorm.nn import SGD, SoftmaxCrossEntropy, mlp, recompute_batchnorm_stats

try:  # the apps moved into batchnorm.apps
    from batchnorm.apps.data import load_digits
except ImportError:  # pragma: no cover - before the move
    from batchnorm.data import load_digits

# (label, learning rate, batch-norm momentum, epochs)
SETTINGS = [
    ("demo: lr 0.01, momentum 0.9, 30 epochs", 0.01, 0.9, 30),
    ("lr 0.01, momentum 0.99 (Keras' and Flax's default), 30 epochs", 0.01, 0.99, 30),
    ("lr 0.3 (the demo's x30), momentum 0.9, 30 epochs", 0.3, 0.9, 30),
    ("lr 0.3, momentum 0.9, 1 epoch (14 steps)", 0.3, 0.9, 1),
    ("lr 0.3, momentum 0.99, 3 epochs", 0.3, 0.99, 3),
]
BATCH = 100


def evaluate(model, x, y) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy in eval mode."""
    model.eval()
    logits = model.forward(x)
    loss = SoftmaxCrossEntropy()(logits, y)
    return float(np.mean(np.argmax(logits, axis=1) == y)), loss


def run(label: str, lr: float, momentum: float, epochs: int, data) -> tuple[float, ...]:
    x_train = data.x_train.reshape(len(data.x_train), -1)
    x_test = data.x_test.reshape(len(data.x_test), -1)
    model = mlp(64, 10, (100,) * 5, batchnorm=True, rng=np.random.default_rng(0),
                bn_momentum=momentum, backend="numpy")
    loss_fn, opt = SoftmaxCrossEntropy(), SGD(model.params, lr)
    rng = np.random.default_rng(1)
    for _ in range(epochs):
        model.train()
        perm = rng.permutation(len(x_train))
        for i in range(len(x_train) // BATCH):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            loss_fn(model.forward(x_train[idx]), data.y_train[idx])
            model.backward(loss_fn.backward())
            opt.step(model.grads)
    acc_running, loss_running = evaluate(model, x_test, data.y_test)
    perm = rng.permutation(len(x_train))
    batches = (x_train[perm[i : i + BATCH]] for i in range(0, len(x_train) - BATCH + 1, BATCH))
    used = recompute_batchnorm_stats(model, batches)
    acc_pop, loss_pop = evaluate(model, x_test, data.y_test)
    return acc_running, acc_pop, loss_running, loss_pop, used


def main() -> int:
    data = load_digits()
    print("| setting | test acc, running averages | test acc, recomputed | "
          "test loss, running | test loss, recomputed |")
    print("|---|---:|---:|---:|---:|")
    for label, lr, momentum, epochs in SETTINGS:
        acc_r, acc_p, loss_r, loss_p, used = run(label, lr, momentum, epochs, data)
        print(f"| {label} | {acc_r:.3f} | {acc_p:.3f} | {loss_r:.3f} | {loss_p:.3f} |",
              flush=True)
    print(f"\n(recomputed from {used} training batches of {BATCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
