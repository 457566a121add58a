"""``--verify``: run the converted JAX model and its PyTorch reference on the same random inputs.

Each family builds its reference and returns a list of :class:`Comparison`; this module holds the
shared pieces: fp32/highest precision setup, error metrics and the report whose last line is
``verify: max_rel_err=<x> (tol <t>) PASS|FAIL``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

DEFAULT_TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    max_abs: float
    max_rel: float  # max|jax - torch| / max|torch|
    shape: tuple[int, ...]


def setup() -> None:
    """fp32 everywhere, exact matmuls, deterministic torch."""
    import jax
    import torch
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def compare(name: str, jax_value: Any, torch_value: Any) -> Comparison:
    a, b = to_numpy(jax_value), to_numpy(torch_value)
    if a.shape != b.shape:
        raise ValueError(f"verify {name}: JAX output shape {a.shape} != PyTorch {b.shape}")
    abs_err = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    rel = abs_err / scale if scale > 0 else abs_err
    if not np.all(np.isfinite(a)):
        abs_err = rel = float("inf")
    return Comparison(name, abs_err, rel, a.shape)


def report(comparisons: list[Comparison], tol: float = DEFAULT_TOL, out: Callable[[str], None] = print) -> bool:
    """Prints one line per output and the closing verdict line; returns True on PASS."""
    width = max(len(c.name) for c in comparisons)
    for c in comparisons:
        out(f"  {c.name:<{width}}  shape={str(c.shape):<20} max_abs_err={c.max_abs:.3e}  max_rel_err={c.max_rel:.3e}")
    worst = max(c.max_rel for c in comparisons)
    ok = bool(worst <= tol)
    out(f"verify: max_rel_err={worst:.3e} (tol {tol:g}) {'PASS' if ok else 'FAIL'}")
    return ok


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
