"""A tiny model, its checkpoints and calibration data for the command-line tests.

Configuration files name these as ``cli_fixtures:model`` etc. with ``pythonpath`` pointing at
this directory. ``JAXMERGE_TEST_BATCH_DELAY`` (seconds) slows every calibration batch down, so a
test can kill a run while it is accumulating.
"""

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

N_IN, TASKS, BATCHES, ROWS = 5, 2, 6, 8


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6)(x))
        return nn.Dense(3)(h)


def model():
    return TinyMLP()


class Offset(nn.Module):
    """A learned offset: no registered layer kind, so its parameter takes the fallback rule."""

    @nn.compact
    def __call__(self, x):
        return x + self.param("shift", nn.initializers.zeros, (x.shape[-1],))


class OffsetMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Offset()(TinyMLP()(x))


def offset_model():
    return OffsetMLP()


def make_offset_params():
    """Base and ``TASKS`` fine-tunes of :class:`OffsetMLP` (every leaf changed)."""
    base = OffsetMLP().init(jax.random.key(0), jnp.ones((1, N_IN)))["params"]
    return base, [jax.tree.map(lambda a, k=k: a + 0.1 * (k + 1), base) for k in range(TASKS)]


def _batches(seed: int, count: int):
    delay = float(os.environ.get("JAXMERGE_TEST_BATCH_DELAY", "0"))
    rng = np.random.default_rng(seed)
    data = [rng.normal(size=(ROWS, N_IN)).astype(np.float32) for _ in range(count)]
    for batch in data:
        time.sleep(delay)
        yield batch


class _Task:
    """Re-iterable batches of one task (a generator would be single-use)."""

    def __init__(self, seed: int, count: int):
        self.seed, self.count = seed, count

    def __iter__(self):
        return _batches(self.seed, self.count)


def calibration():
    return [_Task(100 + k, BATCHES) for k in range(TASKS)]


def calibration_head():
    """The first two batches of every task (with :func:`calibration_tail`: the whole)."""
    return [list(task)[:2] for task in calibration()]


def calibration_tail():
    return [list(task)[2:] for task in calibration()]


def heldout():
    return [_Task(200 + k, 2) for k in range(TASKS)]


def make_params():
    """Base and ``TASKS`` fine-tuned parameter trees (fine-tunes are random perturbations)."""
    base = TinyMLP().init(jax.random.key(0), jnp.ones((1, N_IN)))["params"]
    finetuned = []
    for k in range(TASKS):
        leaves, treedef = jax.tree.flatten(base)
        keys = jax.random.split(jax.random.key(10 + k), len(leaves))
        noisy = [
            p + 0.3 * jax.random.normal(key, p.shape) for p, key in zip(leaves, keys, strict=True)
        ]
        finetuned.append(jax.tree.unflatten(treedef, noisy))
    return base, finetuned
