"""Shared fixtures: every core test runs once per available backend."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm import available_backends

BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend that can be loaded here ("numpy", and "numba" where installed)."""
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
