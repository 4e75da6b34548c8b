r"""The ecosystem benchmark's reference: numpy float64 least squares on recorded layer inputs,
written without any of jaxmerge's code.

A layer's calls are recorded by the model adapters (``eco_gemma``, ``eco_maxtext``) as
:class:`Call`\ s: the input ``x`` and output ``y`` of one call of an einsum layer with its
equation, or of a norm with its normalised input ``x̂``. This module turns them into rows and
solves, per layer,

    ``W_ref = argmin_W Σₖ ‖X̃ₖ W − Yₖ‖² / Nₖ``        (``np.linalg.lstsq``, minimum norm)

* **einsum** ``x, w -> y`` with one weight: every index is a row (in ``x`` and ``y``), contracted
  (``x`` and ``w``), an output (``w`` and ``y``); ``X̃`` is ``x`` transposed to
  ``(rows…, contracted…)`` and flattened, ``W`` is the weight transposed to
  ``(contracted…, outputs…)`` (both in the weight's order), ``Y`` the output transposed to
  ``(rows…, outputs…)``; a bias adds a column of ones to ``X̃`` and a row to ``W``.
* **norm**: per channel ``c`` the 1-D fit ``y_c = s_c x̂_c`` (``s`` the effective scale,
  ``1 + scale`` for gemma's RMSNorm), ``s_c = Σₖ Σ x̂_c y_c / Nₖ ÷ Σₖ Σ x̂_c² / Nₖ``.
* **embed**: a table ``E (V, d)`` read by lookups ``y = s · E[t]`` (``s = √d`` in gemma) and, when
  tied, by a head ``z = h Eᵀ`` (gemma's ``Embedder.decode``). Both are output errors of the
  same rows, so the objective ``Σₖ (‖lookup residuals‖² + ‖head residuals‖²) / Nₖ`` (``Nₖ`` the
  task's lookup rows) separates by row ``v``: one least squares per row, on the stacked blocks
  ``√(c_kv/Nₖ) s I → √(c_kv/Nₖ) ȳ_kv`` (``c_kv`` occurrences of token ``v`` in task ``k``, ``ȳ``
  their mean target) and ``Hₖ/√Nₖ → Zₖ[:, v]/√Nₖ``. Without a head, rows of unseen tokens are
  undetermined: the weight error is over the seen rows, and the unseen ones are compared with
  the mean of the fine-tunes (the fallback jaxmerge documents for them).

The figures of a layer: rows, rank and condition number of the weighted Gram matrix
``Σₖ X̃ₖᵀX̃ₖ / Nₖ``, the relative weight error ``max|W_merged − W_ref| / max|W_ref|`` (meaningful
when the Gram matrix has full rank, where least squares is unique), the relative prediction
error ``‖X̃ (W_merged − W_ref)‖ / ‖X̃ W_ref‖`` over the stacked weighted rows (meaningful always),
the same two for the plain mean of the fine-tunes (for scale), and a self-check of the recorded
rows: ``max|X̃ₖ Wₖ − Yₖ| / max|Yₖ|`` with fine-tune ``k``'s own weights on its own pass.
"""

import dataclasses
import string

import numpy as np

__all__ = ["Call", "einsum_roles", "embed_figures", "layer_figures", "lookup_table"]


@dataclasses.dataclass
class Call:
    """One recorded call of a layer.

    Attributes:
        kind: ``"einsum"``, ``"norm"``, or an embedding's ``"lookup"`` or ``"head"``.
        x: the input (einsum, head), the normalised input ``x̂`` (norm) or the token ids
            (lookup).
        y: the output, float64.
        equation: the einsum's ``"x,w->y"`` (einsum only).
        bias: whether the layer has a bias.
    """

    kind: str
    x: np.ndarray
    y: np.ndarray
    equation: str | None = None
    bias: bool = False


def einsum_roles(equation: str, x_ndim: int):
    """``(x, w, y, rows, ins, outs)`` index strings of ``equation`` with ``...`` spelled out for an
    input of ``x_ndim`` axes; rows in ``x``'s order, ins and outs in ``w``'s order."""
    eq = equation.replace(" ", "")
    lhs, y = eq.split("->")
    x, w = lhs.split(",")
    free = [c for c in string.ascii_letters if c not in eq]
    if "..." in x:
        fill = "".join(free[: x_ndim - (len(x) - 3)])
        x = x.replace("...", fill)
        y = y.replace("...", fill)
    assert len(x) == x_ndim, (equation, x_ndim)
    assert not set(w) & set(y) & set(x), f"{equation}: group indices are not used here"
    rows = "".join(c for c in x if c not in w)
    ins = "".join(c for c in w if c in x)
    outs = "".join(c for c in w if c in y)
    assert sorted(rows + ins) == sorted(x) and sorted(ins + outs) == sorted(w), equation
    assert sorted(rows + outs) == sorted(y), equation
    return x, w, y, rows, ins, outs


def _flatten(a: np.ndarray, have: str, want_lead: str, want_tail: str) -> np.ndarray:
    a = np.transpose(a, [have.index(c) for c in want_lead + want_tail])
    lead = int(np.prod(a.shape[: len(want_lead)], dtype=np.int64))
    return a.reshape(lead, -1)


def einsum_rows(call: Call) -> tuple[np.ndarray, np.ndarray]:
    """``(X̃, Y)`` of one einsum call (``X̃`` with a column of ones when the layer has a bias)."""
    x, _, y, rows, ins, outs = einsum_roles(call.equation, call.x.ndim)
    xs = _flatten(call.x, x, rows, ins)
    ys = _flatten(call.y, y, rows, outs)
    if call.bias:
        xs = np.concatenate([xs, np.ones((xs.shape[0], 1))], axis=1)
    return xs, ys


def einsum_matrix(equation: str, x_ndim: int, weight, bias=None) -> np.ndarray:
    """The weight as ``(contracted, outputs)`` (a bias row appended)."""
    _, w, _, _, ins, outs = einsum_roles(equation, x_ndim)
    m = _flatten(np.asarray(weight, np.float64), w, ins, outs)
    if bias is not None:
        m = np.concatenate([m, np.asarray(bias, np.float64).reshape(1, -1)], axis=0)
    return m


def _rows(calls: list[Call]) -> tuple[np.ndarray, np.ndarray]:
    if calls[0].kind == "einsum":
        parts = [einsum_rows(c) for c in calls]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    c = calls[0].x.shape[-1]
    return (np.concatenate([k.x.reshape(-1, c) for k in calls]),
            np.concatenate([k.y.reshape(-1, c) for k in calls]))  # fmt: skip


def _apply(kind: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x @ w if kind == "einsum" else x * w[None, :]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny))


def _embed_rows(calls: list[Call]):
    lookups = [c for c in calls if c.kind == "lookup"]
    heads = [c for c in calls if c.kind == "head"]
    d = lookups[0].y.shape[-1]
    t = np.concatenate([c.x.reshape(-1) for c in lookups])
    y = np.concatenate([c.y.reshape(-1, d) for c in lookups])
    if not heads:
        return t, y, None, None
    v = heads[0].y.shape[-1]
    return (t, y, np.concatenate([c.x.reshape(-1, d) for c in heads]),
            np.concatenate([c.y.reshape(-1, v) for c in heads]))  # fmt: skip


def lookup_table(targets, scale: float, finetuned) -> np.ndarray:
    """The table least squares gives from a tied table's lookups alone (the rows its head does
    not enter): per seen row ``v`` the weighted mean of the targets ``ȳ_kv / s``, weights
    ``c_kv/Nₖ``; unseen rows the mean of the fine-tunes. ``targets``: per task, the layer's
    calls on fine-tune ``k``'s own pass."""
    table = np.mean(np.stack(finetuned), axis=0)
    num, den = np.zeros_like(table), np.zeros(table.shape[0])
    for calls in targets:
        tok, y, _, _ = _embed_rows(calls)
        w = 1.0 / tok.shape[0]
        np.add.at(num, tok, w * y / scale)
        np.add.at(den, tok, w)
    seen = den > 0
    table[seen] = num[seen] / den[seen, None]
    return table


def embed_figures(inputs, targets, merged, finetuned, scale: float) -> dict:
    """:func:`layer_figures` of an embedding table (see the module docs)."""
    vocab, d = merged.shape
    tasks = []
    for i, t in zip(inputs, targets, strict=True):
        tok, _, h, _ = _embed_rows(i)
        tok_t, y, h_t, z = _embed_rows(t)
        assert np.array_equal(tok, tok_t), "lookups of the two passes read other tokens"
        tasks.append((tok, y, h, z, 1.0 / tok.shape[0], h_t))
    tied = tasks[0][2] is not None
    ref = np.zeros((vocab, d))
    rank = np.zeros(vocab, int)
    conds, blocks = [], []
    for v in range(vocab):
        a, b = [], []
        for tok, y, h, z, w, _ in tasks:
            hit = tok == v
            c = int(hit.sum())
            if c:
                a.append(np.sqrt(w * c) * scale * np.eye(d))
                b.append(np.sqrt(w * c) * y[hit].mean(axis=0))
            if h is not None:
                a.append(np.sqrt(w) * h)
                b.append(np.sqrt(w) * z[:, v])
        if not a:
            blocks.append(None)
            continue
        a, b = np.concatenate(a), np.concatenate(b)
        ref[v] = np.linalg.lstsq(a, b, rcond=None)[0]
        sv = np.linalg.svd(a, compute_uv=False)
        rank[v] = int(np.sum(sv > sv[0] * max(a.shape) * np.finfo(np.float64).eps))
        conds.append(float((sv[0] / sv[-1]) ** 2) if sv[-1] > 0 else float("inf"))
        blocks.append((a, b))
    seen = np.array([blk is not None and rank[v] == d for v, blk in enumerate(blocks)])
    mean = np.mean(np.stack(finetuned), axis=0)

    def pred(table):
        num = sum(float(np.sum((blk[0] @ (table[v] - ref[v])) ** 2))
                  for v, blk in enumerate(blocks) if blk is not None)  # fmt: skip
        den = sum(float(np.sum((blk[0] @ ref[v]) ** 2)) for blk in blocks if blk is not None)
        return float(np.sqrt(num / den))

    own = []
    for (tok, y, _, z, _, h_own), e in zip(tasks, finetuned, strict=True):
        own.append(_rel(scale * e[tok], y))
        if h_own is not None:
            own.append(_rel(h_own @ e.T, z))
    unseen = ~seen
    return {
        "kind": "embed (tied: lookups and head)" if tied else "embed (lookups)",
        "rows": int(sum(t[0].shape[0] for t in tasks)),
        "rows_per_task": [int(t[0].shape[0]) for t in tasks],
        "head_rows_per_task": [int(t[2].shape[0]) for t in tasks] if tied else None,
        "n_in": int(vocab),
        "n_out": int(d),
        "rank": int(np.sum(rank)),
        "rows_determined": int(np.sum(seen)),
        "full_rank": bool(np.all(seen)),
        "gram_condition": max(conds) if conds else float("inf"),
        "weight_rel_err": _rel(merged[seen], ref[seen]),
        "prediction_rel_err": pred(merged),
        "mean_weight_rel_err": _rel(mean[seen], ref[seen]),
        "mean_prediction_rel_err": pred(mean),
        "undetermined_rows_minus_mean": (
            float(np.max(np.abs(merged[unseen] - mean[unseen]))) if unseen.any() else None
        ),  # fmt: skip
        "rows_self_check": max(own),
    }


def layer_figures(
    inputs: list[list[Call]],
    targets: list[list[Call]],
    merged: np.ndarray,
    finetuned: list[np.ndarray],
    own: list[list[Call]] | None = None,
) -> dict:
    """The reference solve of one layer and its figures (see the module docs).

    Args:
        inputs: per task, the calls whose inputs are the rows ``X̃ₖ`` (the fine-tune's own pass
            for the parallel algorithm, the merged model's for the sequential one).
        targets: per task, the calls whose outputs are ``Yₖ`` (fine-tune ``k``'s own pass).
        merged: the merged layer in matrix form (``(n_in[+1], n_out)``; norms: the effective
            scale ``(C,)``).
        finetuned: each fine-tune's layer in the same form.
        own: per task, fine-tune ``k``'s own calls (for the self-check; default ``targets``).
    """
    kind = inputs[0][0].kind
    xs, ys = zip(*[(_rows(i)[0], _rows(t)[1]) for i, t in zip(inputs, targets, strict=True)],
                 strict=True)  # fmt: skip
    for x, y in zip(xs, ys, strict=True):
        assert x.shape[0] == y.shape[0], (x.shape, y.shape)
    weights = [1.0 / x.shape[0] for x in xs]
    xw = np.concatenate([np.sqrt(w) * x for w, x in zip(weights, xs, strict=True)])
    yw = np.concatenate([np.sqrt(w) * y for w, y in zip(weights, ys, strict=True)])
    if kind == "einsum":
        ref, *_ = np.linalg.lstsq(xw, yw, rcond=None)
        sv = np.linalg.svd(xw, compute_uv=False)
        rank = int(np.sum(sv > sv[0] * max(xw.shape) * np.finfo(np.float64).eps))
        cond = float((sv[0] / sv[-1]) ** 2) if sv[-1] > 0 else float("inf")
        n_in, n_out = xw.shape[1], yw.shape[1]
    else:  # per-channel 1-D fits
        gram = np.sum(xw * xw, axis=0)
        ref = np.sum(xw * yw, axis=0) / gram
        rank = int(np.sum(gram > 0))
        cond = 1.0 if np.min(gram) > 0 else float("inf")  # C independent 1x1 systems
        n_in = n_out = xw.shape[1]
    mean = np.mean(np.stack(finetuned), axis=0)
    pred_ref = _apply(kind, xw, ref)
    own = targets if own is None else own
    check = max(_rel(_apply(kind, _rows(c)[0], w), _rows(c)[1])
                for c, w in zip(own, finetuned, strict=True))  # fmt: skip
    return {
        "kind": kind,
        "rows": int(xw.shape[0]),
        "rows_per_task": [int(x.shape[0]) for x in xs],
        "n_in": int(n_in),
        "n_out": int(n_out),
        "rank": rank,
        "full_rank": rank == n_in,
        "gram_condition": cond,
        "weight_rel_err": _rel(merged, ref),
        "prediction_rel_err": float(
            np.linalg.norm(_apply(kind, xw, merged) - pred_ref) / np.linalg.norm(pred_ref)
        ),  # fmt: skip
        "mean_weight_rel_err": _rel(mean, ref),
        "mean_prediction_rel_err": float(
            np.linalg.norm(_apply(kind, xw, mean) - pred_ref) / np.linalg.norm(pred_ref)
        ),  # fmt: skip
        "rows_self_check": check,
    }
