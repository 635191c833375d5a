"""``batchnorm bench``'s layer cases (smoke runs: no timing is asserted) and the book's
algorithm the ``book`` case compares against."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchnorm import BatchNormalization, available_backends
from batchnorm.apps import bench
from batchnorm.apps.bench import BOOK_EPS, BOOK_MOMENTUM, BookReference


def _pair(rng, d: int):
    gamma, beta = rng.uniform(0.5, 1.5, d), rng.standard_normal(d)
    mean, var = rng.standard_normal(d), rng.uniform(0.5, 2.0, d)
    ours = BatchNormalization(gamma.copy(), beta.copy(), BOOK_MOMENTUM, mean.copy(), var.copy(),
                              BOOK_EPS, backend="numpy")
    ref = BookReference(gamma.copy(), beta.copy(), BOOK_MOMENTUM, mean.copy(), var.copy(),
                        BOOK_EPS)
    return ours, ref


def test_book_reference_computes_what_the_book_layer_computes(rng):
    # The baseline of the `book` case must be a correct batch norm, or the ratio means nothing.
    x = 3.0 + 2.0 * rng.standard_normal((20, 7))
    dy = rng.standard_normal((20, 7))
    ours, ref = _pair(rng, 7)
    for _ in range(2):  # two steps: the running averages compound
        np.testing.assert_allclose(ref.forward(x, train_flg=True),
                                   ours.forward(x, train_flg=True), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ref.backward(dy), ours.backward(dy), rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(ref.dgamma, ours.dgamma, rtol=1e-12)
        np.testing.assert_allclose(ref.dbeta, ours.dbeta, rtol=1e-12)
        np.testing.assert_allclose(ref.running_mean, ours.running_mean, rtol=1e-12)
        np.testing.assert_allclose(ref.running_var, ours.running_var, rtol=1e-12)
    np.testing.assert_allclose(ref.forward(x, train_flg=False),
                               ours.forward(x, train_flg=False), rtol=1e-12, atol=1e-12)


def test_book_reference_backward_matches_finite_differences(rng):
    from batchnorm.gradcheck import numerical_gradient

    x = rng.standard_normal((6, 4))
    r = rng.standard_normal((6, 4))
    _, ref = _pair(rng, 4)
    ref.forward(x, train_flg=True)
    dx = ref.backward(r.copy())
    numeric = numerical_gradient(lambda: float(np.sum(r * ref.forward(x, train_flg=True))), x)
    np.testing.assert_allclose(dx, numeric, rtol=0, atol=1e-7)


def _run(capsys, *args: str) -> dict:
    rc = bench.main(["--repeat", "2", "--no-first-call", "--no-progress", "--json", *args])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_layer_and_book_cases(capsys):
    impls = [b for b in ("numpy", "numba") if b in available_backends()]
    d = _run(capsys, "--cases", "layer,book", "--impls", ",".join(impls))
    got = [(r["case"], r["mode"]) for r in d["results"]]
    assert got == [("layer", "train"), ("layer", "infer"), ("book", "train"), ("book", "infer")]
    for r in d["results"]:
        want = set(impls) | ({"book"} if r["case"] == "book" else set())
        assert set(r["median_ms"]) == want
        assert all(v > 0 for v in r["median_ms"].values())
    layer, book = d["results"][0], d["results"][2]
    assert layer["bytes"] == 8 * 64 * 256 * 4  # float32
    assert book["bytes"] == 8 * 100 * 100 * 8  # float64
    assert layer["ratio_fast_book"] is None
    assert (book["ratio_fast_book"] is not None) == ("numba" in impls)
    text = bench.table(d["results"], d["copy_gbs"])
    assert "| book ms | numba/book |" in text
    assert "| layer BatchNorm(256) (64,256) | training fwd+bwd |" in text


def test_layer_and_book_cases_against_torch(capsys):
    pytest.importorskip("torch")
    d = _run(capsys, "--cases", "small,layer,book", "--impls", "numpy,torch")
    for r in d["results"]:
        assert "torch" in r["median_ms"] and "numpy" in r["median_ms"]
    # the kernel case also has the fused BN+ReLU mode (a default mode since the fused layer)
    assert [r["case"] for r in d["results"]] == ["small"] * 3 + ["layer"] * 2 + ["book"] * 2


def test_torch_layer_timed_callable_computes_batch_norm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    case = bench.CASES["layer"]
    x = rng.standard_normal(case.shape).astype(np.float32)
    dy = rng.standard_normal(case.shape).astype(np.float32)
    c = case.shape[1]
    g, b = np.full(c, 2.0, np.float32), np.full(c, 0.5, np.float32)
    mean, var = np.zeros(c, np.float32), np.ones(c, np.float32)
    dx = bench._torch_layer(case, "train", x, dy, g, b, mean, var)()
    ours = bench._ours_layer(case, "train", "numpy", x, dy, g, b, mean, var)()
    np.testing.assert_allclose(dx.numpy(), ours, rtol=1e-3, atol=1e-4)
    y = bench._torch_layer(case, "infer", x, dy, g, b, mean, var)()
    assert isinstance(y, torch.Tensor) and not y.requires_grad
    np.testing.assert_allclose(y.numpy(), 2.0 * x / np.sqrt(1 + 1e-5) + 0.5, rtol=1e-5,
                               atol=1e-5)
