"""The training loop, the state it carries and checkpoints, EMA, batches, logs and W&B."""
