"""``batchnorm gradcheck``: compare every layer's backward with central finite differences.

Each check projects the layer's output on a fixed random array ``r`` (a scalar loss
``L = sum(r * layer(x))``), so ``backward(r)`` must give ``dL/dx`` and the parameter gradients.
Central differences in float64 with ``h = 1e-5`` are accurate to about 1e-10 relative, so a
correct backward pass shows errors far below the 1e-6 tolerance, and a wrong one far above it.

The helpers (:func:`numerical_gradient`, :func:`relative_error`, :func:`check_layer`) are also
used by the test suite.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CheckResult", "check_layer", "default_cases", "main", "numerical_gradient",
           "relative_error"]

TOLERANCE = 1e-6
# Relative to the largest gradient of a check, below which an array counts as zero.
FLOOR = 1e-3


def numerical_gradient(f: Callable[[], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central-difference gradient of a scalar function with respect to the array `x`.

    Parameters
    ----------
    f : callable with no arguments returning a float
        Reads `x` (and whatever else it closes over) each time it is called.
    x : ndarray, float64, any memory order
        Changed in place, one element at a time, and restored exactly.
    h : float, default 1e-5
        Step.

    Returns
    -------
    grad : ndarray of the shape of `x`, float64
        ``(f(x + h e_i) - f(x - h e_i)) / (2 h)`` for every element ``i``.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    for i in np.ndindex(x.shape):  # by index, so Fortran-ordered and strided arrays work too
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2.0 * h)
    return grad


def relative_error(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """``max |a - b|`` relative to the larger of ``max |a|``, ``max |b|`` and `floor`.

    Scaling by the largest entry, not entry by entry, keeps entries that are nearly zero in both
    (common: batch norm's ``dx`` sums to zero per feature) from dominating with pure noise.
    `floor` does the same for a whole array that is zero (the bias of an affine layer followed
    by batch norm gets no gradient): its numerical noise is measured against `floor`.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"expected arrays of the same shape, got {a.shape} and {b.shape}")
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), floor)
    if scale == 0.0:
        return 0.0
    return float(np.abs(a - b).max() / scale)


@dataclass
class CheckResult:
    """Relative errors of one check: ``errors["dx"]``, ``errors["dgamma"]``, ...

    Attributes
    ----------
    name : str
    errors : dict of str to float
    """

    name: str
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def passed(self, tol: float = TOLERANCE) -> bool:
        # NaN compares False, so a NaN error fails.
        return all(e <= tol for e in self.errors.values())


def check_layer(
    layer: Any,
    x: np.ndarray,
    *,
    name: str | None = None,
    seed: int = 0,
    h: float = 1e-5,
    check_params: bool = True,
) -> CheckResult:
    """Finite-difference check of ``layer.backward`` for input `x`.

    Parameters
    ----------
    layer : object with ``forward(x)``, ``backward(dy)`` and optionally ``params``/``grads``
        Put it in the mode to check (``train()`` or ``eval()``) first. Its parameters must be
        float64 arrays; they are perturbed in place and restored.
    x : ndarray, float64
    name : str, optional
        Label of the result; default ``repr(layer)``.
    seed : int
        Seed of the projection ``r``.
    h : float
        Finite-difference step.
    check_params : bool, default True
        Also check every gradient in ``layer.grads``.

    Returns
    -------
    CheckResult
        Keys ``"dx"`` and ``"d" + param_name`` for each parameter: the
        :func:`relative_error` of each gradient, with a floor of ``FLOOR`` (1e-3) times the
        largest analytic gradient of the check.
    """
    x = np.array(x, dtype=np.float64)
    out = np.asarray(layer.forward(x))
    # A stream of its own: with r drawn like x, r could be parallel to the output at x, where
    # sum(r * BN(x)) is stationary and every gradient vanishes.
    r = np.random.default_rng([seed, 0x5EED]).standard_normal(out.shape)
    analytic = {"dx": np.asarray(layer.backward(r.copy()), dtype=np.float64)}
    params = dict(getattr(layer, "params", {})) if check_params else {}
    grads = getattr(layer, "grads", {})
    for k in params:
        analytic["d" + k] = np.array(grads[k], dtype=np.float64)

    def loss() -> float:
        return float(np.sum(r * layer.forward(x)))

    numeric = {"dx": numerical_gradient(loss, x, h)}
    for k, p in params.items():
        if p.dtype != np.float64:
            raise TypeError(f"expected float64 parameter {k!r}, got {p.dtype}")
        numeric["d" + k] = numerical_gradient(loss, p, h)
    # Arrays that are zero by design are judged against the check's gradient scale.
    floor = FLOOR * max(np.abs(v).max(initial=0.0) for v in analytic.values())
    result = CheckResult(name or repr(layer))
    for k in analytic:
        result.errors[k] = relative_error(analytic[k], numeric[k], floor)
    return result


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
        from .nn import SoftmaxCrossEntropy

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
    from .layers import BatchNorm, BatchNormalization
    from .nn import (
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
    from .backends import get_backend

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
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and projections")
    parser.add_argument("--backend", default=None, choices=["auto", "numpy", "numba"],
                        help="compute backend (default: $BATCHNORM_BACKEND or auto)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest relative error that passes (default {TOLERANCE:g})")
    args = parser.parse_args(argv)
    results = run(seed=args.seed, backend=args.backend, tol=args.tolerance)
    return 0 if all(r.passed(args.tolerance) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
