"""calico_jax: CALICO (CVPR 2025) in JAX/Flax Linen.

``calico_jax.load(path)`` opens a checkpoint written by ``python -m convert`` (or exported from training) and
returns ``(module, params, config)``; ``calico_jax.load_predictor(path)`` returns a
:class:`~calico_jax.inference.predictor.Predictor` that answers questions about images.

Importing the package does not import JAX.
"""
import sys

if sys.argv[:1] == ["-m"]:   # `python -m calico_jax.<tool>` (argv[0] is "-m" while the package is imported)
    from calico_jax.core.platform import quiet_cli
    quiet_cli()

__version__ = "0.1.0"
__all__ = ["load", "save", "load_predictor", "__version__"]


def __getattr__(name: str):   # the heavy parts on first use, so `--help` and light tools stay fast
    if name in ("load", "save"):
        from calico_jax.checkpoints import converted
        return getattr(converted, name)
    if name == "load_predictor":
        from calico_jax.inference.predictor import load_predictor
        return load_predictor
    raise AttributeError(f"module 'calico_jax' has no attribute {name!r}")
