"""Training: sharding, state, checkpoints, the jitted loop."""
