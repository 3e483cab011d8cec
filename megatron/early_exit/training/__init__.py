"""Training: distributed start-up, model/optimizer setup, loop, metrics, checkpoints."""
