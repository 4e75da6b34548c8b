"""Reading and writing: Orbax checkpoints of parameters and statistics (atomic, never modifying an
input), the whole-model statistics store, resumable accumulation, the fingerprints that tie
statistics to their inputs, and Hugging Face safetensors interchange.

- :mod:`.checkpoint`: ``save_params`` / ``load_params`` and the atomic writes of every checkpoint;
- :mod:`.store`: the one on-disk format of statistics (per layer, or a model's per-task sums),
  its writer and reader; ``save_stats`` / ``load_stats`` / ``combine_saved_stats``;
- :mod:`.model_stats`: ``ModelStats``, accumulated (resumably), saved, combined and loaded;
- :mod:`.resumable`: ``accumulate_resumable``; :mod:`.provenance`: fingerprints;
- :mod:`.hf`: the BERT safetensors import and export.
"""
