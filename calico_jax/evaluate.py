"""``python -m calico_jax.evaluate``: the command's entry point; its code is :mod:`calico_jax.inference.evaluate`."""
import sys

from calico_jax.inference.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
