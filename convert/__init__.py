"""PyTorch -> calico_jax weight converters (``python -m convert FAMILY --src SRC --out OUT``)."""
