"""The whole-model merge as named stages, one module each, data flowing one way:

``plan`` (trace the model once: its layers, their shared-input groups, the compiled programs it
owns) → ``collect`` (calibration statistics per group) → ``solve`` (each group through its layer
kind, the report) → fold (``trees``: the merged leaves back into the base's containers). ``merge``
dispatches over the parallel algorithm and the ``sequential`` one; ``options`` resolves and
checks the per-path options. The public names are re-exported by :mod:`jaxmerge`.
"""

from .collect import CollectorState, GroupStats, StatsCollector, collect_stats, stats_collector
from .merge import merge
from .options import OptionPatternError
from .solve import solve_stats
from .unsolved import UnsolvedParametersError, UnsolvedParametersWarning

__all__ = [
    "CollectorState",
    "GroupStats",
    "OptionPatternError",
    "StatsCollector",
    "UnsolvedParametersError",
    "UnsolvedParametersWarning",
    "collect_stats",
    "merge",
    "solve_stats",
    "stats_collector",
]
