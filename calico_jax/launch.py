"""``python -m calico_jax.launch``: the command's entry point; its code is :mod:`calico_jax.parallel.launch`."""
import sys

from calico_jax.parallel.launch import main

if __name__ == "__main__":
    sys.exit(main())
