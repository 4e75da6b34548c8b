"""mergekit's TIES or DARE on Hugging Face checkpoints, timed (runs in the FusionBench venv, where
``setup.sh`` installs ``mergekit==0.1.5``).

Usage (``benchmarks/speed.py`` calls it)::

    benchmarks/.fusionbench-venv/bin/python benchmarks/fusionbench/run_mergekit.py ARGS.json

``ARGS.json`` holds ``method`` (``"ties"`` or ``"dare_linear"``), ``base`` and ``models``
(checkpoint directories), ``density``, ``seed`` (mergekit's ``--random-seed``), ``out`` (the merged
checkpoint's directory) and ``result`` (a JSON file written with ``seconds``, the wall time of
``mergekit.merge.run_merge``: loading, merging and writing, and ``torch_threads``). Every model
gets ``weight = 1``; the configuration is what ``mergekit-yaml`` would read.

For DARE, ``masks`` names an ``.npz`` file that receives the keep masks mergekit drew (bit-packed
with ``numpy.packbits``, under ``"<k>/<tensor name>"`` with ``shape/<k>/<tensor name>``), so that
the same masks can be given to another implementation. They are recorded by drawing exactly as
``mergekit.sparsify.bernoulli`` does (the same ``torch.bernoulli`` call, so the same random stream)
inside ``GeneralizedTaskArithmeticMerge.merge_group``, which names the tensor and the models.
"""

import json
import sys
import time

import numpy as np
import torch
import yaml
from mergekit import sparsify
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

MASKS = {}
_current = {}
_merge_group = GeneralizedTaskArithmeticMerge.merge_group


def merge_group(self, group, /, **parameters):
    _current["name"] = group.metadata.name
    _current["ids"] = [str(e.id) for e in group.non_base]
    _current["next"] = 0
    return _merge_group(self, group, **parameters)


def recording_bernoulli(tensor, density, rescale_norm=None):
    """``mergekit.sparsify.bernoulli``, recording the mask it draws."""
    if density >= 1:
        return tensor
    work_dtype = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density, dtype=work_dtype))
    entry = _current["ids"][_current["next"]]
    _current["next"] += 1
    MASKS[(entry, _current["name"])] = mask.numpy().astype(bool)
    res = sparsify.rescaled_masked_tensor(tensor.to(work_dtype), mask, rescale_norm)
    return res.to(tensor.dtype)


def main(path: str) -> None:
    args = json.loads(open(path).read())
    models = [{"model": m, "parameters": {"weight": 1.0, "density": args["density"]}}
              for m in args["models"]]  # fmt: skip
    config = {"merge_method": args["method"], "base_model": args["base"], "models": models,
              "dtype": "float32"}  # fmt: skip
    if args.get("masks"):
        GeneralizedTaskArithmeticMerge.merge_group = merge_group
        sparsify.bernoulli = recording_bernoulli
    options = MergeOptions(random_seed=args["seed"], copy_tokenizer=False, write_model_card=False,
                           quiet=True)  # fmt: skip
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    start = time.perf_counter()
    run_merge(merge_config, args["out"], options=options)
    seconds = time.perf_counter() - start
    if args.get("masks"):
        index = {m: k for k, m in enumerate(args["models"])}
        packed = {}
        for (entry, name), mask in MASKS.items():
            k = next(index[m] for m in index if m in entry)
            packed[f"{k}/{name}"] = np.packbits(mask.ravel())
            packed[f"shape/{k}/{name}"] = np.array(mask.shape)
        np.savez(args["masks"], **packed)
    result = {"seconds": seconds, "torch_threads": torch.get_num_threads(),
              "masks_recorded": len(MASKS), "config": config}  # fmt: skip
    open(args["result"], "w").write(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
