"""Numpy references, independent of jaxmerge, for checking its answers."""

import numpy as np


def augment(x):
    """[x, 1]: the constant column that carries the bias."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def layer_matrix(kernel, bias=None):
    """The augmented (n+1, m) matrix [W; b] as float64 numpy."""
    kernel = np.asarray(kernel, np.float64)
    return kernel if bias is None else np.vstack([kernel, np.asarray(bias, np.float64)[None]])


def task_loss(xs, ys, wbar, weights=None, bias=True):
    """Σₖ wₖ ‖X̃ₖ W̄ − Yₖ‖² straight from the data (default wₖ = 1/Nₖ)."""
    total = 0.0
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        xa = augment(x) if bias else np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        y = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
        w = 1.0 / len(xa) if weights is None else weights[k]
        total += w * np.sum((xa @ wbar - y) ** 2)
    return total


def lstsq_merge(xs, ys, w0bar, directions, weights=None, bias=True):
    """Brute force: the min-norm coefficients c of W̄ = W̄₀ + Σ_q c_q B_q minimising the loss.

    Builds the explicit design matrix, one column per direction (the outputs that direction adds
    on every calibration row), and calls numpy.linalg.lstsq.
    """
    rows, targets = [], []
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        xa = augment(x) if bias else np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        y = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
        sw = np.sqrt(1.0 / len(xa) if weights is None else weights[k])
        rows.append(np.stack([sw * (xa @ b).ravel() for b in directions], axis=1))
        targets.append(sw * (y - xa @ w0bar).ravel())
    c = np.linalg.lstsq(np.vstack(rows), np.concatenate(targets), rcond=None)[0]
    return c, w0bar + np.tensordot(c, np.asarray(directions), axes=1)


def tied_design(tasks, s, v, d):
    """The least-squares problem ``‖A vec(E) − b‖²`` of a table ``E (v, d)`` over its lookups
    (``s·E[t] ≈`` targets) and its head (``h Eᵀ ≈`` targets, left out where ``h`` is
    ``None``), each task's tokens weighted ``1/n``: ``tasks`` is ``[(ids t (n,), lookup targets
    (n, d), h (n, d), head targets (n, v))]``."""
    rows, rhs = [], []
    for t, lookup_y, h, head_y in tasks:
        n = len(t)
        lookup = np.zeros((n * d, v * d))
        for r, tok in enumerate(t):
            lookup[r * d : (r + 1) * d, tok * d : (tok + 1) * d] = s * np.eye(d)
        rows.append(lookup / np.sqrt(n))
        rhs.append(np.reshape(lookup_y, -1) / np.sqrt(n))
        if h is not None:
            head = np.zeros((n * v, v * d))
            for r in range(n):
                for u in range(v):
                    head[r * v + u, u * d : (u + 1) * d] = h[r]
            rows.append(head / np.sqrt(n))
            rhs.append(np.reshape(head_y, -1) / np.sqrt(n))
    return np.vstack(rows), np.concatenate(rhs)


def tied_lstsq(tasks, s, v, d):
    """numpy's least squares of :func:`tied_design` (every token seen: a unique minimiser)."""
    design, rhs = tied_design(tasks, s, v, d)
    assert np.linalg.matrix_rank(design) == v * d
    return np.linalg.lstsq(design, rhs, rcond=None)[0].reshape(v, d)
