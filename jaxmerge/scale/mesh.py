"""The meshes scale-out runs on: a default one-axis mesh over the local devices, checks,
placement."""

import functools

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@functools.cache
def _local_mesh(axis: str) -> Mesh:
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), (axis,), devices=devices)


def _on_mesh(tree, mesh: Mesh, specs, axis: str):
    """Lay ``tree`` out on ``mesh`` as ``specs`` (a prefix of it) before ``shard_map``.

    ``shard_map`` reshards inputs on ``Auto`` axes itself; on ``Explicit`` axes the arrays' types
    must already carry the sharding, which ``jax.reshard`` gives them.
    """
    explicit = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis]
    if explicit != jax.sharding.AxisType.Explicit:
        return tree
    return jax.tree.map(
        lambda spec, t: jax.reshard(t, NamedSharding(mesh, spec)),
        specs,
        tree,
        is_leaf=lambda x: isinstance(x, P),
    )


def _mesh_for(mesh: Mesh | None, axis: str, caller: str) -> Mesh:
    if mesh is None:
        return _local_mesh(axis)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{caller}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(
            f"{caller}: the mesh has axes {mesh.axis_names}, not {axis!r}; pass axis= one of them."
        )
    return mesh
