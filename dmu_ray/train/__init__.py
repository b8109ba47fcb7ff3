"""The per-worker training loop for Ray Train, checkpoints, resume, export."""
