"""Side-by-side benchmarks: calico_jax (jit) vs the PyTorch references (eager), in one run."""
