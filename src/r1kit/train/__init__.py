"""GRPO losses, step, training loop, checkpoints and guards."""
