"""Many independent systems solved in one program: a loop on CPU, batched elsewhere.

jaxlib 0.10's CPU LAPACK kernels (``eigh``, ``cholesky``, ``svd``) split a batched call over
XLA's intra-op thread pool and wait for the parts on the pool thread that runs them. When as
many batched decompositions are scheduled at once as the pool has threads (independent solves in
one compiled program, or both branches of a ``lax.cond`` under ``vmap``), every thread waits for
parts that no thread is left to run, and the program hangs. On 2 threads, four independent
``vmap``-ed eigendecompositions of four 200 × 200 matrices in one ``jit`` hang in about a third of
runs; the same work as :func:`jax.lax.map` never does and takes no longer
(``tests/test_systems.py`` checks the programs jaxmerge compiles for batched decompositions).

:func:`map_systems` is how jaxmerge solves a stack of independent systems: on CPU a
:func:`jax.lax.map` (one unbatched decomposition at a time, and each ``lax.cond`` fallback stays
lazy), on GPU and TPU a :func:`jax.vmap` (batched solver kernels). The choice is made when the
program is lowered for its platform (:func:`jax.lax.platform_dependent`).
"""

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

__all__ = ["map_systems"]


def map_systems(fn: Callable[..., Any], *stacked: Any) -> Any:
    """``fn`` applied to every slice along the leading axis of ``stacked`` (see module docs).

    Args:
        fn: one system's solve, taking one slice of each argument.
        *stacked: pytrees whose leaves share a leading axis (``None`` leaves are passed through).

    Returns:
        ``fn``'s outputs stacked along a new leading axis, as :func:`jax.vmap` returns them.

    Examples:
        >>> import jax.numpy as jnp
        >>> map_systems(lambda h, f: jnp.linalg.solve(h, f), 2 * jnp.ones((3, 1, 1)),
        ...             jnp.ones((3, 1))).ravel().tolist()
        [0.5, 0.5, 0.5]
    """

    def loop(*args):
        return lax.map(lambda xs: fn(*xs), args)

    return lax.platform_dependent(*stacked, cpu=loop, default=jax.vmap(fn))
