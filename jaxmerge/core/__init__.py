"""The single-layer core: one layer's statistics and its merge QP, knowing nothing of models.

- :mod:`.stats`: ``LayerStats``, the monoid of second-moment sums of one layer;
- :mod:`.bases`: the bases of the update (scalar, diagonal, full, ``LowRank``, ``Custom``);
- :mod:`.systems`: ``map_systems``, a stack of independent solves (a loop on CPU);
- :mod:`.psd`: ``psd_solve`` (Cholesky, condition estimate, pseudo-inverse fallback);
- :mod:`.qp`: ``solve_layer``, the QP of one layer in a basis;
- :mod:`.metric`: ``metric_solve``, the full-basis QP in per-task output metrics;
- :mod:`.energy`: the captured-energy fraction ρ;
- :mod:`.layers`: a layer given as a kernel, a ``(kernel, bias)`` pair or a dict.
"""
