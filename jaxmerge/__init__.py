"""jaxmerge: merge fine-tuned JAX/Flax models by output-space projection.

For every layer, jaxmerge picks the merged weights that best reproduce each fine-tuned model's
outputs on a small calibration set: a convex quadratic programme over residual updates, solved in
closed form from second-moment statistics with a Cholesky factorisation.
"""

# Statistics
# Bases and the single-layer solve
from ._bases import Basis as Basis
from ._bases import Custom as Custom
from ._bases import LowRank as LowRank
from ._energy import energy_fraction as energy_fraction
from ._solve import SolveStatus as SolveStatus
from ._solve import psd_solve as psd_solve
from ._solve_layer import LayerSolution as LayerSolution
from ._solve_layer import SolveError as SolveError
from ._solve_layer import solve_layer as solve_layer
from ._stats import LayerStats as LayerStats
from ._stats import combine_stats as combine_stats
from ._stats import init_stats as init_stats
from ._stats import layer_stats as layer_stats
from ._stats import normalize_stats as normalize_stats
from ._stats import update_stats as update_stats

# Whole Flax models (merge, reports)

# Baselines

# Devices and hosts

# Checkpoints and interchange

__version__ = "0.1.0"
