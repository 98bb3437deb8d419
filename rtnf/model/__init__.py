"""The Neuroformer model: spec and presets, layers, generation with a KV cache, incremental history."""
