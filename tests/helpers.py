"""Seeds, finite differences (the library's own, from batchnorm.gradcheck) and state snapshots
for the tests."""

from __future__ import annotations

import copy
import zlib

import numpy as np

from batchnorm.gradcheck import numerical_gradient as numerical_grad  # noqa: F401
from batchnorm.gradcheck import relative_error as rel_error  # noqa: F401


def seed_of(params) -> int:
    """A seed that depends on a test's parameters and is the same in every process (``hash`` of
    a string is not)."""
    return zlib.crc32(repr(params).encode())


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
