"""Pretraining and fine-tuning with optax, cached on disk.

The image base model is a trunk pretrained with a 10-class head on Fashion-MNIST. Each task then
fine-tunes the whole trunk together with a fresh head of its own (AdamW); the trunks are what get
merged, the heads stay per task.

Trained parameters are cached under ``benchmarks/cache/`` as ``.npz`` files named by a hash of the
full training configuration (data sizes, seed, steps, learning rate, ...), so a rerun with the same
configuration loads instead of training and any change retrains.
"""

import dataclasses
import hashlib
import json
import pathlib

import data
import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
from flax import nnx

CACHE = pathlib.Path(__file__).resolve().parent / "cache"
VERSION = 1  # bump when training code changes in a way the configuration does not capture


def cache_key(config: dict) -> str:
    """A short stable hash of a JSON-serialisable configuration."""
    text = json.dumps({"version": VERSION, **config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_params(path: pathlib.Path, params) -> None:
    """Save a nested dict of arrays as ``.npz`` (keys are ``/``-joined paths)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = traverse.flatten_dict(jax.device_get(params), sep="/")
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    tmp.replace(path)


def load_params(path: pathlib.Path):
    """The nested dict saved by :func:`save_params`."""
    with np.load(path) as f:
        return traverse.unflatten_dict({k: jnp.asarray(f[k]) for k in f.files}, sep="/")


def fingerprint(params) -> str:
    """A short hash of a pytree's array contents (identifies a base model in cache keys)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse.flatten_dict(jax.device_get(params), sep="/").items()):
        digest.update(path.encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(inputs, labels) -> str:
    """A short hash of a task part's examples (arrays, dicts of arrays or lists of strings), so
    that a cache entry is never reused for a different split of the data."""
    if isinstance(inputs, list):
        inputs = np.frombuffer("\0".join(inputs).encode(), np.uint8)
    return fingerprint({"inputs": inputs, "labels": np.asarray(labels)})


def cached(config: dict, train_fn):
    """``train_fn()``'s parameters, loaded from the cache when ``config`` was trained before."""
    path = CACHE / f"{config['kind']}-{cache_key(config)}.npz"
    if path.exists():
        return load_params(path)
    params = train_fn()
    save_params(path, params)
    return params


def train(loss, params, x, y, *, steps: int, lr: float, batch: int, seed: int, weight_decay=1e-4):
    """AdamW (cosine decay) on ``loss(params, x_batch, y_batch)`` over random minibatches of
    ``(x, y)``; every leaf of ``params`` is trained."""
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)

    @jax.jit
    def step(params, state, xb, yb):
        grads = jax.grad(loss)(params, xb, yb)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    state = opt.init(params)
    x, y = jax.tree.map(jnp.asarray, x), jnp.asarray(y)
    for _ in range(steps):
        idx = jnp.asarray(rng.integers(0, len(y), batch))
        params, state = step(params, state, models.take(x, idx), y[idx])
    return params


def train_classifier(
    trunk, params, x, y, *, steps: int, lr: float, batch: int, seed: int, weight_decay=1e-4
):
    """:func:`train` on softmax cross-entropy of ``models.logits`` (trunk and head trained)."""

    def loss(p, xb, yb):
        out = models.logits(trunk, p, xb)
        return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()

    return train(loss, params, x, y, steps=steps, lr=lr, batch=batch, seed=seed,
                 weight_decay=weight_decay)  # fmt: skip


def pretrain(trunk_name: str, task, *, seed: int, steps: int, lr: float = 1e-3, batch: int = 128):
    """The base classifier: the trunk and a 10-class head trained on ``task`` (Fashion-MNIST)."""
    config = {
        "kind": f"pretrain-{trunk_name}",
        "task": task.name,
        "data": data_fingerprint(*task.train),
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "batch": batch,
    }

    def run():
        trunk = models.trunk_module(trunk_name)
        x, y = task.train
        params = models.init_classifier(trunk, task.num_classes, x, jax.random.PRNGKey(seed))
        return train_classifier(trunk, params, x, y, steps=steps, lr=lr, batch=batch, seed=seed)

    return cached(config, run)


def finetune(
    trunk_name: str,
    base_trunk,
    task,
    *,
    seed: int,
    steps: int,
    lr: float = 1e-3,
    batch: int = 64,
):
    """Fine-tune the base trunk with a fresh head on ``task``; returns ``{"trunk", "head"}``."""
    config = {
        "kind": f"finetune-{trunk_name}",
        "base": fingerprint(base_trunk),
        "task": task.name,
        "data": data_fingerprint(*task.train),
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "batch": batch,
    }

    def run():
        trunk = models.trunk_module(trunk_name)
        x, y = task.train
        key = jax.random.fold_in(jax.random.PRNGKey(seed), len(task.name))
        head = models.new_head(trunk, base_trunk, task.num_classes, x, key)
        params = {"trunk": base_trunk, "head": head}
        return train_classifier(trunk, params, x, y, steps=steps, lr=lr, batch=batch, seed=seed + 1)

    return cached(config, run)


IMAGE_STEPS = {False: {"pretrain": 1500, "finetune": 500}, True: {"pretrain": 150, "finetune": 60}}


def image_models(trunk_name: str, *, seed: int, quick: bool):
    """The image suite's base and fine-tuned classifiers, and the tasks.

    Returns ``(base, finetuned, tasks, pretrain_task)``: ``base`` and each ``finetuned[k]`` are
    ``{"trunk", "head"}`` parameters; ``tasks`` are :data:`data.IMAGE_TASKS` in order.
    """
    sizes = data.QUICK_SIZES if quick else data.Sizes()
    steps = IMAGE_STEPS[quick]
    fashion = data.image_task("fashion", seed=seed, sizes=sizes)
    tasks = [data.image_task(name, seed=seed, sizes=sizes) for name in data.IMAGE_TASKS]
    base = pretrain(trunk_name, fashion, seed=seed, steps=steps["pretrain"])
    tuned = [
        finetune(trunk_name, base["trunk"], t, seed=seed, steps=steps["finetune"]) for t in tasks
    ]
    return base, tuned, tasks, fashion


TEXT_START = {False: 4, True: 5}  # first fine-tuned block (``quick``: the top one only)
TEXT_LENGTH = {False: 32, True: 16}  # tokens per text, truncated and padded
TEXT_STEPS = {False: 120, True: 8}
# ``quick`` (a smoke test): every part a multiple of ``models.bottom_hidden``'s batch of 64 (no
# second program for a shorter last batch), the evaluation splits of one size (one compiled
# prediction per head), 128 training rows for the 8 × 32 examples a fine-tune draws.
TEXT_QUICK_SIZES = data.Sizes(val=64, test=64, calib=64, heldout=64, max_train=128)


def text_models(*, seed: int, quick: bool):
    """MiniLM-L6 fine-tuned on the text tasks: the top two blocks (``quick``: the top one) and a
    head per task.

    Returns ``(trunk, base, finetuned, tasks)``: ``trunk`` is :class:`models.TextTop` over blocks
    4–5 (``quick``: block 5); ``base`` and each ``finetuned[k]`` are ``{"trunk", "head"}``
    (``base["head"]`` is ``None``); the tasks' inputs are replaced by dicts ``{"hidden",
    "attention_mask"}`` of the frozen bottom blocks' outputs (computed once, cached).
    """
    sizes = TEXT_QUICK_SIZES if quick else data.Sizes(val=250, test=800, max_train=1024)
    module, params = models.load_minilm()
    tok = models.tokenizer()
    start = TEXT_START[quick]
    trunk = models.TextTop(module.config, start)
    base_trunk = {str(i): params["encoder"]["layer"][str(i)] for i in range(start, 6)}
    tasks = []
    for name in data.TEXT_TASKS:
        task = data.text_task(name, seed=seed, sizes=sizes)
        parts = {}
        for part in ("train", "val", "test", "calib", "heldout"):
            texts, labels = getattr(task, part)
            config = {
                "kind": "hidden",
                "task": name,
                "part": part,
                "seed": seed,
                "data": data_fingerprint(texts, labels),
                "length": TEXT_LENGTH[quick],
                "start": start,
                "quick": quick,
            }

            def compute(texts=texts):
                ids, mask = models.tokenize(texts, tok, TEXT_LENGTH[quick])
                hidden = models.bottom_hidden(module, params, ids, mask, start)
                return {"hidden": hidden, "attention_mask": mask}

            parts[part] = (cached(config, compute), labels)
        tasks.append(dataclasses.replace(task, **parts))
    tuned = []
    for task in tasks:
        config = {
            "kind": "finetune-minilm",
            "task": task.name,
            "seed": seed,
            "quick": quick,
            "steps": TEXT_STEPS[quick],
            "lr": 2e-4,
            "batch": 32,
            "data": data_fingerprint(*task.train),
        }

        def run(task=task):
            x, y = task.train
            key = jax.random.fold_in(jax.random.PRNGKey(seed), len(task.name))
            head = models.new_head(trunk, base_trunk, task.num_classes, x, key)
            return train_classifier(
                trunk,
                {"trunk": base_trunk, "head": head},
                x,
                y,
                steps=TEXT_STEPS[quick],
                lr=2e-4,
                batch=32,
                seed=seed + 1,
                weight_decay=0.01,
            )

        tuned.append(cached(config, run))
    return trunk, {"trunk": base_trunk, "head": None}, tuned, tasks


LLM_START = {False: 26, True: 29}  # first fine-tuned block of SmolLM2's 30 (``quick``: the top one)
LLM_LENGTH = {False: 64, True: 48}  # tokens per prompt, the text truncated, padded on the left
LLM_STEPS = {False: 150, True: 6}
LLM_LR = 1e-4
LLM_SIZES = {
    False: data.Sizes(val=100, test=300, calib=128, heldout=128, max_train=512),
    True: data.Sizes(val=32, test=32, calib=32, heldout=32, max_train=64),
}
GENERAL_SEQS = {False: (16, 128), True: (2, 64)}  # perplexity text: (sequences, tokens each)


@dataclasses.dataclass
class LlmSetup:
    """The language suite's models and data (see :func:`llm_models`).

    Attributes:
        top: ``models.llama_top``'s module over the fine-tuned blocks and the final norm.
        base: its base parameters (``nnx.State``); ``tuned``: one per task.
        tasks: the text tasks, inputs replaced by ``{"hidden", "attention_mask"}`` of the frozen
            bottom blocks on the task's prompts.
        table: the frozen token embedding ``(vocab, d)``, the tied head.
        labels: per task, the label words' first tokens (``models.label_ids``).
        general: ``({"hidden", "attention_mask"}, input_ids)`` of the perplexity text.
    """

    top: object
    base: object
    tuned: list
    tasks: list
    table: jax.Array
    labels: list
    general: tuple


def llm_models(*, seed: int, quick: bool) -> LlmSetup:
    """SmolLM2-135M-Instruct fine-tuned on each text task asked as an instruction
    (``data.llm_prompt``): its top four blocks and final norm (``quick``: the top block), AdamW
    on the cross-entropy of the label word's first token over the whole vocabulary at the
    prompt's last position. The token embedding (with it the tied head) and the bottom blocks
    stay frozen, so the bottom's outputs are computed once and cached."""
    model, tok = models.load_smollm2()
    start, length, sizes = LLM_START[quick], LLM_LENGTH[quick], LLM_SIZES[quick]
    top, base = models.llama_top(model, start)
    table = jnp.asarray(model.model.embed_tokens.embedding[...])
    graphdef = nnx.graphdef(top)

    def hidden(ids, mask):
        return {"hidden": models.llama_bottom_hidden(model, ids, mask, start),
                "attention_mask": mask}  # fmt: skip

    tasks, labels = [], []
    for name in data.TEXT_TASKS:
        task = data.text_task(name, seed=seed, sizes=sizes)
        prompt = data.llm_prompt(name)
        labels.append(models.label_ids(prompt, tok))
        parts = {}
        for part in ("train", "val", "test", "calib", "heldout"):
            texts, y = getattr(task, part)
            config = {"kind": "llm-hidden", "task": name, "part": part, "seed": seed,
                      "data": data_fingerprint(texts, y), "prompt": dataclasses.asdict(prompt),
                      "length": length, "start": start}  # fmt: skip
            tokens = lambda t=texts, p=prompt: models.prompt_tokens(t, p, tok, length)  # noqa: E731
            parts[part] = (cached(config, lambda tokens=tokens: hidden(*tokens())), y)
        tasks.append(dataclasses.replace(task, **parts))

    seqs, seq_len = GENERAL_SEQS[quick]
    config = {"kind": "llm-general", "seqs": seqs, "length": seq_len, "start": start}

    def general_hidden():
        ids = np.concatenate([e.ids for e in tok.encode_batch(data.general_text()[:400])])
        ids = ids[: seqs * seq_len].reshape(seqs, seq_len).astype(np.int32)
        return {**hidden(ids, np.ones_like(ids)), "input_ids": ids}

    general = cached(config, general_hidden)
    general = ({k: general[k] for k in ("hidden", "attention_mask")}, general["input_ids"])

    tuned = []
    for task, label in zip(tasks, labels, strict=True):
        config = {"kind": "finetune-smollm2", "task": task.name, "seed": seed, "start": start,
                  "steps": LLM_STEPS[quick], "lr": LLM_LR, "batch": 16, "length": length,
                  "labels": label.tolist(), "data": data_fingerprint(*task.train)}  # fmt: skip

        def loss(p, xb, yb, label=label):
            features = nnx.merge(graphdef, p)(**xb)
            return optax.softmax_cross_entropy_with_integer_labels(
                features @ table.T, jnp.asarray(label)[yb]
            ).mean()

        def run(task=task, loss=loss):
            trained = train(loss, base, *task.train, steps=LLM_STEPS[quick], lr=LLM_LR,
                            batch=16, seed=seed + 1, weight_decay=0.01)  # fmt: skip
            return models.state_to_dict(trained)

        tuned.append(models.dict_to_state(base, cached(config, run)))
    return LlmSetup(top, base, tuned, tasks, table, labels, general)
