"""Training: datasets, losses, the training loop, checkpoints."""
