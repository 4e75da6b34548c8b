"""Statistics of several processes added with one all-reduce (:func:`allreduce_stats`)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["allreduce_stats"]


@functools.cache
def _process_mesh() -> Mesh:
    """One device per process, on an axis named ``processes``."""
    firsts = {}
    for dev in jax.devices():
        firsts.setdefault(dev.process_index, dev)
    devices = np.array([firsts[i] for i in sorted(firsts)])
    return Mesh(devices, ("processes",))


@functools.partial(jax.jit, static_argnames="mesh")
def _psum_processes(tree, *, mesh):
    return jax.shard_map(
        lambda t: jax.lax.psum(jax.tree.map(lambda a: a[0], t), "processes"),
        mesh=mesh,
        in_specs=P("processes"),
        out_specs=P(),
    )(tree)


def allreduce_stats(stats: Any) -> Any:
    """Add statistics over all processes: every process gets ``Σ_processes stats``.

    Call it on every process (after ``jax.distributed.initialize``) with statistics of the same
    structure, shapes and dtypes, each accumulated from that process's own calibration rows
    (e.g. with :func:`sharded_update_stats` on the default, process-local mesh). The sum runs on
    the devices (one per process) as a ``psum`` collective; every process receives the same
    result. Statistics accumulated on a mesh spanning all processes are already global: do not
    reduce them again.

    Args:
        stats: a :class:`LayerStats` or any pytree of them (e.g. ``{path: LayerStats}``).

    Returns:
        The same structure holding the sums, on this process's first device.

    Raises:
        ValueError: the statistics are already global arrays spanning several processes.

    Examples:
        With one process the statistics are returned as they are:

        >>> import jax.numpy as jnp
        >>> from jaxmerge import init_stats, update_stats
        >>> s = update_stats(init_stats(1, 1, 1), jnp.ones((2, 1)), jnp.ones((2, 1)), 0)
        >>> allreduce_stats({"layer": s})["layer"].count.tolist()
        [2.0]
    """
    leaves = jax.tree.leaves(stats)
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(
                "allreduce_stats: the statistics are global arrays over several processes "
                "(accumulated on a multi-process mesh), hence already reduced."
            )
    if jax.process_count() == 1:
        return stats
    mesh = _process_mesh()
    (device,) = [d for d in mesh.devices if d.process_index == jax.process_index()]
    sharding = NamedSharding(mesh, P("processes"))

    def as_global(a):
        local = jax.device_put(jnp.asarray(a)[None], device)
        return jax.make_array_from_single_device_arrays(
            (mesh.size,) + local.shape[1:], sharding, [local]
        )

    summed = _psum_processes(jax.tree.map(as_global, stats), mesh=mesh)
    return jax.tree.map(lambda a: a.addressable_data(0), summed)
