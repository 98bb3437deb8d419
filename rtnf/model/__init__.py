"""The Neuroformer model: spec, layers, generation (KV cache), incremental history, checkpoints."""
