"""Training: datasets, the training loop, pretraining, calibration, baselines, reports."""
