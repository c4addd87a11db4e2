"""Training: the trainer loop, optimiser and schedule, dead-latent tracking, checkpoints, strategies."""
