"""A catalogue of bad inputs: each gives a clear error that names the problem and the place.

Two tables. ``CASES`` (the Python API): every row has an id, the call (a function of a shared
context of tiny, valid inputs and a temporary directory), the expected exception type and a
regular expression the message must match. ``CLI_CASES`` (the ``jaxmerge`` command): the
arguments, the configuration file, the expected exit code and a regular expression over stderr.
Each regex names both *what* is wrong (a shape, a dtype, NaN, an unknown name) and *where* (the
parameter path, argument, layer, task, option, file or configuration key), so a message that only
says "invalid input" fails. Every row also checks that the input files it was given are unchanged.
Known poor errors are rows marked ``xfail`` (strict): fixing one makes its row fail until the mark
is removed.
"""

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import cli_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from models import VOCAB, LinenMLP, LinenTransformer, finetunes, token_batch
from safetensors.numpy import load_file, save_file

import jaxmerge as jm
from jaxmerge.cli import main
from jaxmerge.models.bert import BertConfig, BertModel
from jaxmerge.models.llama import LlamaConfig, LlamaForCausalLM

# Reading a corrupted Orbax checkpoint, Orbax's metadata reader leaves a tensorstore callback that
# fires on its closed asyncio event loop ("Event loop is closed", reported as unraisable, possibly
# during the next test). jaxmerge still raises its own clear error; the noise is Orbax's.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# ---- shared context -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, m, k = 3, 2, 2
    xs = [rng.normal(size=(6, n)).astype(np.float32) for _ in range(k)]
    base = (rng.normal(size=(n, m)).astype(np.float32), np.zeros(m, np.float32))
    fts = [(base[0] + 0.1 * rng.normal(size=(n, m)).astype(np.float32), base[1] + 0.1) for _ in xs]
    ys = [x @ w + b for x, (w, b) in zip(xs, fts, strict=True)]
    stats = jm.layer_stats(xs, ys)

    model = LinenMLP(hidden=6, out=2)
    cal_x = [jnp.asarray(rng.normal(size=(8, 4)), jnp.float32) for _ in range(k)]
    params = model.init(jax.random.key(0), cal_x[0])["params"]
    model_fts = finetunes(params, k)
    merge_stats = jm.collect_stats(model, model_fts, [[x] for x in cal_x], progress=False)

    files = tmp_path_factory.mktemp("files")
    saved_params = jm.save_params(files / "params", {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)})
    saved_stats = jm.save_stats(files / "stats", {"dense": stats}, tasks=["a", "b"])
    cfg = BertConfig.tiny()
    shapes = jax.eval_shape(BertModel(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    bert = jm.save_bert_safetensors(variables, files / "bert", cfg)
    llama = jm.save_llama_safetensors(LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0)),
                                      files / "llama")  # fmt: skip
    return SimpleNamespace(
        xs=xs, ys=ys, base=base, fts=fts, stats=stats, model=model, cal=[[x] for x in cal_x],
        params=params, model_fts=model_fts, merge_stats=merge_stats, saved_params=saved_params,
        saved_stats=saved_stats, bert=Path(bert), llama=Path(llama),
    )  # fmt: skip


def _set(tree, path: str, value):
    """A copy of a nested dict with ``path`` ("a/b") set to ``value`` (deleted when ``None``)."""
    tree = jax.tree.map(lambda a: a, tree)
    *head, last = path.split("/")
    node = tree
    for key in head:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return tree


def _leaf(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / src.name
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def _merge(c, **kw):
    kw.setdefault("progress", False)
    return jm.merge(c.model, kw.pop("base", c.params), kw.pop("fts", c.model_fts),
                    kw.pop("cal", c.cal), **kw)  # fmt: skip


def _solve(c, **kw):
    return jm.solve_layer(kw.pop("stats", c.stats), kw.pop("base", c.base),
                          kw.pop("fts", c.fts), **kw)  # fmt: skip


def _with(seq, index, value):
    seq = list(seq)
    seq[index] = value
    return seq


class _MaskedDense(nn.Module):
    """A Dense layer whose calibration batches carry a padding mask (ignored by the model)."""

    @nn.compact
    def __call__(self, x, mask):
        del mask
        return nn.Dense(2)(x)


def _masked_problem(mask_shape=(4,), second=0.0):
    """Task 1's rows are all masked unless ``second`` is 1."""
    x = jnp.ones((4, 3))
    base = _MaskedDense().init(jax.random.key(0), x, jnp.ones(4))["params"]
    batches = [{"x": x, "mask": jnp.ones(mask_shape)},
               {"x": x, "mask": jnp.full(mask_shape, second)}]  # fmt: skip
    return base, finetunes(base, 2), [[b] for b in batches]


def _masked_merge(**kw):
    base, fts, cal = _masked_problem()
    return jm.merge(_MaskedDense(), base, fts, cal, progress=False, **kw)


class _Branchy(nn.Module):
    """A model with a Python ``if`` on a value computed from its input."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2)(x)
        return -h if h.sum() > 0 else h


def _branchy_params():
    base = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    return {"Dense_0": base}, [{"Dense_0": f} for f in finetunes(base, 2)]


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x)


class _Nested(nn.Module):
    """A Dense layer inside a module that is no layer ("Block_0/Dense_0")."""

    @nn.compact
    def __call__(self, x):
        return _Block(name="Block_0")(x)


def _nested_merge(**kw):
    x = jnp.ones((4, 3))
    base = _Nested().init(jax.random.key(0), x)["params"]
    return jm.merge(_Nested(), base, finetunes(base, 2), [[x], [x + 1]], progress=False, **kw)


class _LinenStochastic(nn.Module):
    """Dense, then Dropout or BatchNorm told its mode by ``train`` (``None``: not told)."""

    layer: str
    train: bool | None = False

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        mode = None if self.train is None else not self.train
        if self.layer == "dropout":
            h = nn.Dropout(0.5)(h, deterministic=mode)
        else:
            h = nn.BatchNorm(use_running_average=mode)(h)
        return nn.Dense(2)(h)


def _linen_stochastic(layer, train, variables=True):
    x = jnp.arange(24.0).reshape(8, 3)
    v = _LinenStochastic(layer).init(jax.random.key(0), x)
    v = v if variables else v["params"]
    return jm.merge(_LinenStochastic(layer, train), v, finetunes(v, 2), [[x], [x + 1]],
                    progress=False)  # fmt: skip


class _NnxStochastic(nnx.Module):
    """Linear, Dropout, BatchNorm, Linear: NNX's default (training) mode unless ``eval()``."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.bn(self.drop(self.lin(x))))


def _nnx_stochastic(only=None, full_state=False):
    """Merge ``_NnxStochastic`` left in training mode (``only``: just that module of it), or in
    eval mode with its full ``nnx.state`` as the base."""
    model = _NnxStochastic(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    if only is not None:
        model.eval()
        setattr(getattr(model, only), "deterministic" if only == "drop" else
                "use_running_average", False)  # fmt: skip
    if full_state:
        model.eval()
    base = nnx.state(model) if full_state else params
    x = jnp.arange(24.0).reshape(8, 3)
    return jm.merge(model, base, finetunes(params, 2), [[x], [x + 1]], progress=False)


def _token_merge(bad_id, run=jm.merge):
    """A transformer merged (or its statistics collected, ``run``) with one token id of task 1's
    batch set to ``bad_id``."""
    model, good = LinenTransformer(), token_batch(1)
    base = model.init(jax.random.key(0), **good)["params"]
    bad = dict(good, tokens=good["tokens"].at[0, 0].set(bad_id))
    if run is jm.merge:
        return jm.merge(model, base, finetunes(base, 2), [[good], [bad]], progress=False)
    return run(model, finetunes(base, 2), [[good], [bad]], progress=False)


def _other_shapes_stats(c):
    """solve_stats with the statistics of LinenMLP(hidden=6) and the trees of hidden=7."""
    other = LinenMLP(hidden=7, out=2)
    params = other.init(jax.random.key(0), c.cal[0][0])["params"]
    return jm.solve_stats(c.merge_stats, params, finetunes(params, 2), progress=False)


# ---- the catalogue --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    call: Callable  # (ctx, tmp_path) -> anything; must raise
    error: type[BaseException]
    match: str  # regex over the message: names the problem AND the place
    xfail: str | None = None  # a known poor error: the reason, and the case must still fail


NAN, INF = float("nan"), float("inf")

CASES = [
    # -- statistics ------------------------------------------------------------------------
    Case("init_stats: K = 0", lambda c, t: jm.init_stats(3, 2, 0),
         ValueError, r"init_stats: num_tasks must be a positive integer, got 0"),
    Case("init_stats: integer dtype", lambda c, t: jm.init_stats(3, 2, 1, dtype=jnp.int32),
         ValueError, r"init_stats: dtype must be floating, got int32"),
    Case("update_stats: input width",
         lambda c, t: jm.update_stats(c.stats, np.ones((5, 4), np.float32), c.ys[0][:5], 0),
         ValueError, r"inputs x have shape \(5, 4\); expected \(\.\.\., 3\)"),
    Case("update_stats: integer inputs",
         lambda c, t: jm.update_stats(c.stats, np.ones((6, 3), np.int32), c.ys[0], 0),
         TypeError, r"update_stats: x must be floating point, got dtype int32"),
    Case("update_stats: mask shape",
         lambda c, t: jm.update_stats(c.stats, c.xs[0], c.ys[0], 0, mask=np.ones(5)),
         ValueError, r"mask has shape \(5,\); expected the leading axes of x, \(6,\)"),
    Case("update_stats: inputs and targets of different lengths",
         lambda c, t: jm.update_stats(c.stats, c.xs[0], c.ys[0][:5], 0),
         ValueError, r"inputs x \(6, 3\) and targets y \(5, 2\) disagree on their leading"),
    Case("update_stats: task out of range",
         lambda c, t: jm.update_stats(c.stats, c.xs[0], c.ys[0], 2),
         ValueError, r"update_stats: task 2 is out of range for 2 tasks"),
    Case("layer_stats: K = 0", lambda c, t: jm.layer_stats([], []),
         ValueError, r"layer_stats: no tasks given \(xs is empty\)"),
    Case("layer_stats: empty calibration set",
         lambda c, t: jm.layer_stats(_with(c.xs, 1, c.xs[1][:0]), _with(c.ys, 1, c.ys[1][:0])),
         ValueError, r"layer_stats: task 1 has no unmasked rows"),
    Case("layer_stats: all rows masked",
         lambda c, t: jm.layer_stats(c.xs, c.ys, masks=[None, np.zeros(6)]),
         ValueError, r"layer_stats: task 1 has no unmasked rows"),
    Case("layer_stats: inputs and targets of different lengths",
         lambda c, t: jm.layer_stats(c.xs, _with(c.ys, 0, c.ys[0][:4])),
         ValueError, r"layer_stats: task 0: inputs \(6, 3\) and targets \(4, 2\) disagree"),
    Case("layer_stats: fewer targets than inputs", lambda c, t: jm.layer_stats(c.xs, c.ys[:1]),
         ValueError, r"got 2 input arrays, 1 target arrays"),
    Case("combine_stats: different layers",
         lambda c, t: jm.combine_stats(c.stats, jm.init_stats(4, 2, 2)),
         ValueError, r"combine_stats: field 'gram' differs: \(4, 4\) float32 vs \(5, 5\)"),
    Case("normalize_stats: several tasks", lambda c, t: jm.normalize_stats(c.stats),
         ValueError, r"exactly one task; tasks with rows: \[0, 1\]"),
    # -- solve_layer ----------------------------------------------------------------------
    # (under the test suite's runtime type checker the annotation itself names the parameter)
    Case("solve_layer: stats of the wrong type", lambda c, t: _solve(c, stats=c.stats._asdict()),
         TypeError, r"stats must be a LayerStats, got dict|parameter 'stats'.*Expected type: "
                    r".*LayerStats"),
    Case("solve_layer: K = 0", lambda c, t: _solve(c, fts=[]),
         ValueError, r"finetuned must be a non-empty sequence of layers \(K ≥ 1\)"),
    Case("solve_layer: fewer fine-tunes than tasks", lambda c, t: _solve(c, fts=c.fts[:1]),
         ValueError, r"1 fine-tuned layers but the statistics hold 2 tasks"),
    Case("solve_layer: base kernel not 2-D", lambda c, t: _solve(c, base=c.base[0][None]),
         ValueError, r"base: kernel must be 2-D \(n_in, n_out\), got shape \(1, 3, 2\)"),
    Case("solve_layer: fine-tune kernel shape",
         lambda c, t: _solve(c, fts=_with(c.fts, 1, (np.zeros((4, 2), np.float32), c.fts[1][1]))),
         ValueError, r"finetuned\[1\]: kernel has shape \(4, 2\); .* \(n_in, n_out\) = \(3, 2\)"),
    Case("solve_layer: integer fine-tune",
         lambda c, t: _solve(c, fts=_with(c.fts, 0, (np.ones((3, 2), np.int32), c.fts[0][1]))),
         TypeError, r"finetuned\[0\]: kernel must be floating point, got dtype int32"),
    Case("solve_layer: bias shape",
         lambda c, t: _solve(c, base=(c.base[0], np.zeros(3, np.float32))),
         ValueError, r"base: bias has shape \(3,\); expected \(2,\)"),
    Case("solve_layer: fine-tune without the base's bias",
         lambda c, t: _solve(c, fts=_with(c.fts, 1, c.fts[1][0])),
         ValueError, r"finetuned\[1\] has no bias but the base has one"),
    Case("solve_layer: layer dict without a kernel",
         lambda c, t: _solve(c, base={"weight": c.base[0], "bias": c.base[1]}),
         ValueError, r"base: a layer dict needs a 'kernel' entry; got keys \['weight', 'bias'\]"),
    Case("solve_layer: unknown basis", lambda c, t: _solve(c, basis="spectral"),
         ValueError, r"solve_layer: unknown basis 'spectral'"),
    Case("solve_layer: LowRank larger than possible", lambda c, t: _solve(c, basis=jm.LowRank(3)),
         ValueError, r"LowRank\(3\) exceeds the largest possible rank 2 .* shape \(4, 2\)"),
    Case("LowRank: rank 0", lambda c, t: jm.LowRank(0),
         ValueError, r"LowRank: rank must be a positive integer, got 0"),
    Case("solve_layer: Custom direction shape",
         lambda c, t: _solve(c, basis=jm.Custom([np.zeros((2, 2), np.float32)])),
         ValueError, r"Custom\.directions\[0\]: kernel has shape \(2, 2\)"),
    Case("solve_layer: Custom without directions", lambda c, t: _solve(c, basis=jm.Custom([])),
         ValueError, r"Custom needs a non-empty sequence of directions"),
    Case("solve_layer: Custom direction with a bias, layer without",
         lambda c, t: _solve(c, base=c.base[0], fts=[f[0] for f in c.fts],
                             basis=jm.Custom([(c.base[0], c.base[1])])),
         ValueError, r"Custom\.directions\[0\] has a bias; the layer has none"),
    Case("solve_layer: negative ridge", lambda c, t: _solve(c, ridge=-1.0),
         ValueError, r"solve_layer: ridge must be ≥ 0 \(or inf\), got -1\.0"),
    Case("solve_layer: NaN ridge", lambda c, t: _solve(c, ridge=NAN),
         ValueError, r"solve_layer: ridge must be ≥ 0 \(or inf\), got nan"),
    Case("solve_layer: ridge not a number", lambda c, t: _solve(c, ridge="big"),
         TypeError, r"ridge must be a number, got 'big'|parameter 'ridge'"),
    Case("solve_layer: alpha outside [0, 1]", lambda c, t: _solve(c, alpha=1.5),
         ValueError, r"solve_layer: alpha must lie in \[0, 1\], got 1\.5"),
    Case("solve_layer: scalar prior shape",
         lambda c, t: _solve(c, basis="scalar", prior=np.ones(3)),
         ValueError, r"prior has shape \(3,\); the scalar basis needs .* broadcastable to \(2,\)"),
    Case("solve_layer: full prior shape",
         lambda c, t: _solve(c, prior=(np.zeros((2, 2), np.float32), c.base[1])),
         ValueError, r"prior: kernel has shape \(2, 2\)"),
    Case("solve_layer: NaN in calibration data",
         lambda c, t: _solve(c, stats=jm.layer_stats(_with(c.xs, 1, np.full((6, 3), NAN)), c.ys)),
         jm.SolveError, r"not be finite; NaN or Inf in stats\.gram"),
    Case("solve_layer: Inf in a fine-tune",
         lambda c, t: _solve(c, fts=_with(c.fts, 1, (c.fts[1][0] * INF, c.fts[1][1]))),
         jm.SolveError, r"NaN or Inf in finetuned\[1\]"),
    # -- energy_fraction ------------------------------------------------------------------
    Case("energy_fraction: merged shape",
         lambda c, t: jm.energy_fraction(c.stats, c.base, np.zeros((2, 3), np.float32)),
         ValueError, r"merged: kernel has shape \(2, 3\); .* \(n_in, n_out\) = \(3, 2\)"),
    Case("energy_fraction: bias on one side only",
         lambda c, t: jm.energy_fraction(c.stats, c.base, c.base[0]),
         ValueError, r"energy_fraction: base and merged must both have a bias"),
    Case("energy_fraction: NaN in the merge",
         lambda c, t: jm.energy_fraction(c.stats, c.base, (c.base[0] * NAN, c.base[1])),
         ValueError, r"energy_fraction: merged holds NaN or Inf"),
    # -- merge / collect_stats / solve_stats ----------------------------------------------
    Case("merge: K = 0", lambda c, t: _merge(c, fts=[]),
         ValueError, r"merge: finetuned must be a non-empty sequence"),
    Case("merge: fine-tune missing a parameter",
         lambda c, t: _merge(c, fts=_with(c.model_fts, 1, _set(c.model_fts[1], "Dense_1/bias",
                                                                None))),
         ValueError, r"finetuned\[1\].*Dense_1/bias"),
    Case("merge: fine-tune with an extra parameter",
         lambda c, t: _merge(c, fts=_with(c.model_fts, 0, _set(c.model_fts[0], "Dense_1/scale",
                                                                jnp.ones(2)))),
         ValueError, r"finetuned\[0\].*Dense_1/scale"),
    Case("merge: parameter shape",
         lambda c, t: _merge(c, fts=_with(c.model_fts, 0, _set(c.model_fts[0], "Dense_0/kernel",
                                                                jnp.zeros((5, 6))))),
         ValueError, r"'Dense_0/kernel' has shape \(5, 6\) in finetuned\[0\]"),
    Case("merge: parameter dtype",
         lambda c, t: _merge(c, fts=_with(c.model_fts, 1, _set(c.model_fts[1], "Dense_1/bias",
                                                                jnp.zeros(2, jnp.float16)))),
         TypeError, r"'Dense_1/bias' has dtype float16 in finetuned\[1\]"),
    Case("merge: integer kernel",
         lambda c, t: _merge(c, base=_set(c.params, "Dense_0/kernel", jnp.ones((4, 6), jnp.int32)),
                             fts=[_set(f, "Dense_0/kernel", jnp.ones((4, 6), jnp.int32))
                                  for f in c.model_fts]),
         TypeError, r"layer 'Dense_0': base: kernel must be floating point, got dtype int32"),
    Case("merge: NaN in calibration data",
         lambda c, t: _merge(c, cal=[c.cal[0], [c.cal[1][0].at[2, 1].set(NAN)]]),
         ValueError, r"non-finite activations at layer 'Dense_0'"),
    Case("merge: Inf in a fine-tune",
         lambda c, t: _merge(c, fts=_with(c.model_fts, 0, _set(
             c.model_fts[0], "Dense_1/kernel", _leaf(c.model_fts[0], "Dense_1/kernel") * INF))),
         ValueError, r"non-finite activations at layer 'Dense_1'"),
    Case("merge: empty calibration", lambda c, t: _merge(c, cal=[c.cal[0], []]),
         ValueError, r"merge: calibration\[1\] is empty"),
    Case("merge: all rows of a task masked",
         lambda c, t: jm.merge(_MaskedDense(), *_masked_problem(), progress=False),
         ValueError, r"layer 'Dense_0' saw no unmasked rows of task 1"),
    Case("merge: calibration for fewer tasks", lambda c, t: _merge(c, cal=c.cal[:1]),
         ValueError, r"1 calibration iterables for 2 fine-tuned models"),
    Case("merge: a batch instead of a list of batches",
         lambda c, t: _merge(c, cal=[c.cal[0][0], c.cal[1][0]]),
         TypeError, r"calibration\[0\] must be an iterable of batches .* got ArrayImpl"),
    Case("merge: calibration of another width",
         lambda c, t: _merge(c, cal=[c.cal[0], [jnp.ones((8, 5))]]),
         ValueError, r"calibration\[1\].*Dense_0.*\(5, 6\)"),
    Case("merge (sequential): NaN in calibration data",
         lambda c, t: _merge(c, algorithm="sequential",
                             cal=[c.cal[0], [c.cal[1][0].at[0, 0].set(INF)]]),
         ValueError, r"non-finite activations at layer 'Dense_0'"),
    Case("merge: LowRank larger than a layer allows",
         lambda c, t: _merge(c, basis={"Dense_1": jm.LowRank(5)}),
         ValueError, r"layer 'Dense_1'.*LowRank\(5\) exceeds the largest possible rank 2"),
    Case("merge: unknown basis for a layer",
         lambda c, t: _merge(c, basis={"Dense_*": "spectral"}),
         ValueError, r"layer 'Dense_0': unknown basis 'spectral'"),
    Case("merge: negative ridge for a layer", lambda c, t: _merge(c, ridge={"Dense_1": -2.0}),
         ValueError, r"ridge for (layer )?'Dense_1' must be a number ≥ 0, got -2\.0"),
    Case("merge: prior of the wrong shape for a layer",
         lambda c, t: _merge(c, basis="scalar", prior={"Dense_0": np.ones(3)},
                             ridge={"Dense_0": 1.0}),
         ValueError, r"layer 'Dense_0': solve_layer: prior has shape \(3,\); the scalar basis"),
    Case("merge: unknown fallback rule", lambda c, t: _merge(c, fallback="median"),
         ValueError, r"merge: fallback must be 'mean', 'base' or a number .* got 'median'"),
    Case("merge: not a Flax model", lambda c, t: jm.merge(lambda x: x, c.params, c.model_fts,
                                                           c.cal, progress=False),
         TypeError, r"model must be a flax\.linen\.Module or a flax\.nnx\.Module, got function"),
    Case("merge: alpha outside [0, 1]", lambda c, t: _merge(c, alpha=-0.5),
         ValueError, r"merge: alpha must lie in \[0, 1\], got -0\.5"),
    Case("merge: unknown algorithm", lambda c, t: _merge(c, algorithm="greedy"),
         ValueError, r"algorithm must be 'parallel' or 'sequential', got 'greedy'"),
    Case("merge: option naming an unknown layer",
         lambda c, t: _merge(c, basis={"Dense_9": "scalar"}),
         ValueError, r"basis.*'Dense_9'.*(no|not).*layer"),
    Case("merge: model branching in Python on a traced value",
         lambda c, t: jm.merge(_Branchy(), *_branchy_params(), [[x] for x in c.xs],
                               progress=False),
         TypeError, r"model branches in Python on a value computed from its input.*jnp\.where"),
    Case("merge: an (inputs, labels) tuple as a batch",
         lambda c, t: _merge(c, cal=[[(x, x)] for x in (b[0] for b in c.cal)]),
         TypeError, r"calibration\[0\] batch 0 is a tuple; a batch is an array"),
    Case("merge: a list as the second batch of a task",
         lambda c, t: _merge(c, cal=[c.cal[0], [c.cal[1][0], [c.cal[1][0]]]]),
         TypeError, r"calibration\[1\] batch 1 is a list"),
    Case("merge: a (rows, 1) mask",
         lambda c, t: jm.merge(_MaskedDense(), *_masked_problem(mask_shape=(4, 1)), progress=False),
         ValueError, r"calibration\[0\] batch 0: the mask 'mask' has shape \(4, 1\), which is not "
                     r"the leading shape"),
    Case("merge: a (rows - 1,) mask in held-out data",
         lambda c, t: jm.merge(_MaskedDense(), *_masked_problem(second=1.0), progress=False,
                               heldout=_masked_problem(mask_shape=(3,), second=1.0)[2]),
         ValueError, r"heldout\[0\] batch 0: the mask 'mask' has shape \(3,\)"),
    Case("merge: calibration[0] of the wrong width",
         lambda c, t: _merge(c, cal=[[jnp.ones((8, 5))], c.cal[1]]),
         ValueError, r"cannot run on calibration\[0\] batch 0 \(shapes \(8, 5\)\).*Dense_0"),
    Case("merge: calibration[1] of the wrong width",
         lambda c, t: _merge(c, cal=[c.cal[0], [jnp.ones((8, 5))]]),
         ValueError, r"cannot run on calibration\[1\] batch 0 \(shapes \(8, 5\)\).*Dense_0"),
    Case("collect_stats: calibration for more tasks",
         lambda c, t: jm.collect_stats(c.model, c.model_fts, c.cal * 2, progress=False),
         ValueError, r"4 calibration iterables for 2 fine-tuned models"),
    Case("collect_stats: paths naming no layer",
         lambda c, t: jm.collect_stats(c.model, c.model_fts, c.cal, paths=["Dense_9"],
                                       progress=False),
         ValueError, r"collect_stats: paths \['Dense_9'\] name no layer .*'Dense_0', 'Dense_1'"),
    Case("collect_stats: paths a string",
         lambda c, t: jm.collect_stats(c.model, c.model_fts, c.cal, paths="Dense_0",
                                       progress=False),
         TypeError, r"paths must be an iterable of layer paths, got 'Dense_0'; wrap one"),
    Case("merge: mask_key with array batches",
         lambda c, t: _merge(c, mask_key="attention_mask"),
         ValueError, r"mask_key='attention_mask', but no task's first calibration batch holds it "
                     r"\(arrays\)"),
    Case("merge: mask_key absent from dict batches",
         lambda c, t: _masked_merge(mask_key="attention_mask"),
         ValueError, r"mask_key='attention_mask', but no task's first calibration batch holds it "
                     r"\(keys \['mask', 'x'\]\)"),
    Case("merge_in_groups: rows with groups",
         lambda c, t: jm.merge_in_groups(c.model, c.params, c.model_fts, c.cal,
                                         groups=[["Dense_0"], ["Dense_1"]], rows=8,
                                         progress=False),
         ValueError, r"merge_in_groups: rows= sizes the budget; with groups= it has no effect"),
    Case("solve_layers: a basis for a path without statistics",
         lambda c, t: jm.solve_layers({"a": c.stats}, {"a": c.base}, [{"a": f} for f in c.fts],
                                      basis={"a": "scalar", "zz": "full"}),
         ValueError, r"solve_layers: basis has entries for paths without statistics: \['zz'\]"),
    Case("solve_layers: a prior for a path without statistics",
         lambda c, t: jm.solve_layers({"a": c.stats}, {"a": c.base}, [{"a": f} for f in c.fts],
                                      basis="scalar", ridge=1.0, prior={"c": 0.5}),
         ValueError, r"solve_layers: prior has entries for paths without statistics: \['c'\]"),
    Case("solve_stats: statistics of another number of tasks",
         lambda c, t: jm.solve_stats(c.merge_stats, c.params, c.model_fts[:1], progress=False),
         ValueError, r"2 tasks.*1 fine-tune|1 fine-tune.*2 tasks"),
    Case("solve_stats: statistics of another model",
         lambda c, t: jm.solve_stats(c.merge_stats, {"Dense_0": c.params["Dense_0"]},
                                     [{"Dense_0": f["Dense_0"]} for f in c.model_fts],
                                     progress=False),
         ValueError, r"'Dense_1'.*(not|no).*(base|parameters)"),
    # -- options: the kind of path a glob must match, their types ---------------------------
    Case("merge: basis glob matching a parameter path",
         lambda c, t: _merge(c, basis={"Dense_0/kernel": "scalar"}),
         jm.OptionPatternError, r"basis pattern 'Dense_0/kernel' matches no layer path.*the "
                                r"parameter path 'Dense_0/kernel'.*layer paths: use 'Dense_0'"),
    Case("merge: ridge glob matching parameter paths only",
         lambda c, t: _merge(c, ridge={"Dense_0/*": 1e6}),
         jm.OptionPatternError, r"ridge pattern 'Dense_0/\*' matches no layer path.*parameter "
                                r"path 'Dense_0/(kernel|bias)'.*use 'Dense_0'"),
    Case("merge: fallback glob matching a layer path",
         lambda c, t: _merge(c, fallback={"Dense_0": "base"}),
         jm.OptionPatternError, r"fallback pattern 'Dense_0' matches no floating-point parameter "
                                r"path.*layer or module path 'Dense_0'.*use 'Dense_0/\*'"),
    Case("merge: fallback glob matching only an integer parameter",
         lambda c, t: _merge(c, base={**c.params, "step": jnp.int32(3)},
                             fts=[{**f, "step": jnp.int32(3)} for f in c.model_fts],
                             fallback={"step": "mean"}),
         jm.OptionPatternError, r"fallback pattern 'step' matches no floating-point parameter "
                                r"path.*only integer parameters \('step'\), which always keep"),
    Case("merge: prior glob naming a module that is no layer",
         lambda c, t: _nested_merge(basis="scalar", ridge=1.0, prior={"Block_0": 0.5}),
         jm.OptionPatternError, r"prior pattern 'Block_0' matches no layer path.*"
                                r"\['Block_0/Dense_0'\].*use 'Block_0/\*'"),
    Case("merge: basis glob shadowed by an earlier glob",
         lambda c, t: _merge(c, basis={"*": "full", "Dense_0": "scalar"}),
         jm.OptionPatternError, r"basis pattern 'Dense_0' is never used: every layer path it "
                                r"matches \('Dense_0'\) is matched first by the earlier "
                                r"pattern '\*'.*put the more specific pattern first"),
    Case("merge: fallback glob shadowed by an earlier glob",
         lambda c, t: _merge(c, fallback={"Dense_*": 0.5, "Dense_1/bias": "base"}),
         jm.OptionPatternError, r"fallback pattern 'Dense_1/bias' is never used: .*"
                                r"\('Dense_1/bias'\) is matched first by the earlier pattern "
                                r"'Dense_\*'"),
    Case("solve_stats: ridge glob shadowed by an earlier glob",
         lambda c, t: jm.solve_stats(c.merge_stats, c.params, c.model_fts, progress=False,
                                     ridge={"Dense_?": 1.0, "Dense_1": 0.0}),
         jm.OptionPatternError, r"ridge pattern 'Dense_1' is never used: .*earlier pattern "
                                r"'Dense_\?'"),
    Case("merge: prior without a ridge", lambda c, t: _merge(c, basis="scalar", prior=0.5),
         ValueError, r"merge: prior is given but ridge is 0 for every layer, so the prior has "
                     r"no effect"),
    Case("solve_stats: prior glob on layers without a ridge",
         lambda c, t: jm.solve_stats(c.merge_stats, c.params, c.model_fts, progress=False,
                                     basis="scalar", prior={"Dense_0": 0.5, "Dense_1": 0.2},
                                     ridge={"Dense_1": 1.0}),
         ValueError, r"merge: the prior pattern 'Dense_0' has no effect: ridge is 0 for every "
                     r"layer it applies to \('Dense_0'\)"),
    Case("merge: prior a string", lambda c, t: _merge(c, prior="mean"),
         TypeError, r"merge: prior must be coefficients .* got the string 'mean'"),
    Case("merge: glob key not a string", lambda c, t: _merge(c, basis={0: "scalar"}),
         TypeError, r"merge: basis has the key 0 \(int\); the keys of a \{glob: value\} "
                    r"option are path patterns"),
    Case("solve_stats: glob key not a string",
         lambda c, t: jm.solve_stats(c.merge_stats, c.params, c.model_fts, ridge={1: 0.5},
                                     progress=False),
         TypeError, r"ridge has the key 1 \(int\)"),
    Case("merge: NaN ridge", lambda c, t: _merge(c, ridge=NAN),
         ValueError, r"merge: ridge must be a number ≥ 0, got nan"),
    Case("merge: boolean ridge", lambda c, t: _merge(c, ridge={"Dense_1": True}),
         TypeError, r"merge: ridge for 'Dense_1' must be a number ≥ 0 .*got True \(bool\)"),
    # -- where and how merge runs ---------------------------------------------------------
    Case("merge: called inside jax.jit",
         lambda c, t: jax.jit(lambda base: _merge(c, base=base)[0])(c.params),
         TypeError, r"merge: called inside a JAX transformation.*host-level driver.*cannot be "
                    r"traced.*jm\.stats_collector"),
    Case("merge: NNX Dropout left in training mode", lambda c, t: _nnx_stochastic(only="drop"),
         ValueError, r"training mode: 'drop' \(Dropout, deterministic=False\).*model\.eval\(\)"),
    Case("merge: NNX BatchNorm left in training mode", lambda c, t: _nnx_stochastic(only="bn"),
         ValueError, r"training mode: 'bn' \(BatchNorm, use_running_average=False\).*"
                     r"model\.eval\(\)"),
    Case("merge: NNX model in its default training mode", lambda c, t: _nnx_stochastic(),
         ValueError, r"training mode: (?=.*'drop' \(Dropout, deterministic=False\))"
                     r"(?=.*'bn' \(BatchNorm, use_running_average=False\)).*model\.eval\(\)"),
    Case("merge: a full nnx.state (RNG state, batch statistics) as the base",
         lambda c, t: _nnx_stochastic(full_state=True),
         ValueError, r"base is an nnx\.State holding variables that are not parameters \("
                     r"BatchStat at 'bn/mean'.*Rng\w+ at 'drop/rngs/.*nnx\.state\(model, "
                     r"nnx\.Param\)"),
    Case("merge: linen BatchNorm without its batch_stats",
         lambda c, t: _linen_stochastic("batchnorm", False, variables=False),
         ValueError, r"\"mean\" from collection \"batch_stats\" in \"/BatchNorm_0\".*pass "
                     r"the base and every fine-tune as linen variables dicts"),
    Case("merge: linen BatchNorm in training mode",
         lambda c, t: _linen_stochastic("batchnorm", True),
         ValueError, r"BatchNorm layer 'BatchNorm_0' runs in training mode "
                     r"\(use_running_average=False\).*use_running_average=True"),
    Case("merge: linen Dropout without deterministic",
         lambda c, t: _linen_stochastic("dropout", None),
         ValueError, r"Dropout layer 'Dropout_0' is given no 'deterministic'.*deterministic=True"),
    Case("merge: linen Dropout in training mode", lambda c, t: _linen_stochastic("dropout", True),
         ValueError, r"Dropout layer 'Dropout_0' runs in training mode \(deterministic=False\)"),
    Case("merge: token id beyond the vocabulary", lambda c, t: _token_merge(VOCAB + 2),
         ValueError, rf"calibration\[1\] batch 0: the token ids in batch\['tokens'\] range "
                     rf"over \[\d+, {VOCAB + 2}\], outside the vocabulary of embedding layer "
                     rf"'embed' \({VOCAB} rows"),
    Case("merge: negative token id", lambda c, t: _token_merge(-1),
         ValueError, r"calibration\[1\] batch 0: the token ids .* range over \[-1, \d+\], "
                     r"outside the vocabulary of embedding layer 'embed'"),
    Case("collect_stats: token id beyond the vocabulary",
         lambda c, t: _token_merge(VOCAB, jm.collect_stats),
         ValueError, rf"calibration\[1\] batch 0: the token ids in batch\['tokens'\] range "
                     rf"over \[\d+, {VOCAB}\], outside the vocabulary of embedding layer"),
    Case("accumulate_model_stats: negative token id",
         lambda c, t: _token_merge(-3, jm.accumulate_model_stats),
         ValueError, r"calibration\[1\] batch 0: the token ids .* range over \[-3, \d+\], "
                     r"outside the vocabulary of embedding layer 'embed'"),
    Case("solve_stats: statistics of a model with the same paths, other shapes",
         lambda c, t: _other_shapes_stats(c),
         ValueError, r"'Dense_0'.*\(4, 6\).*\(4, 7\)|'Dense_0'.*\(4, 7\).*\(4, 6\)"),
    # -- baselines ------------------------------------------------------------------------
    Case("task_vectors: integer parameter",
         lambda c, t: jm.task_vectors({"w": np.ones(2, np.int32)}, [{"w": np.ones(2, np.int32)}]),
         TypeError, r"task_vectors: base parameter 'w' has dtype int32"),
    Case("task_vectors: different structure",
         lambda c, t: jm.task_vectors({"a": np.ones(2)}, [{"a": np.ones(2), "b": np.ones(1)}]),
         ValueError, r"finetuned\[0\] does not have the base's tree structure; .*unexpected.*'b'"),
    Case("soup: weights shape",
         lambda c, t: jm.soup(c.params, c.model_fts, weights=[1.0, 2.0, 3.0]),
         ValueError, r"soup: weights have shape \(3,\); expected one per task, \(2,\)"),
    Case("soup: negative weights", lambda c, t: jm.soup(c.params, c.model_fts, weights=[1, -1]),
         ValueError, r"soup: weights must be nonnegative"),
    Case("task_arithmetic: scale shape",
         lambda c, t: jm.task_arithmetic(c.params, c.model_fts, scale=np.ones(3)),
         ValueError, r"scale for layer 'Dense_0' has shape \(3,\); .* \(2,\)"),
    Case("task_arithmetic: per-layer scale missing a layer",
         lambda c, t: jm.task_arithmetic(c.params, c.model_fts, scale={"Dense_0": 0.5}),
         ValueError, r"scale has no entry for layer 'Dense_1'"),
    Case("ties: density 0", lambda c, t: jm.ties(c.params, c.model_fts, density=0),
         ValueError, r"ties_task_vectors: density .* must lie in \(0, 1\]"),
    Case("ties: unknown trim", lambda c, t: jm.ties(c.params, c.model_fts, trim="global"),
         ValueError, r"ties_task_vectors: trim must be one of \['tensor', 'model'\], got 'glob"),
    Case("dare: drop rate 1",
         lambda c, t: jm.dare(c.params, c.model_fts, jax.random.key(0), drop_rate=1.0),
         ValueError, r"dare.*: drop_rate p must lie in \[0, 1\), got 1\.0"),
    Case("dare_masks: not a key",
         lambda c, t: jm.dare_masks(3, c.params, 2, drop_rate=0.5),
         TypeError, r"dare_masks: key must be a jax\.random key"),
    Case("dare_task_vectors: mask shape",
         lambda c, t: jm.dare_task_vectors(
             c.params, c.model_fts,
             [c.model_fts[0], _set(c.model_fts[1], "Dense_0/kernel", jnp.ones((2, 2)))],
             drop_rate=0.5),
         ValueError, r"masks\[1\] at 'Dense_0/kernel' has shape \(2, 2\); .* \(4, 6\)"),
    Case("task_arithmetic: per-layer scale naming no layer",
         lambda c, t: jm.task_arithmetic(c.params, c.model_fts,
                                         scale={"Dense_0": 0.5, "Dense_1": 1.0, "Dense_9": 2.0}),
         ValueError, r"task_arithmetic: scale has entries for no layer of the parameters: "
                     r"\['Dense_9'\].*\['Dense_0', 'Dense_1'\]"),
    Case("ties: per-layer scale naming a parameter path",
         lambda c, t: jm.ties(c.params, c.model_fts,
                              scale={"Dense_0": 0.5, "Dense_1": 1.0, "Dense_1/kernel": 2.0}),
         ValueError, r"ties: scale has entries for no layer .*\['Dense_1/kernel'\]"),
    Case("ties_basis: per-layer scale naming no layer",
         lambda c, t: jm.ties_basis(c.params, c.model_fts, scale={"Dense_0": 1.0, "dense_1": 1.0}),
         ValueError, r"ties_basis: scale has entries for no layer .*\['dense_1'\]"),
    Case("task_arithmetic: NaN scale",
         lambda c, t: jm.task_arithmetic(c.params, c.model_fts, scale=NAN),
         ValueError, r"task_arithmetic: scale for layer 'Dense_0' is nan; it must be finite"),
    Case("dare: infinite scale for one task",
         lambda c, t: jm.dare(c.params, c.model_fts, jax.random.key(0), drop_rate=0.5,
                              scale=[1.0, INF]),
         ValueError, r"dare: scale for layer 'Dense_0' is \[1\.0, inf\]; it must be finite"),
    Case("task_arithmetic: a per-layer scale callable returning a string",
         lambda c, t: jm.task_arithmetic(c.params, c.model_fts, scale=lambda path: "0.5"),
         TypeError, r"task_arithmetic: scale for layer 'Dense_0' is '0\.5'; give numbers"),
    Case("soup: infinite weight", lambda c, t: jm.soup(c.params, c.model_fts, weights=[INF, 1.0]),
         ValueError, r"soup: weights must be nonnegative and finite"),
    Case("fisher_average: infinite epsilon",
         lambda c, t: jm.fisher_average(c.model_fts, [jax.tree.map(jnp.ones_like, c.params)] * 2,
                                        epsilon=INF),
         ValueError, r"fisher_average: epsilon must be positive and finite, got inf"),
    Case("ties: density a bool", lambda c, t: jm.ties(c.params, c.model_fts, density=True),
         TypeError, r"ties_task_vectors: density must be a Python number .* got True"),
    Case("dare: aggregate without merge='ties'",
         lambda c, t: jm.dare(c.params, c.model_fts, jax.random.key(0), drop_rate=0.5,
                              aggregate="sum"),
         ValueError, r"dare_task_vectors: aggregate='sum' applies to merge='ties' only"),
    Case("dare_masks: an array of keys",
         lambda c, t: jm.dare_masks(jax.random.split(jax.random.key(0)), c.params, 2,
                                    drop_rate=0.5),
         ValueError, r"dare_masks: key must be one jax\.random key, got an array of keys of "
                     r"shape \(2,\)"),
    Case("dare_masks: num_tasks a bool",
         lambda c, t: jm.dare_masks(jax.random.key(0), c.params, True, drop_rate=0.5),
         ValueError, r"dare_masks: num_tasks must be a positive integer, got True"),
    Case("dare_task_vectors: keep probabilities as masks",
         lambda c, t: jm.dare_task_vectors(
             c.params, c.model_fts, [jax.tree.map(lambda a: jnp.full(a.shape, 0.5), c.params)] * 2,
             drop_rate=0.5),
         ValueError, r"dare_task_vectors: masks\[0\] at 'Dense_0/bias' holds values other than "
                     r"0 and 1"),
    Case("fisher_average: negative Fisher",
         lambda c, t: jm.fisher_average(
             c.model_fts, [jax.tree.map(jnp.ones_like, c.params),
                           jax.tree.map(lambda a: -jnp.ones_like(a), c.params)]),
         ValueError, r"fishers\[1\] at 'Dense_0/bias' has negative or non-finite entries"),
    # -- checkpoints ----------------------------------------------------------------------
    Case("load_params: missing checkpoint", lambda c, t: jm.load_params(t / "nothing"),
         FileNotFoundError, r"load_params: no checkpoint directory at .*nothing"),
    Case("load_params: not a checkpoint", lambda c, t: jm.load_params(t),
         ValueError, r"load_params: .* is not an Orbax checkpoint"),
    Case("load_params: partial checkpoint (data missing)",
         lambda c, t: jm.load_params(_without(_copy(c.saved_params, t), "d")),
         ValueError, r"load_params: .*params is incomplete or corrupted"),
    Case("load_params: torn manifest, with a template",
         lambda c, t: jm.load_params(_torn(_copy(c.saved_params, t), "manifest.ocdbt"),
                                     {"w": np.ones((2, 3)), "b": np.ones(3)}),
         ValueError, r"load_params: .*params is incomplete or corrupted"),
    Case("load_params: template with another shape",
         lambda c, t: jm.load_params(c.saved_params, {"w": np.ones((3, 2)), "b": np.ones(3)}),
         ValueError, r"w: stored shape \(2, 3\), template shape \(3, 2\)"),
    Case("load_params: template with an unknown parameter",
         lambda c, t: jm.load_params(c.saved_params, {"w": np.ones((2, 3)), "c": np.ones(3)}),
         ValueError, r"missing from the checkpoint: c"),
    Case("save_params: existing checkpoint",
         lambda c, t: jm.save_params(c.saved_params, {"w": np.ones(2)}),
         FileExistsError, r"save_params: .*params exists; pass overwrite=True"),
    Case("save_stats: task names for another K",
         lambda c, t: jm.save_stats(t / "s", {"dense": c.stats}, tasks=["a"]),
         ValueError, r"save_stats: stats\['dense'\] has 2 tasks but 1 task names"),
    Case("combine_saved_stats: different tasks",
         lambda c, t: jm.combine_saved_stats(
             [c.saved_stats, jm.save_stats(t / "s", {"dense": c.stats}, tasks=["a", "c"])]),
         ValueError, r"combine_saved_stats: .*s has tasks \['a', 'c'\], .*stats has \['a', 'b'\]"),
    Case("load_stats: a parameter checkpoint", lambda c, t: jm.load_stats(c.saved_params),
         ValueError, r"load_stats: .*params is not a jaxmerge statistics checkpoint"),
    Case("load_stats: torn record",
         lambda c, t: jm.load_stats(_torn(_copy(c.saved_stats, t), "metadata/metadata")),
         ValueError, r"load_stats: .*stats is incomplete or corrupted"),
    Case("load_stats: partial checkpoint (arrays missing)",
         lambda c, t: jm.load_stats(_without(_copy(c.saved_stats, t), "stats/d")),
         ValueError, r"load_stats: .*stats is incomplete or corrupted"),
    # -- safetensors ----------------------------------------------------------------------
    Case("load_bert_safetensors: missing file", lambda c, t: jm.load_bert_safetensors(t),
         FileNotFoundError, r"no safetensors file at .*model\.safetensors"),
    Case("load_bert_safetensors: missing config",
         lambda c, t: jm.load_bert_safetensors(_without(_copy(c.bert, t), "config.json")),
         FileNotFoundError, r"no config\.json next to .*model\.safetensors; pass config="),
    Case("load_bert_safetensors: missing tensor",
         lambda c, t: jm.load_bert_safetensors(_edited(_copy(c.bert, t), _drop_query_bias)),
         ValueError, r"missing encoder/layer/0/attention/self/query/bias"),
    Case("load_bert_safetensors: wrong shape",
         lambda c, t: jm.load_bert_safetensors(_edited(_copy(c.bert, t), _widen_pooler)),
         ValueError, r"pooler/dense/kernel has shape \(17, 16\), the config needs \(16, 16\)"),
    Case("load_bert_safetensors: truncated file",
         lambda c, t: jm.load_bert_safetensors(_truncated(_copy(c.bert, t))),
         ValueError, r"load_bert_safetensors: .*model\.safetensors is not a readable safetensors"),
    Case("load_bert_safetensors: malformed config.json",
         lambda c, t: jm.load_bert_safetensors(_torn(_copy(c.bert, t), "config.json")),
         ValueError, r"load_bert_safetensors: .*config\.json is not valid JSON"),
    Case("load_llama_safetensors: missing tensor",
         lambda c, t: jm.load_llama_safetensors(_edited(_copy(c.llama, t), _drop_down_proj)),
         ValueError, r"Llama config: missing model/layers/1/mlp/down_proj/kernel"),
    Case("load_llama_safetensors: a tied head that differs",
         lambda c, t: jm.load_llama_safetensors(_edited(_copy(c.llama, t), _other_head)),
         ValueError, r"lm_head\.weight differs from model\.embed_tokens\.weight, but the config "
                     r"ties them"),
    Case("load_llama_safetensors: not a llama config",
         lambda c, t: jm.load_llama_safetensors(_edited_config(_copy(c.llama, t),
                                                               model_type="mistral")),
         ValueError, r"model_type 'mistral' is not llama"),
    Case("load_llama_gguf: not a gguf file",
         lambda c, t: jm.load_llama_gguf(_copy(c.llama, t) / "model.safetensors"),
         ValueError, r"load_llama_gguf: .*model\.safetensors is not a GGUF file"),
]  # fmt: skip


def _torn(path: Path, name: str) -> Path:
    """Keep only the first 10 bytes of ``path/name`` (an interrupted write)."""
    f = path / name
    f.write_bytes(f.read_bytes()[:10])
    return path


def _without(path: Path, name: str) -> Path:
    f = path / name
    shutil.rmtree(f) if f.is_dir() else f.unlink()
    return path


def _edited(path: Path, edit) -> Path:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")
    return path


def _drop_query_bias(tensors):
    del tensors["encoder.layer.0.attention.self.query.bias"]


def _widen_pooler(tensors):
    tensors["pooler.dense.weight"] = np.ones((16, 17), np.float32)


def _drop_down_proj(tensors):
    del tensors["model.layers.1.mlp.down_proj.weight"]


def _other_head(tensors):
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1


def _edited_config(path: Path, **changes) -> Path:
    f = path / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return path


def _truncated(path: Path) -> Path:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return path


def _xfail(case) -> list:
    return [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=_xfail(c)) for c in CASES],
)
def test_bad_input(ctx, tmp_path, case):
    originals = _snapshot(ctx.bert.parent)
    with pytest.raises(case.error) as info:
        case.call(ctx, tmp_path)
    message = str(info.value)
    assert re.search(case.match, message, re.S), (
        f"message does not match {case.match!r}:\n{message}"
    )
    # raised by jaxmerge's own checks (or the test suite's type checker), not deep inside a
    # dependency such as XLA, Orbax, Flax or safetensors
    raised_in = str(info.traceback[-1].path)
    assert "/jaxmerge/" in raised_in or "/jaxtyping/" in raised_in, raised_in
    assert _snapshot(ctx.bert.parent) == originals, "an input file was modified"


# ---- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """Base and fine-tuned checkpoints of the command-line fixture model, and broken ones."""
    d = tmp_path_factory.mktemp("cli")
    base, finetuned = cli_fixtures.make_params()
    jm.save_params(d / "base", base)
    for k, params in enumerate(finetuned):
        jm.save_params(d / f"ft{k}", params)
    jm.save_params(d / "other", {"Dense_0": {"kernel": np.ones((3, 3), np.float32)}})
    (d / "empty").mkdir()
    _torn(_copy(d / "ft1", tmp_path_factory.mktemp("torn")), "manifest.ocdbt").rename(d / "torn")
    (d / "report.json").write_text("{}")
    return d


def _toml(d: Path, merge: str = "", **top) -> str:
    """A configuration over the checkpoints in ``d``; ``top`` overrides top-level keys (None
    drops one)."""
    keys = {
        "pythonpath": [str(Path(__file__).parent)],
        "model": "cli_fixtures:model",
        "base": str(d / "base"),
        "finetuned": [str(d / "ft0"), str(d / "ft1")],
        "calibration": "cli_fixtures:calibration",
    }
    keys.update(top)
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items()
                     if v is not None) + "\n[merge]\n" + merge  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CliCase:
    id: str
    args: Callable  # (inputs dir, config path) -> argv; the config holds `toml(inputs dir)`
    toml: Callable | None
    code: int  # 2: bad usage or configuration, 1: the run failed
    match: str  # regex over stderr: names the problem AND the key, option or file
    xfail: str | None = None


def _merge_args(d: Path, config: Path) -> list[str]:
    return ["merge", str(config), "--out", str(config.parent / "out"), "--quiet"]


CLI_CASES = [
    CliCase("unknown method", _merge_args, lambda d: _toml(d, 'method = "fisher"\n'),
            2, r"config key 'merge\.method': expected one of .* got 'fisher'"),
    CliCase("unknown config key", _merge_args, lambda d: _toml(d, finetune=["x"]),
            2, r"config key 'finetune': unknown key"),
    CliCase("unknown option of the method", _merge_args, lambda d: _toml(d, "ridg = 1.0\n"),
            2, r"config key 'merge\.ridg': unknown option"),
    CliCase("malformed TOML", _merge_args, lambda d: "model = \n",
            2, r"configuration file .*config\.toml is not valid TOML: .*line 1"),
    CliCase("missing configuration file",
            lambda d, c: ["merge", str(c.parent / "none.toml"), "--out", str(c.parent / "o")],
            None, 2, r"configuration file .*none\.toml does not exist"),
    CliCase("basis glob naming no layer", _merge_args,
            lambda d: _toml(d, 'basis = { "Dense_9" = "scalar" }\n'),
            2, r"merge\.basis.*Dense_9.*(no|not).*layer"),
    CliCase("basis glob naming a parameter, not a layer", _merge_args,
            lambda d: _toml(d, 'basis = { "Dense_0/kernel" = "scalar", "*" = "full" }\n'),
            2, r"config key 'merge\.basis': .*pattern 'Dense_0/kernel' matches no layer path.*"
               r"parameter path 'Dense_0/kernel'.*use 'Dense_0'"),
    CliCase("basis glob shadowed by an earlier glob", _merge_args,
            lambda d: _toml(d, 'basis = { "Dense_*" = "full", "Dense_1" = "scalar" }\n'),
            2, r"config key 'merge\.basis': .*pattern 'Dense_1' is never used.*earlier pattern "
               r"'Dense_\*'"),
    CliCase("aggregate for DARE, which merges by task arithmetic", _merge_args,
            lambda d: _toml(d, 'method = "dare"\ndrop_rate = 0.5\naggregate = "sum"\n',
                            calibration=None),
            2, r"config key 'merge\.aggregate': applies to method ties, not 'dare'"),
    CliCase("scale of a ties basis without a ridge", _merge_args,
            lambda d: _toml(d, 'basis = "ties"\nscale = 0.5\n'),
            2, r"config key 'merge\.scale': with basis 'ties', scale is the prior .* ridge is 0 "
               r"for every layer, so it has no effect"),
    CliCase("calibration beside saved statistics", _merge_args,
            lambda d: _toml(d, stats=str(d / "empty")),
            2, r"config key 'calibration': a merge from saved statistics \('stats'\) reads no "
               r"calibration"),
    CliCase("mask_key for a merge from statistics without held-out data", _merge_args,
            lambda d: _toml(d, calibration=None, stats=str(d / "empty"), mask_key="attn_mask"),
            2, r"config key 'mask_key': a merge from saved statistics .* runs no batches"),
    CliCase("calibration for a method without data", _merge_args,
            lambda d: _toml(d, 'method = "soup"\n'),
            2, r"config key 'calibration': method 'soup' uses no calibration data"),
    CliCase("call_kwargs for a method without data", _merge_args,
            lambda d: "call_kwargs = { train = false }\n"
                      + _toml(d, 'method = "task_arithmetic"\n', calibration=None),
            2, r"config key 'call_kwargs': method 'task_arithmetic' uses no calibration data"),
    CliCase("pythonpath directory missing", _merge_args,
            lambda d: _toml(d, pythonpath=[str(Path(__file__).parent), str(d / "src")]),
            2, r"config key 'pythonpath\[1\]': no directory at .*src"),
    CliCase("--accept-other-finetunes for a merge from calibration",
            lambda d, c: [*_merge_args(d, c), "--accept-other-finetunes"], lambda d: _toml(d),
            2, r"--accept-other-finetunes applies to a merge from saved statistics .*'stats'"),
    CliCase("report --overwrite without --png",
            lambda d, c: ["report", str(d / "report.json"), "--overwrite"], None,
            2, r"--overwrite applies to --png"),
    CliCase("demo --overwrite without --json",
            lambda d, c: ["demo", "--quick", "--quiet", "--overwrite"], None,
            2, r"--overwrite applies to --json"),
    CliCase("missing fine-tune checkpoint", _merge_args,
            lambda d: _toml(d, finetuned=[str(d / "ft0"), str(d / "nowhere")]),
            2, r"config key 'finetuned\[1\]': no checkpoint directory at .*nowhere"),
    CliCase("model module not importable", _merge_args,
            lambda d: _toml(d, model="no_such_module:model"),
            2, r"config key 'model': cannot import module 'no_such_module'"),
    CliCase("calibration function missing", _merge_args,
            lambda d: _toml(d, calibration="cli_fixtures:nope"),
            2, r"config key 'calibration': module 'cli_fixtures' has no callable 'nope'"),
    CliCase("fine-tune directory is not a checkpoint", _merge_args,
            lambda d: _toml(d, finetuned=[str(d / "ft0"), str(d / "empty")]),
            1, r"merge failed: ValueError: load_params: .*empty is not an Orbax checkpoint"),
    CliCase("partial fine-tune checkpoint", _merge_args,
            lambda d: _toml(d, finetuned=[str(d / "ft0"), str(d / "torn")]),
            1, r"merge failed: ValueError: load_params: .*torn is incomplete or corrupted"),
    CliCase("fine-tune of another model", _merge_args,
            lambda d: _toml(d, finetuned=[str(d / "ft0"), str(d / "other")]),
            1, r"load_params: .*other does not match the template: .*Dense_0/kernel: stored "
               r"shape \(3, 3\), template shape \(5, 6\)"),
    CliCase("output exists", lambda d, c: ["merge", str(c), "--out", str(d / "empty")],
            lambda d: _toml(d), 2, r"empty exists; pass --overwrite"),
    CliCase("output is the base checkpoint",
            lambda d, c: ["merge", str(c), "--out", str(d / "base"), "--overwrite"],
            lambda d: _toml(d), 2, r"--out .*base: is the base checkpoint"),
    CliCase("unknown command-line option", lambda d, c: [*_merge_args(d, c), "--fast"],
            lambda d: _toml(d), 2, r"unrecognized arguments: --fast"),
    CliCase("report that is not a report", lambda d, c: ["report", str(d / "report.json")],
            None, 2, r"report\.json is not a jaxmerge report"),
]  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_xfail(c)) for c in CLI_CASES])
def test_bad_command_line(cli_inputs, tmp_path, capsys, case):
    originals = _snapshot(cli_inputs)
    config = tmp_path / "config.toml"
    if case.toml is not None:
        config.write_text(case.toml(cli_inputs))
    code = main(case.args(cli_inputs, config))
    err = capsys.readouterr().err
    assert code == case.code, f"exit code {code}, stderr:\n{err}"
    assert re.search(case.match, err, re.S), f"{case.match!r} not in:\n{err}"
    assert "Traceback" not in err.split("jaxmerge:")[-1]
    assert not (tmp_path / "out").exists()
    assert _snapshot(cli_inputs) == originals, "an input file was modified"


def test_catalogue_ids_are_unique():
    for table in (CASES, CLI_CASES):
        ids = [c.id for c in table]
        assert len(set(ids)) == len(ids)
