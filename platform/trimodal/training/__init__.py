"""Training: stage policies, the Ray Train loop, checkpoints, and the TorchTrainer builder."""
