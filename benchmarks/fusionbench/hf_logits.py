"""Hugging Face ``LlamaForCausalLM`` logits and greedy continuation on a saved checkpoint (runs in
the FusionBench environment, which has CPU torch and transformers).

Usage (``benchmarks/llama_vs_hf.py`` calls it)::

    benchmarks/.fusionbench-venv/bin/python benchmarks/fusionbench/hf_logits.py CKPT IN.npz OUT.npz

``CKPT``: a directory written by ``jaxmerge.save_llama_safetensors``; ``IN.npz``: ``ids``
(batch, seq) and ``prompt`` (1, n) token ids, ``new_tokens``; ``OUT.npz`` gets ``logits``
(float32, eager attention), ``greedy`` (``generate(do_sample=False)``'s ids) and ``seconds``.
"""

import sys
import time

import numpy as np
import torch
from transformers import LlamaForCausalLM


def main(ckpt, inp, out):
    data = np.load(inp)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = LlamaForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.as_tensor(data["ids"])).logits.numpy()
        greedy = model.generate(
            torch.as_tensor(data["prompt"]),
            do_sample=False,
            max_new_tokens=int(data["new_tokens"]),
            min_new_tokens=int(data["new_tokens"]),
        )
    np.savez(out, logits=logits, greedy=greedy.numpy(), seconds=time.perf_counter() - start)


if __name__ == "__main__":
    main(*sys.argv[1:])
