"""FusionBench's RegMean on exported weights and calibration data, timed (runs in its own venv).

Usage (``benchmarks/speed.py`` calls it)::

    benchmarks/.fusionbench-venv/bin/python benchmarks/fusionbench/run_regmean.py IN.npz OUT.npz

``IN.npz`` holds ``kind`` (``"mlp"``, ``"bert"`` or ``"llama"``: ``LlamaForCausalLM``), ``config``
(JSON text: the MLP's widths or the Hugging Face config), ``num_models``, ``batch``, ``alpha``,
``dtype`` (``"float32"`` or ``"float64"``: models and inputs are cast to it), the PyTorch state
dicts ``base/<name>`` and ``model{k}/<name>``, and per-model calibration inputs ``calib{k}/x`` (MLP)
or ``calib{k}/input_ids`` and ``calib{k}/attention_mask`` (BERT, Llama), and optionally ``repeats``
(default 1). ``OUT.npz`` gets the merged state dict, ``seconds``, the wall time of
``RegMeanAlgorithm.run`` (Gram accumulation with forward hooks over the calibration batches, the
solve, loading the merged state dict), and ``forward_seconds``, the same forward passes without
hooks, timed before it; with ``repeats``, each the median over that many runs.

FusionBench's ``RegMeanAlgorithm`` leaves ``get_regmean_weights`` to subclasses that load datasets
by name; the subclass here runs offline on in-memory tensors, with the same hook that FusionBench's
CLIP and GPT-2 variants use (token-averaged ``XᵀX`` per Linear module).
"""

import json
import sys
import time

import numpy as np
import torch
from fusion_bench.method.regmean.regmean import RegMeanAlgorithm
from fusion_bench.modelpool import BaseModelPool
from torch import nn

FALLBACKS = []
_inverse = torch.inverse


def inverse_or_pinv(a):
    """``torch.inverse``, or the pseudo-inverse where FusionBench's explicit inverse fails.

    ReLU units that are zero on every calibration input (and pixels that are) give Gram matrices
    with zero rows, which ``torch.inverse`` rejects; the pseudo-inverse gives RegMean's
    minimum-norm solution there. Each fallback is counted and reported.
    """
    try:
        return _inverse(a)
    except torch.linalg.LinAlgError:
        FALLBACKS.append(tuple(a.shape))
        return torch.linalg.pinv(a, hermitian=True)


torch.inverse = inverse_or_pinv  # FusionBench's RegMean calls torch.inverse


class MLP(nn.Module):
    """The benchmark MLP trunk: flatten → Linear → ReLU → Linear → ReLU."""

    def __init__(self, n_in: int, width: int):
        super().__init__()
        self.dense0 = nn.Linear(n_in, width)
        self.dense1 = nn.Linear(width, width)

    def forward(self, x):
        x = torch.relu(self.dense0(x.reshape(x.shape[0], -1)))
        return torch.relu(self.dense1(x))


class InMemoryModelPool(BaseModelPool):
    """A model pool over in-memory modules whose 'train datasets' are lists of input batches."""

    def __init__(self, models: dict, batches: dict):
        super().__init__(models)
        self._batches = batches

    def load_train_dataset(self, dataset_name, *args, **kwargs):
        return self._batches[dataset_name]


class InMemoryRegMean(RegMeanAlgorithm):
    """FusionBench's RegMean with the Gram matrices computed from in-memory batches."""

    def get_regmean_weights(self, model_name, model, train_dataset, linear_modules_to_merge):
        regmean_weights, num_computed = {}, {}

        def hook_for(module_name):
            def hook(module, inputs, output):
                x = inputs[0].detach()
                x = x.reshape(-1, x.shape[-1])
                xtx = torch.matmul(x.transpose(0, 1), x)
                if module_name not in regmean_weights:
                    regmean_weights[module_name] = xtx / x.shape[0]
                    num_computed[module_name] = x.shape[0]
                else:
                    regmean_weights[module_name] = (
                        regmean_weights[module_name] * num_computed[module_name] + xtx
                    ) / (num_computed[module_name] + x.shape[0])
                    num_computed[module_name] += x.shape[0]

            return hook

        handles = [
            m.register_forward_hook(hook_for(name)) for name, m in linear_modules_to_merge.items()
        ]
        for batch in train_dataset:
            model(**batch)
        for h in handles:
            h.remove()
        return regmean_weights


def build(kind: str, config: dict) -> nn.Module:
    if kind == "mlp":
        return MLP(config["n_in"], config["width"])
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**config))
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(**config))


def tied(kind: str, config: dict) -> set:
    """Parameter names a tied checkpoint does not hold (the head reads the embedding)."""
    return {"lm_head.weight"} if kind == "llama" and config.get("tie_word_embeddings") else set()


def state_dict(data, prefix: str) -> dict:
    return {
        k[len(prefix) + 1 :]: torch.from_numpy(np.array(data[k]))
        for k in data.files
        if k.startswith(prefix + "/")
    }


def calibration(data, kind: str, k: int, batch: int, dtype) -> list[dict]:
    if kind == "mlp":
        x = torch.from_numpy(np.array(data[f"calib{k}/x"])).to(dtype)
        return [{"x": x[i : i + batch]} for i in range(0, len(x), batch)]
    ids = torch.from_numpy(np.array(data[f"calib{k}/input_ids"])).long()
    mask = torch.from_numpy(np.array(data[f"calib{k}/attention_mask"])).long()
    return [
        {"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch]}
        for i in range(0, len(ids), batch)
    ]


def main(src: str, dst: str) -> None:
    torch.manual_seed(0)
    data = np.load(src)
    kind = str(data["kind"])
    config = json.loads(str(data["config"]))
    num_models, batch = int(data["num_models"]), int(data["batch"])
    alpha = float(data["alpha"])
    dtype = {"float32": torch.float32, "float64": torch.float64}[str(data["dtype"])]

    def load(prefix):
        model = build(kind, config)
        missing, unexpected = model.load_state_dict(state_dict(data, prefix), strict=False)
        missing = [
            m for m in missing if not m.endswith("position_ids") and m not in tied(kind, config)
        ]
        if unexpected or missing:
            raise SystemExit(f"{prefix}: missing {missing}, unexpected {unexpected}")
        return model.to(dtype).eval()

    names = [f"model{k}" for k in range(num_models)]
    models = {"_pretrained_": load("base"), **{n: load(n) for n in names}}
    batches = {n: calibration(data, kind, k, batch, dtype) for k, n in enumerate(names)}
    pool = InMemoryModelPool(models, batches)
    algorithm = InMemoryRegMean(
        num_regmean_examples=10**9,
        exclude_param_names_regex=[],
        reduce_non_diagonal_ratio=alpha,
        weight_transpose=True,
    )
    repeats = int(data["repeats"]) if "repeats" in data.files else 1
    forward_times, merge_times = [], []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for name in names:  # the forward passes alone (and torch warmed up for the merge)
                for b in batches[name]:
                    models[name](**b)
            forward_times.append(time.perf_counter() - start)
            FALLBACKS.clear()
            start = time.perf_counter()
            merged = algorithm.run(pool)
            merge_times.append(time.perf_counter() - start)
    forward_seconds, seconds = float(np.median(forward_times)), float(np.median(merge_times))
    out = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    np.savez(
        dst,
        seconds=seconds,
        forward_seconds=forward_seconds,
        torch_threads=torch.get_num_threads(),
        pinv_fallbacks=len(FALLBACKS),
        **out,
    )
    print(json.dumps({"seconds": seconds, "torch": torch.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
