"""Tiny linen and NNX models for the whole-model tests (import them read-only).

Each family has an MLP, a CNN and a pre-LN transformer (embedding, learned positions, attention
with DenseGeneral/LinearGeneral projections, LayerNorm, GELU MLP, masked mean pooling, head).
``finetunes`` perturbs a parameter tree into K fake fine-tunes.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

VOCAB, DIM, HEADS, SEQ = 11, 8, 2, 6

# The transformers' learned positions "pos" are a parameter of the model itself, not of a layer,
# so a merge takes their fallback rule; tests that are about something else choose it by path
# (no UnsolvedParametersWarning), those about the fallback check the warning.
POS_MEAN = {"pos": "mean"}
POS_UNSOLVED = (
    r"'pos' \(mean: module class '(Linen|Nnx)Transformer' \((linen|nnx)\) is not a registered "
    r"layer kind \(a parameter of the root module itself, not of a layer in it\)\)"
)


# ---- linen ------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    hidden: int = 8
    out: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden)(x)
        return nn.Dense(self.out)(jnp.tanh(h))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="VALID")(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


class LinenAttention(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        shape = (HEADS, DIM // HEADS)
        q = nn.DenseGeneral(shape, name="query")(x)
        k = nn.DenseGeneral(shape, name="key")(x)
        v = nn.DenseGeneral(shape, name="value")(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(shape[1])
        logits = jnp.where(mask[:, None, None, :] > 0, logits, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(o)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        x = x + LinenAttention(name="attn")(nn.LayerNorm(name="ln1")(x), mask)
        h = nn.gelu(nn.Dense(2 * DIM, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(DIM, name="down")(h)


class LinenTransformer(nn.Module):
    @nn.compact
    def __call__(self, tokens, mask):
        pos = self.param("pos", nn.initializers.normal(0.1), (SEQ, DIM))
        x = nn.Embed(VOCAB, DIM, name="embed")(tokens) + pos[: tokens.shape[1]]
        x = LinenBlock(name="block")(x, mask)
        x = nn.LayerNorm(name="ln_f")(x)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return nn.Dense(3, name="head")(pooled)


# ---- NNX ----------------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, n_in=5, hidden=8, out=3, *, rngs):
        self.layers = nnx.List(
            [nnx.Linear(n_in, hidden, rngs=rngs), nnx.Linear(hidden, out, rngs=rngs)]
        )

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


class NnxCNN(nnx.Module):
    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), strides=2, padding="VALID", rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(x.mean(axis=(1, 2)))


class NnxTransformer(nnx.Module):
    def __init__(self, *, rngs):
        shape = (HEADS, DIM // HEADS)
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (SEQ, DIM)))
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.ln1 = nnx.LayerNorm(DIM, rngs=rngs)
        self.query = nnx.LinearGeneral(DIM, shape, rngs=rngs)
        self.key = nnx.LinearGeneral(DIM, shape, rngs=rngs)
        self.value = nnx.LinearGeneral(DIM, shape, rngs=rngs)
        self.out = nnx.LinearGeneral(shape, DIM, axis=(-2, -1), rngs=rngs)
        self.ln2 = nnx.LayerNorm(DIM, rngs=rngs)
        self.up = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
        self.down = nnx.Linear(2 * DIM, DIM, rngs=rngs)
        self.ln_f = nnx.RMSNorm(DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, 3, rngs=rngs)

    def __call__(self, tokens, mask):
        x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        h = self.ln1(x)
        q, k, v = self.query(h), self.key(h), self.value(h)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        logits = jnp.where(mask[:, None, None, :] > 0, logits, -1e9)
        x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v))
        x = x + self.down(nnx.gelu(self.up(self.ln2(x))))
        x = self.ln_f(x)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return self.head(pooled)


# ---- data and fine-tunes ------------------------------------------------------------------------


def finetunes(params, k: int, scale: float = 0.3, seed: int = 0):
    """``k`` perturbed copies of ``params`` (same structure, dtypes), each moving every leaf."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for t in range(k):
        keys = jax.random.split(jax.random.key(seed + 100 * t), len(leaves))
        new = [
            (a + scale * jax.random.normal(kk, a.shape, jnp.float32)).astype(a.dtype)
            for a, kk in zip(leaves, keys, strict=True)
        ]
        out.append(jax.tree.unflatten(treedef, new))
    return out


def token_batch(seed: int, batch: int = 4, low: int = 0, high: int = VOCAB):
    """``{"tokens", "mask"}`` with trailing padding (mask 0) of random length."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(low, high, size=(batch, SEQ)).astype(np.int32)
    lengths = rng.integers(3, SEQ + 1, size=batch)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.float32)
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
