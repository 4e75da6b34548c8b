"""Scale-out: sharded statistics, device-parallel solves, reductions across processes, and the
merge in layer groups within a memory budget.

Statistics are sums (see :mod:`jaxmerge.core.stats`), so spreading them is plain arithmetic:

* **Data parallel accumulation.** The calibration rows of a batch are split over the ``axis``
  (default ``"data"``) of a mesh; every device adds its rows to private sums with the same kernel
  as :func:`update_stats`, and ``jax.lax.psum`` over the axis adds the devices' sums. A batch whose
  row count does not divide the axis size is padded with rows of mask 0, which add exactly nothing.
* **Device-parallel solves.** Layer solves are independent. Each layer is a one-member group of the
  merge's own group solve (a dense layer, solved through its kind with :func:`solve_layer`); groups
  with the same structure (the key of the merge's compiled group solve: kinds, shapes, static
  options) are stacked, the stack is padded to a multiple of the axis size and split over the axis,
  and every device solves its slice inside ``jax.shard_map``: the ``pmap`` pattern written with
  current JAX. Small systems (scalar, diagonal and custom bases) are batched on GPU and TPU and
  solved one by one on CPU, where jaxlib's batched decompositions can deadlock
  (:mod:`jaxmerge.core.systems`). Full and low-rank systems run one after the other on their
  device (``lax.map``): under ``vmap`` the
  solver's fallbacks (``lax.cond``) turn into selects that compute every branch, which would pay an
  eigendecomposition, several times the cost of the Cholesky factorisation, for every layer.
* **Several hosts.** After ``jax.distributed.initialize``, either accumulate on a mesh that spans
  every process (inputs are then global ``jax.Array``), or accumulate each process's rows on its
  local devices and add the processes' statistics with :func:`allreduce_stats`. Every process ends
  with the same statistics and, solving the same statistics, the same merge.

Meshes come from the caller; by default a one-axis mesh over ``jax.local_devices()``. Both
``jax.sharding.AxisType.Explicit`` and ``Auto`` meshes work; extra mesh axes hold replicas.

Modules: :mod:`.mesh` (default meshes, placing trees), :mod:`.sharded` (data-parallel
accumulation), :mod:`.hosts` (:func:`allreduce_stats`), :mod:`.devices` (:func:`solve_layers`),
:mod:`.memory` (the memory bound and the merge in layer groups).
"""
