"""Inference: generation, the predictor, and the predict / evaluate / export commands."""
