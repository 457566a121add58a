"""``python -m calico_jax.predict``: the command's entry point; its code is :mod:`calico_jax.inference.predict`."""
import sys

from calico_jax.inference.predict import main

if __name__ == "__main__":
    sys.exit(main())
