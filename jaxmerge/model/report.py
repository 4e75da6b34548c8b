"""``MergeReport``: what a whole-model merge did, layer by layer.

For every solved layer: its path and kind, the basis, the residual energy of the base ``E₀``, the
loss of the merge ``L*``, the captured fraction ``ρ = 1 − L*/E₀``, a condition estimate, the
solver status and the solve time; with a held-out calibration set also the held-out ``E₀`` and
``ρ``. The model-level value is energy weighted, ``ρ = 1 − Σ L* / Σ E₀`` (layers with larger
residual energy count more). Parameters not solved by output matching are listed with the
fallback rule that produced them, and those of them that a fine-tune changed with the reason
they were not solved (:attr:`MergeReport.unsolved`).
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
        energy_merged_heldout: ``L`` of the merged layer on the held-out calibration data, if
            given.
        form: how the layer's uses were read (its :attr:`~jaxmerge.LayerSpec.form`): an
            einsum's equation (``"btd,dnh->btnh"``), a norm's offset (``"offset=1.0"``), an
            embedding's lookup scale and whether the head reads its table (``"tied;scale=2.0"``);
            ``""`` for a plain layer.

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
    form: str = ""
    energy_merged_heldout: float | None = None


def _model_rho(rows) -> float | None:
    """``1 − Σ L / Σ E₀`` over ``(E₀, L, ρ)`` per layer (``L = E₀(1 − ρ)`` where only ``ρ`` is
    known, as in reports written before ``energy_merged_heldout`` existed); ``None`` if
    ``Σ E₀ = 0``. Summing losses rather than weighing ``ρ`` keeps a layer whose ``E₀`` is below
    the statistics' resolution (``ρ = −∞`` when the merge changes its outputs) from making the
    model's ``ρ`` infinite: it adds its loss, as it should."""
    rows = [(e0, loss, rho) for e0, loss, rho in rows if e0 is not None and rho is not None]
    total = sum(e0 for e0, _, _ in rows)
    if not rows or total <= 0:
        return None
    losses = (e0 * (1.0 - rho) if loss is None else loss for e0, loss, rho in rows)
    return 1.0 - sum(losses) / total


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _reasons(reasons, most: int = 3) -> str:
    """The distinct ``reasons``, most frequent first (``×n`` when more than once), at most
    ``most`` of them."""
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])  # stable: first seen first
    text = "; ".join(r + (f" (×{n})" if n > 1 else "") for r, n in ranked[:most])
    return text + ("; …" if len(ranked) > most else "")


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
        unsolved: ``{parameter path: reason}`` for every parameter of :attr:`fallbacks` that at
            least one fine-tune changed (not bit-identical to the base): what the merge
            replaced by a fallback rule instead of solving it, and why (``"module class
            'MyProj' (linen) is not a registered layer kind"``, ``"not used in the forward
            pass"``, ...). :func:`~jaxmerge.merge` warns about them
            (:class:`~jaxmerge.UnsolvedParametersWarning`) or, with ``strict=True``, raises.

    ``str(report)`` is a table with one row per layer, the unsolved parameters (at most
    :attr:`MAX_LISTED` of them, then a count) and a summary line; layers reported
    ``UNCHANGED`` are counted apart from the solved ones, and a report without solved layers
    says so instead of an empty table (with what the fine-tunes' changes took instead).

    Examples:
        >>> r = MergeReport("parallel", 2, (LayerReport("Dense_0", "dense", "full", 4.0, 1.0,
        ...                 0.75, 3.0, "CHOLESKY"),), {"Dense_0/bias": "mean"}, 0.5)
        >>> r.rho
        0.75
        >>> MergeReport.from_json(r.to_json()) == r
        True
        >>> print(str(r).splitlines()[2])  # doctest: +NORMALIZE_WHITESPACE
        Dense_0  dense  full  4  1  0.7500  -  3  CHOLESKY  -
        >>> empty = MergeReport("parallel", 2, (), {"proj/w": "mean"}, 0.5,
        ...                     {"proj/w": "module class 'Proj' (linen) is not a registered "
        ...                                "layer kind"})
        >>> print(empty)  # doctest: +NORMALIZE_WHITESPACE
        unsolved: 1 parameter the fine-tunes changed, not solved by output matching
          proj/w  mean  module class 'Proj' (linen) is not a registered layer kind
        no layer was solved by output matching: the 1 parameter the fine-tunes changed took
        the fallback 'mean' (reasons: module class 'Proj' (linen) is not a registered layer kind)
        parallel merge of 2 models: rho - (held-out -), 0 layers solved, 1 parameters by
        fallback (1 changed), 0.50 s
    """

    MAX_LISTED = 10

    algorithm: str
    num_tasks: int
    layers: tuple[LayerReport, ...]
    fallbacks: dict[str, str]
    seconds: float
    unsolved: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def rho(self) -> float | None:
        """Model-level ``ρ = 1 − Σ L* / Σ E₀`` on the calibration data (the ``E₀``-weighted mean
        of the layers' ``ρ``; ``None`` if ``Σ E₀ = 0``)."""
        return _model_rho((r.energy_base, r.energy_merged, r.rho) for r in self.layers)

    @property
    def rho_heldout(self) -> float | None:
        """Model-level held-out ``ρ`` (``None`` without held-out data)."""
        return _model_rho(
            (r.energy_base_heldout, r.energy_merged_heldout, r.rho_heldout) for r in self.layers
        )

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
        """Read a report written by :meth:`to_json` (one written before :attr:`unsolved` or
        :attr:`LayerReport.form` existed reads with ``unsolved == {}``, ``form == ""``). The
        non-finite ``E₀``, ``L*``, ``ρ`` and condition that JSON holds as ``null`` read as
        ``nan``."""
        data = json.loads(text)
        layers = []
        for row in data["layers"]:
            row = dict(row, shared_input=tuple(row.get("shared_input", ())))
            for name in ("energy_base", "energy_merged", "rho", "condition"):
                if row.get(name) is None:
                    row[name] = math.nan
            layers.append(LayerReport(**row))
        return cls(
            data["algorithm"],
            data["num_tasks"],
            tuple(layers),
            dict(data["fallbacks"]),
            data["seconds"],
            dict(data.get("unsolved", {})),
        )

    def __str__(self) -> str:
        def num(v, fmt="{:.4g}"):
            try:
                v = None if v is None else float(v)
            except (TypeError, ValueError):  # not a number: shown as it is
                return str(v)
            return "-" if v is None or math.isnan(v) else fmt.format(v)

        forms = any(r.form for r in self.layers)  # a column only when a layer has one
        head = ("layer", "kind", *("form",) * forms, "basis", "E0", "L*", "rho", "rho(held)",
                "cond", "status", "s")  # fmt: skip
        rows = [
            (
                r.path,
                r.kind,
                *(r.form or "-",) * forms,
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
        out += self._unsolved_lines()
        unchanged = sum(r.status == "UNCHANGED" for r in self.layers)
        solved = len(self.layers) - unchanged
        if not solved:
            kept = f" ({unchanged} unchanged, kept at the base's values)" if unchanged else ""
            out.append(
                f"no layer was solved by output matching{kept}: {self._instead()}"
                if self.unsolved
                else f"no layer solved by output matching{kept}"
            )
        changed = f" ({len(self.unsolved)} changed)" if self.unsolved else ""
        out.append(
            f"{self.algorithm} merge of {self.num_tasks} models: rho {num(self.rho, '{:.4f}')}"
            f" (held-out {num(self.rho_heldout, '{:.4f}')}), {solved} layers solved, "
            + (f"{unchanged} unchanged, " if unchanged else "")
            + f"{len(self.fallbacks)} parameters by fallback{changed}, "
            + f"{num(self.seconds, '{:.2f}')} s"
        )
        return "\n".join(out)

    def _unsolved_lines(self) -> list[str]:
        """The section of :attr:`unsolved`: a title, then at most :attr:`MAX_LISTED` rows."""
        if not self.unsolved:
            return []
        n = len(self.unsolved)
        shown = list(self.unsolved.items())[: self.MAX_LISTED]
        width = max(len(p) for p, _ in shown)
        rules = [self.fallbacks.get(p, "?") for p, _ in shown]
        rule_width = max(len(r) for r in rules)
        out = [f"unsolved: {_count(n, 'parameter')} the fine-tunes changed, not solved by "
               "output matching"]  # fmt: skip
        out += [f"  {p.ljust(width)}  {rule.ljust(rule_width)}  {reason}"
                for (p, reason), rule in zip(shown, rules, strict=True)]  # fmt: skip
        if n > len(shown):
            out.append(f"  … and {n - len(shown)} more (report.unsolved lists them all)")
        return out

    def _instead(self) -> str:
        """What the fine-tunes' changes took instead of a solve: rules and the main reasons."""
        rules = sorted({self.fallbacks.get(p, "?") for p in self.unsolved})
        rule = f"the fallback {rules[0]!r}" if len(rules) == 1 else (
            "the fallbacks " + ", ".join(map(repr, rules)))  # fmt: skip
        n = len(self.unsolved)
        which = "the 1 parameter" if n == 1 else f"all {n} parameters"
        return (
            f"{which} the fine-tunes changed took {rule} "
            f"(reasons: {_reasons(self.unsolved.values())})"
        )

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
        height = lambda v: math.nan if v is None else float(v)  # noqa: E731  (nan: no bar)
        ax.bar([x - 0.2 for x in xs], [height(r.rho) for r in self.layers], 0.4,
               label="calibration")  # fmt: skip
        held = [r.rho_heldout for r in self.layers]
        if any(h is not None for h in held):
            ax.bar([x + 0.2 for x in xs], [height(h) for h in held], 0.4, label="held-out")
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ρ (captured residual energy)")
        ax.set_title(f"{self.algorithm} merge of {self.num_tasks} models")
        if all(r.status == "UNCHANGED" for r in self.layers):
            note = "no layer solved by output matching"
            if self.unsolved:
                note += f"\n{_count(len(self.unsolved), 'changed parameter')} by fallback"
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig
