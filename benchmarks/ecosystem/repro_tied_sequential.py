"""Reproducer: the sequential merge solves a tied embedding's head on the fallback model's hidden
states, not the merged model's.

Run: benchmarks/.ecosystem-venv/bin/python benchmarks/ecosystem/repro_tied_sequential.py (~1 min)

A tiny Gemma 2-style Transformer (its ``Embedder`` table is read by ``encode``, the lookups, and
by ``decode``, the tied head ``h Eᵀ``), K = 3 perturbed fine-tunes, one calibration batch per
task, ``jaxmerge.merge(..., algorithm="sequential")``. The merged table is compared with numpy
least squares (``eco_reference.embed_figures``) of the lookups and the head, the head's input
rows taken from (a) the merged model's own pass (the sequential algorithm's definition: a layer
solved on the partially merged model's activations, which at the head are the merged model's)
and (b) the fallback model's pass (every parameter the mean of the fine-tunes). It matches (b)
to rounding and is far from (a), further than the plain mean of the fine-tunes.
"""

import os
import pathlib
import sys
import warnings

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from eco_gemma import GemmaModel  # noqa: E402
from eco_reference import embed_figures  # noqa: E402

import jaxmerge as jm  # noqa: E402

model = GemmaModel("gemma2")
rng = np.random.default_rng(0)
fts = [jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape), model.base)
       for _ in range(3)]  # fmt: skip
cal = [[model.batch(np.random.default_rng([0, k]).integers(1, model.vocab, (8, 16)))]
       for k in range(3)]  # fmt: skip
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    merged, report = jm.merge(model.model, model.base, fts, cal, algorithm="sequential",
                              progress=False)  # fmt: skip
centre = jax.tree.map(lambda *a: sum(a) / len(a), *fts)
key = "embedder/input_embedding"
own = [model.record(f, c)[key] for f, c in zip(fts, cal, strict=True)]
layer = own[0]
table = layer.matrix(model.flat(merged))
finetuned = [layer.matrix(model.flat(f)) for f in fts]
for name, tree in (("merged model", merged), ("fallback (mean) model", centre)):
    heads = [model.record(tree, c)[key].calls for c in cal]
    fig = embed_figures(heads, [o.calls for o in own], table, finetuned, layer.scale)
    print(
        f"head inputs from the {name}: merged table's relative error "
        f"{fig['weight_rel_err']:.2e} (weights), {fig['prediction_rel_err']:.2e} "
        f"(predictions); the plain mean's {fig['mean_weight_rel_err']:.2e}"
    )
