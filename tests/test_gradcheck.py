"""The finite-difference helpers and the ``batchnorm gradcheck`` command."""

from __future__ import annotations

import io

import numpy as np
import pytest

from batchnorm.apps import gradcheck
from batchnorm.apps.gradcheck import main
from batchnorm.gradcheck import check_layer, numerical_gradient, relative_error
from batchnorm.nn import Linear


def test_numerical_gradient_of_a_known_function():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    before = x.copy()
    g = numerical_gradient(lambda: float(np.sum(x**3)), x)
    np.testing.assert_allclose(g, 3 * before**2, rtol=1e-9)
    np.testing.assert_array_equal(x, before)  # restored exactly


@pytest.mark.parametrize("layout", ["F", "strided"])
def test_numerical_gradient_of_fortran_and_strided_arrays(layout):
    base = np.arange(1.0, 17.0).reshape(4, 4) / 4
    x = np.asfortranarray(base) if layout == "F" else base[::2, ::2]
    before = x.copy()
    g = numerical_gradient(lambda: float(np.sum(x**3)), x)
    np.testing.assert_allclose(g, 3 * before**2, rtol=1e-7)
    np.testing.assert_array_equal(x, before)


def test_relative_error():
    assert relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.2])) == pytest.approx(0.2 / 2.2)
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.zeros(2), np.array([1e-10, 0.0]), floor=1e-3) == pytest.approx(1e-7)
    with pytest.raises(ValueError, match="same shape"):
        relative_error(np.zeros(2), np.zeros(3))


class BrokenLinear(Linear):
    """A deliberately wrong backward: the check must catch it."""

    def backward(self, dy):
        dx = super().backward(dy)
        self.db = 1.01 * self.db
        return dx


def test_check_layer_catches_a_wrong_gradient():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    good = check_layer(Linear(3, 2, rng=np.random.default_rng(1)), x)
    bad = check_layer(BrokenLinear(3, 2, rng=np.random.default_rng(1)), x)
    assert good.passed() and good.max_error < 1e-8
    assert not bad.passed()
    assert bad.errors["db"] > 1e-3 and bad.errors["dW"] < 1e-8


def test_command_passes_and_prints_every_check():
    out = io.StringIO()
    results = gradcheck.run(seed=0, backend="numpy", out=out)
    text = out.getvalue()
    assert all(r.passed() for r in results)
    assert "FAIL" not in text and text.count("PASS") == len(results)
    for name in ("BatchNorm (N,C,H,W) eval", "BatchNormalization (N,D) train", "nn.Conv2d",
                 "nn.MaxPool2d", "nn.mlp with batch norm"):
        assert name in text
    assert "dgamma" in text and "dbeta" in text


def test_main_exit_codes(capsys):
    assert main(["--backend", "numpy"]) == 0
    assert "all" in capsys.readouterr().out
    # An impossible tolerance fails every check with a nonzero error.
    assert main(["--backend", "numpy", "--tolerance", "1e-30"]) == 1
    assert "FAILED" in capsys.readouterr().out
