"""The merge methods besides the output-space QP, over whole parameter pytrees.

- :mod:`.arithmetic`: task vectors, soups, task arithmetic; :mod:`.ties`; :mod:`.dare`
  (with :mod:`.common`, the pytree plumbing they share);
- :mod:`.fisher`: Fisher merging; :mod:`.reweighted`: the QP-reweighted TIES/DARE bases and
  RegMean of one layer.


Notation: base parameters ``θ₀``, fine-tuned parameters ``θₖ`` (``k = 1..K``), task vectors
``τₖ = θₖ − θ₀``. Every method here is ``θ = θ₀ + Σₖ λₖ Bₖ`` for *processed task vectors* ``Bₖ``:

==================  =============================================================  ===========
method              ``Bₖ``                                                          ``λₖ``
==================  =============================================================  ===========
soup                ``τₖ``                                                          ``wₖ / Σw``
task arithmetic     ``τₖ``                                                          ``scale``
TIES                trimmed, sign-agreeing part of ``τₖ`` (÷ count of agreeing     ``scale``
                    models for ``aggregate="mean"``)
DARE                ``mₖ ⊙ τₖ / (1 − p)``, Bernoulli masks ``mₖ`` (optionally then  ``scale``
                    TIES' sign election and disjoint merge)
==================  =============================================================  ===========

so each is the merge QP with ``Custom`` directions ``Bₖ`` at ridge ``∞`` and prior ``λ`` (see
``jaxmerge.ties_basis``, ``jaxmerge.dare_basis``). The helpers ``task_vectors``,
``ties_task_vectors`` and ``dare_task_vectors`` return the ``Bₖ``.

Parameter pytrees are Flax-style nested dicts (any JAX pytree works). A leaf's *path* is its
'/'-joined keys without a leading ``"params"`` (``"Dense_0/kernel"``); its *layer path* drops the
leaf name (``"Dense_0"``). Arithmetic runs in at least float32 and every merged leaf is cast back
to the base leaf's dtype, so the result has the base's tree structure and dtypes.

All functions are jittable: arrays, ``scale``, ``weights`` and ``drop_rate`` may be traced; the
string options and ``density`` are static (bind them with :func:`functools.partial`).
"""
