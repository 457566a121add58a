"""calico_jax: CALICO (CVPR 2025) in JAX/Flax Linen.

``calico_jax.load(path)`` opens a checkpoint written by ``python -m convert`` and returns
``(module, params, config)``.
"""
from calico_jax.checkpoints.converted import load, save

__version__ = "0.1.0"
__all__ = ["load", "save", "__version__"]
