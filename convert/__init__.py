"""PyTorch -> calico_jax weight converters (``python -m convert FAMILY --src SRC --out OUT``)."""

import sys

if sys.argv[:1] == ["-m"]:   # a command-line run: no accelerator plugin probing on a CPU-only machine
    from calico_jax.core.platform import quiet_cli
    quiet_cli()
