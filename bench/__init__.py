"""Side-by-side benchmarks: calico_jax (jit) vs the PyTorch references (eager), in one run."""

import sys

if sys.argv[:1] == ["-m"]:   # a command-line run: no accelerator plugin probing on a CPU-only machine
    from calico_jax.core.platform import quiet_cli
    quiet_cli()
