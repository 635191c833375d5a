"""Finite differences and state snapshots for the tests."""

from __future__ import annotations

import copy
import zlib

import numpy as np


def seed_of(params) -> int:
    """A seed that depends on a test's parameters and is the same in every process (``hash`` of
    a string is not)."""
    return zlib.crc32(repr(params).encode())


def numerical_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar ``f()`` with respect to ``x`` (changed in place
    and restored)."""
    g = np.zeros(x.shape, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the larger of max |a| and max |b|."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-12)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def snapshot(obj) -> dict:
    """A deep copy of an object's attributes, for 'nothing changed' checks."""
    return {k: copy.deepcopy(v) for k, v in vars(obj).items() if k != "backend"}


def assert_same_state(before: dict, obj) -> None:
    after = snapshot(obj)
    assert before.keys() == after.keys()
    for k, v in before.items():
        w = after[k]
        if isinstance(v, np.ndarray) or isinstance(w, np.ndarray):
            assert type(v) is type(w), k
            np.testing.assert_array_equal(v, w, err_msg=k)
            assert v.dtype == w.dtype, k
        elif hasattr(v, "__dataclass_fields__"):
            # caches: compare identity of content via their arrays
            for f in v.__dataclass_fields__:
                a, b = getattr(v, f), getattr(w, f)
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, b, err_msg=f"{k}.{f}")
                elif f != "backend":
                    assert a == b, f"{k}.{f}"
        else:
            assert v == w, k
