"""The embedded default: merging three fine-tuned digit classifiers (scikit-learn's digits).

A Flax MLP (64 → 64 → 64 → 10, ReLU) is pretrained with optax on the 8×8 digits, then fine-tuned
three times, once per task: the digits with inverted intensities, shifted right by two pixels,
and mirrored left to right. Each fine-tune is good at its own task; the question is how much of
the three a single merged model keeps. Every method merges the same checkpoints: the uniform soup,
task arithmetic, TIES and DARE (data free), RegMean, and the output-space projection (QP) with the
scalar, diagonal, full and low-rank bases, in parallel and sequentially. Calibration is 128
training images per task; ρ is reported on them and on 128 other (held-out) training images; the
accuracies are on the test split. The data-free heuristics use their common settings, untuned
(task arithmetic λ = 0.3, TIES density 0.2 with λ = 1, DARE p = 0.9 with λ = 0.3); on this small
dense network trimming and dropping hurt them badly, which the table shows as it is.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

__all__ = ["run_demo"]

TASKS = ("inverted", "shifted", "mirrored")
CALIBRATION_ROWS = 128


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def _transform(task: str, x: np.ndarray) -> np.ndarray:
    img = x.reshape(-1, 8, 8)
    if task == "inverted":
        img = 1.0 - img
    elif task == "shifted":
        img = np.pad(img, ((0, 0), (0, 0), (2, 0)))[:, :, :8]
    elif task == "mirrored":
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img.reshape(-1, 64), dtype=np.float32)


def _trainer(model, steps: int, lr: float):
    opt = optax.adam(lr)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    @jax.jit
    def train(params, x, y):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p, x, y)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return params

    return train


def run_demo(*, seed: int = 0, quick: bool = False, quiet: bool = False) -> dict:
    """Merge three fine-tuned digit classifiers with every method and print a table.

    Args:
        seed: seed of the data split and initialisation.
        quick: fewer training steps and methods (for tests; under 30 s on two cores).
        quiet: print nothing.

    Returns:
        ``{"tasks": [...], "methods": {name: {"accuracy": [per task], "mean": float,
        "rho": float | None, "rho_heldout": float | None}}, "seconds": float}``; ρ is ``None``
        for methods that use no calibration data. From the shell: ``jaxmerge demo [--quick]``
        (exercised by ``tests/test_readme.py``).
    """
    from sklearn.datasets import load_digits

    from ..core.bases import LowRank
    from ..methods.arithmetic import soup, task_arithmetic
    from ..methods.dare import dare
    from ..methods.ties import ties
    from ..model import collect_stats, merge, solve_stats

    start = time.perf_counter()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    test = np.arange(len(y)) % 4 == 0
    x_tr, y_tr, x_te, y_te = x[~test], y[~test], x[test], y[test]

    model = _MLP()
    steps = (100, 200) if quick else (200, 400)
    init = model.init(jax.random.key(seed), x_tr[:1])
    base = _trainer(model, steps[0], 1e-2)(init, x_tr, y_tr)
    finetune = _trainer(model, steps[1], 1e-2)
    finetuned = [finetune(base, _transform(t, x_tr), y_tr) for t in TASKS]

    rows = np.random.default_rng(seed + 1).permutation(len(y_tr))
    calib_rows, held_rows = rows[:CALIBRATION_ROWS], rows[CALIBRATION_ROWS : 2 * CALIBRATION_ROWS]
    calibration = [[_transform(t, x_tr[calib_rows])] for t in TASKS]
    heldout = [[_transform(t, x_tr[held_rows])] for t in TASKS]
    tests = [(jnp.asarray(_transform(t, x_te)), y_te) for t in TASKS]
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))

    def score(params, report=None):
        acc = [float(jnp.mean(predict(params, xt) == yt)) for xt, yt in tests]
        rho = None if report is None else report.rho
        held = None if report is None else report.rho_heldout
        return {"accuracy": acc, "mean": float(np.mean(acc)), "rho": rho, "rho_heldout": held}

    methods = {"base": score(base)}
    for task, params in zip(TASKS, finetuned, strict=True):
        methods[f"finetune {task}"] = score(params)
    methods["soup"] = score(soup(base, finetuned))
    methods["task arithmetic 0.3"] = score(task_arithmetic(base, finetuned, scale=0.3))
    methods["TIES 0.2, 1.0"] = score(ties(base, finetuned, density=0.2, scale=1.0))
    key = jax.random.key(seed)
    methods["DARE 0.9, 0.3"] = score(dare(base, finetuned, key, drop_rate=0.9, scale=0.3))

    stats = collect_stats(model, finetuned, calibration, progress=False)
    held = collect_stats(model, finetuned, heldout, progress=False)
    solves = {"RegMean 0.9": dict(basis="full", alpha=0.9)}
    for basis in ("scalar", "diagonal", "full"):
        solves[f"QP {basis}"] = dict(basis=basis)
    if not quick:
        solves["QP low-rank 8"] = dict(basis=LowRank(8))
    for name, options in solves.items():
        merged, report = solve_stats(stats, base, finetuned, heldout=held, progress=False,
                                     **options)  # fmt: skip
        methods[name] = score(merged, report)
    if not quick:
        merged, report = merge(model, base, finetuned, calibration, algorithm="sequential",
                               heldout=heldout, progress=False)  # fmt: skip
        methods["QP full, sequential"] = score(merged, report)

    result = {"tasks": list(TASKS), "methods": methods, "seconds": time.perf_counter() - start}
    if not quiet:
        _print_table(result)
    return result


def _print_table(result: dict) -> None:
    def num(v):
        return "" if v is None else f"{v:.3f}"

    names = result["tasks"]
    head = f"{'method':<22}" + "".join(f"{t:>10}" for t in names)
    print(head + f"{'mean':>8}{'rho':>8}{'rho held':>10}")
    for name, r in result["methods"].items():
        accs = "".join(f"{a:10.3f}" for a in r["accuracy"])
        print(f"{name:<22}{accs}{r['mean']:8.3f}{num(r['rho']):>8}{num(r['rho_heldout']):>10}")
    print(
        f"({result['seconds']:.1f} s; test accuracy per task; rho = fraction of the fine-tunes' "
        "residual output energy the merge captures, on the calibration images and on held-out "
        "images; data-free methods have none)"
    )
