"""Training: the loop, its loss, checkpoints and process-group helpers."""
