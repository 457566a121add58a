"""``python -m calico_jax.export``: the command's entry point; its code is :mod:`calico_jax.inference.export`."""
import sys

from calico_jax.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
