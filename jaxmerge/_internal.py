"""The one module through which jaxmerge's subpackages reach into each other's internals.

``io`` (the statistics store), ``scale`` (the merge in layer groups, the device-parallel
solves), the tests and the benchmarks use these pieces of the pipeline in ``model`` (and the
tests and the memory benchmark the compiled accumulation step of ``scale``); importing them from
here, under these names, keeps every such crossing in one visible place.
"""

from .io.provenance import tree_fingerprint
from .model.collect import _add_normalized as add_normalized
from .model.collect import _checked_ids as checked_ids
from .model.collect import _finished as finished_task
from .model.collect import _peek as peek
from .model.collect import _progress as progress_bar
from .model.collect import _zero_sums as zero_sums
from .model.merge import _run as merge_in_passes
from .model.options import _Options as SolveOptions
from .model.plan import _SHARED as shared_programs
from .model.plan import PLANS as plan_cache
from .model.plan import _default_dtype as default_dtype
from .model.plan import _Plan as Plan
from .model.plan import _plan as plan_of
from .model.solve import _from_structure as structure_options
from .model.solve import _solve_structured as solve_structured
from .model.solve import _structure as solve_structure
from .scale.mesh import _local_mesh as local_mesh
from .scale.sharded import _accumulate as sharded_step

__all__ = [
    "tree_fingerprint",
    "add_normalized",
    "checked_ids",
    "finished_task",
    "peek",
    "merge_in_passes",
    "progress_bar",
    "zero_sums",
    "default_dtype",
    "plan_of",
    "plan_cache",
    "shared_programs",
    "Plan",
    "SolveOptions",
    "solve_structure",
    "solve_structured",
    "structure_options",
    "local_mesh",
    "sharded_step",
]
