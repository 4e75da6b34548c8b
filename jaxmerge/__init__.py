"""jaxmerge: merge fine-tuned JAX/Flax models by output-space projection.

For every layer, jaxmerge picks the merged weights that best reproduce each fine-tuned model's
outputs on a small calibration set: a convex quadratic programme over residual updates, solved in
closed form from second-moment statistics with a Cholesky factorisation.
"""

# ruff: noqa: I001  (imports are grouped by section, not sorted across sections)

# Statistics
from .core.stats import LayerStats as LayerStats
from .core.stats import combine_stats as combine_stats
from .core.stats import init_stats as init_stats
from .core.stats import layer_stats as layer_stats
from .core.stats import normalize_stats as normalize_stats
from .core.stats import update_stats as update_stats

# Bases and the single-layer solve
from .core.bases import Basis as Basis
from .core.bases import Custom as Custom
from .core.bases import LowRank as LowRank
from .core.energy import energy_fraction as energy_fraction
from .core.psd import SolveStatus as SolveStatus
from .core.psd import psd_solve as psd_solve
from .core.qp import LayerSolution as LayerSolution
from .core.qp import SolveError as SolveError
from .core.qp import solve_layer as solve_layer

# Whole Flax models (merge, reports)
from .kinds import EmbedStats as EmbedStats
from .kinds import LayerSpec as LayerSpec
from .model import GroupStats as GroupStats
from .model import CollectorState as CollectorState
from .model import StatsCollector as StatsCollector
from .model import collect_stats as collect_stats
from .model import stats_collector as stats_collector
from .model import merge as merge
from .model import solve_stats as solve_stats
from .model.report import LayerReport as LayerReport
from .model.report import MergeReport as MergeReport

# Layer kinds (what the merge knows of each kind of layer; register your own)
from .kinds import AffineKind as AffineKind
from .kinds import CallShape as CallShape
from .kinds import EinsumCall as EinsumCall
from .kinds import EinsumKind as EinsumKind
from .kinds import GroupedStats as GroupedStats
from .kinds import LayerKind as LayerKind
from .kinds import kind_of as kind_of
from .kinds import kinds as kinds
from .kinds import TiedStats as TiedStats
from .kinds import register_embedding as register_embedding
from .kinds import register_kind as register_kind
from .kinds import register_layer as register_layer
from .kinds import register_norm as register_norm
from .kinds.registry import linen_kind as linen_kind
from .kinds.registry import nnx_kind as nnx_kind
from .kinds.registry import qualified_name as qualified_name

# Baselines
from .methods.dare import dare as dare
from .methods.dare import dare_masks as dare_masks
from .methods.dare import dare_task_vectors as dare_task_vectors
from .methods.arithmetic import soup as soup
from .methods.arithmetic import task_arithmetic as task_arithmetic
from .methods.arithmetic import task_vectors as task_vectors
from .methods.ties import ties as ties
from .methods.ties import ties_task_vectors as ties_task_vectors
from .methods.fisher import empirical_fisher as empirical_fisher
from .methods.fisher import fisher_average as fisher_average
from .methods.fisher import fisher_merge as fisher_merge
from .methods.reweighted import BasisFactory as BasisFactory
from .methods.reweighted import dare_basis as dare_basis
from .methods.reweighted import dare_layer as dare_layer
from .methods.reweighted import regmean_layer as regmean_layer
from .methods.reweighted import ties_basis as ties_basis
from .methods.reweighted import ties_layer as ties_layer

# Devices and hosts
from .scale.hosts import allreduce_stats as allreduce_stats
from .scale.sharded import sharded_update_stats as sharded_update_stats
from .scale.sharded import sharded_update_stats_by_path as sharded_update_stats_by_path
from .scale.devices import solve_layers as solve_layers
from .scale.memory import accumulation_bytes as accumulation_bytes
from .scale.memory import merge_in_groups as merge_in_groups
from .scale.memory import plan_layer_groups as plan_layer_groups
from .scale.memory import stats_bytes as stats_bytes

# Checkpoints and interchange
from .io.resumable import accumulate_resumable as accumulate_resumable
from .io.checkpoint import load_params as load_params
from .io.checkpoint import save_params as save_params
from .io.store import SavedStats as SavedStats
from .io.store import combine_saved_stats as combine_saved_stats
from .io.store import load_stats as load_stats
from .io.store import save_stats as save_stats
from .io.hf import load_bert_safetensors as load_bert_safetensors
from .io.hf import save_bert_safetensors as save_bert_safetensors
from .io.hf import load_llama_safetensors as load_llama_safetensors
from .io.hf import save_llama_safetensors as save_llama_safetensors
from .io.gguf import load_llama_gguf as load_llama_gguf

# Command line and statistics artifacts
from .io.model_stats import ModelStats as ModelStats
from .io.model_stats import accumulate_model_stats as accumulate_model_stats
from .io.model_stats import combine_model_stats as combine_model_stats
from .io.model_stats import load_model_stats as load_model_stats
from .io.model_stats import save_model_stats as save_model_stats

# Errors (SolveError is imported above, with solve_layer); all show as jaxmerge.<name>
from .cli.config import ConfigError as ConfigError
from .model import OptionPatternError as OptionPatternError
from .model import UnsolvedParametersError as UnsolvedParametersError

# Warnings (all show as jaxmerge.<name>)
from .model import UnsolvedParametersWarning as UnsolvedParametersWarning


__version__ = "0.1.0"
