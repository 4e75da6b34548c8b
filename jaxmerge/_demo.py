"""The embedded default: merging two fine-tuned digit classifiers (scikit-learn's digits).

A softmax classifier ``logits = x @ W + b`` on the 8×8 digits is pretrained on a small sample of
all ten classes, then fine-tuned twice: on digits 0–4 and on digits 5–9. Each fine-tune forgets
the other half. The merges are scored by accuracy on held-out digits of both halves.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._bases import LowRank
from ._solve_layer import solve_layer
from ._stats import layer_stats

__all__ = ["run_demo"]


def _train(params, x, y, steps, lr):
    opt = optax.adam(lr)

    def loss(p):
        logits = x @ p[0] + p[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return params

    return run(params)


def _accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(x @ params[0] + params[1], -1) == y))


def run_demo(*, seed: int = 0, quiet: bool = False) -> dict:
    """Merge two fine-tuned digit classifiers with every basis and print a table.

    Args:
        seed: seed of the data split and initialisation.
        quiet: print nothing.

    Returns:
        ``{"tasks": [...], "methods": {name: {"accuracy": [per task], "mean": float,
        "rho": float | None}}, "seconds": float}``.

    Examples:
        >>> result = run_demo(quiet=True)
        >>> list(result["methods"])[:4]
        ['base', 'finetune 0-4', 'finetune 5-9', 'average']
    """
    from sklearn.datasets import load_digits

    start = time.perf_counter()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    test = np.arange(len(y)) % 3 == 0
    x_tr, y_tr, x_te, y_te = x[~test], y[~test], x[test], y[test]
    halves = [y_tr < 5, y_tr >= 5]
    test_halves = [y_te < 5, y_te >= 5]

    key = jax.random.PRNGKey(seed)
    base = (0.01 * jax.random.normal(key, (64, 10)), jnp.zeros(10))
    pre = np.arange(len(y_tr)) < 100  # a weak base: 100 examples, few steps
    base = _train(base, x_tr[pre], y_tr[pre], steps=30, lr=1e-2)
    finetuned = [_train(base, x_tr[h], y_tr[h], steps=200, lr=1e-2) for h in halves]

    # Calibration: inputs of each task, targets the fine-tuned model's logits.
    calib = [x_tr[h][:200] for h in halves]
    stats = layer_stats(calib, [c @ w + b for c, (w, b) in zip(calib, finetuned, strict=True)])

    def score(params, rho=None):
        acc = [_accuracy(params, x_te[h], y_te[h]) for h in test_halves]
        return {"accuracy": acc, "mean": float(np.mean(acc)), "rho": rho}

    methods = {"base": score(base)}
    for name, p in zip(["finetune 0-4", "finetune 5-9"], finetuned, strict=True):
        methods[name] = score(p)
    avg = jax.tree.map(lambda *a: sum(a) / len(a), *finetuned)
    methods["average"] = score(avg)
    for basis in ["scalar", "diagonal", "full", LowRank(4)]:
        sol = solve_layer(stats, base, finetuned, basis=basis)
        name = f"QP {basis}" if isinstance(basis, str) else f"QP low-rank {basis.rank}"
        methods[name] = score((sol.kernel, sol.bias), float(sol.energy_fraction))
    result = {
        "tasks": ["digits 0-4", "digits 5-9"],
        "methods": methods,
        "seconds": time.perf_counter() - start,
    }
    if not quiet:
        print(f"{'method':<16} {'0-4':>6} {'5-9':>6} {'mean':>6} {'rho':>6}")
        for name, r in methods.items():
            rho = "" if r["rho"] is None else f"{r['rho']:.3f}"
            a, b = r["accuracy"]
            print(f"{name:<16} {a:6.3f} {b:6.3f} {r['mean']:6.3f} {rho:>6}")
        print(
            f"({result['seconds']:.1f} s; rho = fraction of the fine-tunes' residual energy "
            "captured on the calibration data)"
        )
    return result
