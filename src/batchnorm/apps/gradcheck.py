"""``batchnorm gradcheck``: compare every layer's backward with central finite differences.

The checks (:func:`default_cases`) cover every layer of the package and of the toolkit; the
finite differences themselves are :mod:`batchnorm.gradcheck`'s (:func:`check_layer`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ..gradcheck import TOLERANCE, CheckResult, check_layer
from ._checks import finite_float, int_at_least

__all__ = ["default_cases", "main", "run"]


# ---------------------------------------------------------------------------------------------
# the checks of the command


class _Book:
    """Adapter: :class:`batchnorm.BatchNormalization` under the common layer protocol."""

    def __init__(self, layer: Any, train: bool) -> None:
        self.layer, self.train_flg = layer, train

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.layer.forward(x, train_flg=self.train_flg)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self.layer.backward(dy)

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {"gamma": self.layer.gamma, "beta": self.layer.beta}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return {"gamma": self.layer.dgamma, "beta": self.layer.dbeta}


class _Loss:
    """Adapter: the softmax cross-entropy of fixed labels as a layer with a (1,) output."""

    def __init__(self, labels: np.ndarray) -> None:
        from ..nn import SoftmaxCrossEntropy

        self.fn, self.labels = SoftmaxCrossEntropy(), labels

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.array([self.fn(x, self.labels)])

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return float(dy[0]) * self.fn.backward()


def _away_from_zero(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # ReLU has a kink at 0: keep inputs at least 0.1 away so x +- h stays on one side.
    return np.sign(rng.standard_normal(shape)) * (0.1 + np.abs(rng.standard_normal(shape)))


def _distinct(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Max pooling needs a unique maximum per window that h cannot change: values 0.1 apart.
    return 0.1 * rng.permutation(int(np.prod(shape))).reshape(shape).astype(np.float64)


def default_cases(
    seed: int = 0, backend: str | None = None
) -> list[tuple[str, Any, np.ndarray]]:
    """The checks ``batchnorm gradcheck`` runs: ``(name, layer, x)`` triples, all float64."""
    from ..layers import BatchNorm, BatchNormalization
    from ..nn import (
        Conv2d,
        Flatten,
        Linear,
        MaxPool2d,
        ReLU,
        Sigmoid,
        cnn,
        mlp,
    )

    rng = np.random.default_rng(seed)
    f64 = np.float64
    cases: list[tuple[str, Any, np.ndarray]] = []

    def bn(c: int, train: bool = True, **kw: Any) -> BatchNorm:
        layer = BatchNorm(c, dtype=f64, backend=backend, **kw)
        if layer.affine:
            layer.gamma[:] = rng.uniform(0.5, 1.5, c)
            layer.beta[:] = rng.standard_normal(c)
        if layer.track_running_stats:
            layer.running_mean[:] = rng.standard_normal(c)
            layer.running_var[:] = rng.uniform(0.5, 2.0, c)
        return layer.train(train)

    x2 = rng.standard_normal((8, 5)) * 2 + 3
    x3 = rng.standard_normal((4, 3, 5))
    x4 = rng.standard_normal((3, 4, 3, 2))
    x4cl = rng.standard_normal((3, 3, 2, 4))
    x5 = rng.standard_normal((2, 3, 2, 2, 2))
    cases += [
        ("BatchNorm (N,C) train", bn(5), x2),
        ("BatchNorm (N,C) eval", bn(5, False), x2),
        ("BatchNorm (N,C) train affine=False", bn(5, affine=False), x2),
        ("BatchNorm (N,C,L) train", bn(3), x3),
        ("BatchNorm (N,C,H,W) train", bn(4), x4),
        ("BatchNorm (N,C,H,W) eval", bn(4, False), x4),
        ("BatchNorm (N,H,W,C) axis=-1 train", bn(4, axis=-1), x4cl),
        ("BatchNorm (N,C,D,H,W) train", bn(3), x5),
        ("BatchNorm no running stats, eval", bn(4, False, track_running_stats=False), x4),
    ]

    def book(size: int, train: bool) -> _Book:
        layer = BatchNormalization(
            rng.uniform(0.5, 1.5, size), rng.standard_normal(size), backend=backend,
            running_mean=rng.standard_normal(size), running_var=rng.uniform(0.5, 2.0, size),
        )
        return _Book(layer, train)

    cases += [
        ("BatchNormalization (N,D) train", book(5, True), x2),
        ("BatchNormalization (N,D) eval", book(5, False), x2),
        ("BatchNormalization (N,C,H,W) per channel", book(4, True), x4),
        ("BatchNormalization (N,C,H,W) per activation", book(24, True), x4),
    ]

    cases += [
        ("nn.Linear", Linear(5, 4, rng=rng), x2),
        ("nn.ReLU", ReLU(), _away_from_zero(rng, (4, 6))),
        ("nn.Sigmoid", Sigmoid(), rng.standard_normal((4, 6)) * 3),
        ("nn.Conv2d 3x3 pad 1", Conv2d(4, 3, 3, pad=1, rng=rng), x4),
        ("nn.Conv2d 2x2 stride 2", Conv2d(2, 3, 2, stride=2, rng=rng),
         rng.standard_normal((2, 2, 5, 4))),
        ("nn.MaxPool2d 2", MaxPool2d(2), _distinct(rng, (2, 3, 4, 4))),
        ("nn.MaxPool2d 3 stride 1", MaxPool2d(3, stride=1), _distinct(rng, (2, 2, 4, 5))),
        ("nn.Flatten", Flatten(), x4),
        ("nn.SoftmaxCrossEntropy", _Loss(rng.integers(0, 5, 8)), x2),
    ]
    net = mlp(6, 3, (5, 4), batchnorm=True, rng=rng, backend=backend)
    cases.append(("nn.mlp with batch norm", net, rng.standard_normal((7, 6))))
    conv = cnn((1, 4, 4), 3, channels=(2,), hidden=(4,), batchnorm=True, rng=rng,
               backend=backend)
    cases.append(("nn.cnn with batch norm", conv, rng.standard_normal((3, 1, 4, 4))))
    return cases


_COLUMNS = ("dx", "dgamma", "dbeta", "dW", "db")


def _row(name: str, errors: dict[str, float], status: str, width: int) -> str:
    cells = [f"{errors[c]:8.1e}" if c in errors else f"{'-':>8}" for c in _COLUMNS]
    return f"{name:<{width}}  " + "  ".join(cells) + f"  {status}"


def run(
    seed: int = 0,
    backend: str | None = None,
    tol: float = TOLERANCE,
    out: Any = None,
) -> list[CheckResult]:
    """Run :func:`default_cases`, print the table to `out` (stdout) and return the results."""
    from ..backends import get_backend

    out = sys.stdout if out is None else out
    cases = default_cases(seed, backend)
    width = max(len(n) for n, _, _ in cases)
    print(
        f"finite-difference gradient check, float64, h=1e-5, tolerance {tol:.0e}, "
        f"backend {get_backend(backend).name}",
        file=out,
    )
    print("error = max|analytic - numeric| / max(max|analytic|, max|numeric|, 1e-3 * largest "
          "gradient of the check)", file=out)
    print("", file=out)
    print(f"{'check':<{width}}  " + "  ".join(f"{c:>8}" for c in _COLUMNS) + "  result",
          file=out)
    results = []
    for name, layer, x in cases:
        res = check_layer(layer, x, name=name, seed=seed)
        # Sequential networks name their parameters "0.W", "1.gamma": show the worst per kind.
        shown: dict[str, float] = {}
        for k, v in res.errors.items():
            kind = "d" + k.rsplit(".", 1)[-1] if "." in k else k
            shown[kind] = max(shown.get(kind, 0.0), v)
        print(_row(name, shown, "PASS" if res.passed(tol) else "FAIL", width), file=out)
        results.append(res)
    failed = [r.name for r in results if not r.passed(tol)]
    worst = max(r.max_error for r in results)
    print("", file=out)
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} checks: {', '.join(failed)}", file=out)
    else:
        print(f"all {len(results)} checks passed; largest error {worst:.1e}", file=out)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm gradcheck``; exit code 1 when a check fails."""
    parser = argparse.ArgumentParser(
        prog="batchnorm gradcheck",
        description="Check the layers' gradients against central finite differences (float64).",
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0,
                        help="seed of inputs and projections")
    parser.add_argument("--backend", default=None, choices=["auto", "numpy", "numba"],
                        help="compute backend (default: $BATCHNORM_BACKEND or auto)")
    parser.add_argument("--tolerance", type=finite_float(0.0), default=TOLERANCE,
                        help=f"largest relative error that passes (default {TOLERANCE:g})")
    args = parser.parse_args(argv)
    results = run(seed=args.seed, backend=args.backend, tol=args.tolerance)
    return 0 if all(r.passed(args.tolerance) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
