"""Shared fixtures."""

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
    """Run a test with 64-bit JAX types."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
