"""Reading and writing: Orbax checkpoints of parameters and statistics (atomic, never modifying an
input), the whole-model statistics store, resumable accumulation, the fingerprints that tie
statistics to their inputs, and Hugging Face safetensors interchange.

- :mod:`.checkpoint`: ``save_params`` / ``load_params``, per-layer statistics, atomic writes and
  the one reader of both statistics formats;
- :mod:`.model_stats`: ``ModelStats``, accumulated (resumably), saved, combined and loaded;
- :mod:`.resumable`: ``accumulate_resumable``; :mod:`.provenance`: fingerprints;
- :mod:`.hf`: the BERT safetensors import and export.
"""
