"""Weights and run state: converted models, training workdirs, the training checkpoint manager, PyTorch files (read
and export)."""
