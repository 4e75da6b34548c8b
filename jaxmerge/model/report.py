"""``MergeReport``: what a whole-model merge did, layer by layer.

For every solved layer: its path and kind, the basis, the residual energy of the base ``E₀``, the
loss of the merge ``L*``, the captured fraction ``ρ = 1 − L*/E₀``, a condition estimate, the
solver status and the solve time; with a held-out calibration set also the held-out ``E₀`` and
``ρ``. The model-level value is energy weighted, ``ρ = 1 − Σ L* / Σ E₀`` (layers with larger
residual energy count more). Parameters not solved by output matching are listed with the
fallback rule that produced them.
"""

import dataclasses
import json
import math
import os

__all__ = ["LayerReport", "MergeReport"]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One solved layer (floats, JSON-friendly).

    Attributes:
        path: the layer's path in the params tree.
        kind: ``"dense"``, ``"dense_general"``, ``"conv"``, ``"embed"`` or ``"norm"``.
        basis: the basis as text (``"full"``, ``"LowRank(rank=4)"``, ...).
        energy_base: ``E₀`` on the calibration data.
        energy_merged: ``L*`` on the calibration data.
        rho: ``ρ = 1 − L*/E₀`` on the calibration data (optimistic: the solve saw these rows).
        condition: condition-number estimate of the solve (``nan`` when none was needed).
        status: :class:`~jaxmerge.SolveStatus` name, or ``"UNCHANGED"`` for a layer that no
            fine-tune changed, kept at the base's values without a solve (parallel merge).
        seconds: wall time of the solve (``None`` when solved inside one jitted pass), shared
            by layers solved together.
        shared_input: the other layers that share this layer's input (and Gram matrix).
        energy_base_heldout: ``E₀`` on the held-out calibration data, if given.
        rho_heldout: ``ρ`` on the held-out calibration data, if given.

    Examples:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from jaxmerge import collect_stats, solve_stats
        >>> base = {"layers_0": {"kernel": jnp.zeros((2, 1)), "bias": jnp.zeros(1)}}
        >>> fts = [{"layers_0": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)}}]
        >>> stats = collect_stats(nn.Sequential([nn.Dense(1)]), fts, [[jnp.eye(2)]],
        ...                       progress=False)
        >>> _, report = solve_stats(stats, base, fts, progress=False)
        >>> layer = report.layers[0]
        >>> layer.path, layer.kind, layer.basis, layer.rho, layer.status
        ('layers_0', 'dense', 'full', 1.0, 'CHOLESKY')
    """

    path: str
    kind: str
    basis: str
    energy_base: float
    energy_merged: float
    rho: float
    condition: float
    status: str
    seconds: float | None = None
    shared_input: tuple[str, ...] = ()
    energy_base_heldout: float | None = None
    rho_heldout: float | None = None


def _weighted(pairs) -> float | None:
    pairs = [(e0, rho) for e0, rho in pairs if e0 is not None and rho is not None]
    total = sum(e0 for e0, _ in pairs)
    if not pairs or total <= 0:
        return None
    return sum(e0 * rho for e0, rho in pairs if e0 > 0) / total


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """The report of :func:`~jaxmerge.merge`.

    Attributes:
        algorithm: ``"parallel"`` or ``"sequential"``.
        num_tasks: number of fine-tuned models ``K``.
        layers: one :class:`LayerReport` per solved layer, in call order.
        fallbacks: ``{parameter path: rule}`` for every parameter not solved by output
            matching (``"mean"``, ``"base"`` or ``"task_arithmetic(λ)"``).
        seconds: wall time of the whole merge.

    ``str(report)`` is a table with one row per layer and a summary line; layers reported
    ``UNCHANGED`` are counted apart from the solved ones, and a report without solved layers
    says so instead of an empty table.

    Examples:
        >>> r = MergeReport("parallel", 2, (LayerReport("Dense_0", "dense", "full", 4.0, 1.0,
        ...                 0.75, 3.0, "CHOLESKY"),), {"Dense_0/bias": "mean"}, 0.5)
        >>> r.rho
        0.75
        >>> MergeReport.from_json(r.to_json()) == r
        True
        >>> print(str(r).splitlines()[2])  # doctest: +NORMALIZE_WHITESPACE
        Dense_0  dense  full  4  1  0.7500  -  3  CHOLESKY  -
        >>> empty = MergeReport("parallel", 2, (), {"Dense_0/bias": "mean"}, 0.5)
        >>> print(empty)  # doctest: +ELLIPSIS
        no layer solved by output matching
        parallel merge of 2 models: rho - (held-out -), 0 layers solved, 1 parameters by ...
    """

    algorithm: str
    num_tasks: int
    layers: tuple[LayerReport, ...]
    fallbacks: dict[str, str]
    seconds: float

    @property
    def rho(self) -> float | None:
        """Model-level ``ρ = Σ E₀ρ / Σ E₀`` on the calibration data (``None`` if ``Σ E₀ = 0``)."""
        return _weighted((r.energy_base, r.rho) for r in self.layers)

    @property
    def rho_heldout(self) -> float | None:
        """Model-level held-out ``ρ`` (``None`` without held-out data)."""
        return _weighted((r.energy_base_heldout, r.rho_heldout) for r in self.layers)

    def to_json(self) -> str:
        """The report as a JSON string (non-finite floats as ``null``)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [clean(x) for x in v]
            return v

        data = clean(dataclasses.asdict(self))
        data["rho"], data["rho_heldout"] = self.rho, self.rho_heldout
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "MergeReport":
        """Read a report written by :meth:`to_json`."""
        data = json.loads(text)
        layers = []
        for row in data["layers"]:
            row = dict(row, shared_input=tuple(row.get("shared_input", ())))
            if row.get("condition") is None:
                row["condition"] = math.nan
            layers.append(LayerReport(**row))
        return cls(
            data["algorithm"],
            data["num_tasks"],
            tuple(layers),
            dict(data["fallbacks"]),
            data["seconds"],
        )

    def __str__(self) -> str:
        def num(v, fmt="{:.4g}"):
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

        head = ("layer", "kind", "basis", "E0", "L*", "rho", "rho(held)", "cond", "status", "s")
        rows = [
            (
                r.path,
                r.kind,
                r.basis,
                num(r.energy_base),
                num(r.energy_merged),
                num(r.rho, "{:.4f}"),
                num(r.rho_heldout, "{:.4f}"),
                num(r.condition, "{:.3g}"),
                r.status,
                num(r.seconds, "{:.3f}"),
            )
            for r in self.layers
        ]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
        line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()  # noqa: E731
        out = (
            [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows] if rows else []
        )
        unchanged = sum(r.status == "UNCHANGED" for r in self.layers)
        solved = len(self.layers) - unchanged
        if not solved:
            out.append(
                "no layer solved by output matching"
                + (f" ({unchanged} unchanged, kept at the base's values)" if unchanged else "")
            )
        out.append(
            f"{self.algorithm} merge of {self.num_tasks} models: rho {num(self.rho, '{:.4f}')}"
            f" (held-out {num(self.rho_heldout, '{:.4f}')}), {solved} layers solved, "
            + (f"{unchanged} unchanged, " if unchanged else "")
            + f"{len(self.fallbacks)} parameters by fallback, {self.seconds:.2f} s"
        )
        return "\n".join(out)

    def plot(self, path: str | os.PathLike | None = None):
        """Bar chart of ``ρ`` per layer (and held-out ``ρ`` when known); needs matplotlib.

        Args:
            path: file to save the figure to; ``None`` only returns it.

        Returns:
            The matplotlib ``Figure``.
        """
        try:
            from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone
        except ImportError as error:  # pragma: no cover - optional dependency
            raise ImportError(
                "MergeReport.plot needs matplotlib (pip install matplotlib)."
            ) from error
        names = [r.path for r in self.layers]
        fig = Figure(figsize=(max(4.0, 0.4 * len(names) + 2), 3.5))
        ax = fig.subplots()
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [r.rho for r in self.layers], 0.4, label="calibration")
        held = [r.rho_heldout for r in self.layers]
        if any(h is not None for h in held):
            ax.bar([x + 0.2 for x in xs], [h or 0.0 for h in held], 0.4, label="held-out")
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ρ (captured residual energy)")
        ax.set_title(f"{self.algorithm} merge of {self.num_tasks} models")
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig
