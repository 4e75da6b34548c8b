"""Flax (linen and NNX) support: layer capture, layer adapters and folding merged layers back.

Data flows one way: :mod:`.capture` observes every supported layer call of a forward pass,
:mod:`.adapters` turns each call into rows of inputs and targets and its parameters into a
layer-like ``(kernel, bias)`` pair, and :mod:`.fold` writes merged layers back into a parameter
tree shaped, typed and sharded like the base.
"""
