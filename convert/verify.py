"""``--verify``: run the converted JAX model and its PyTorch reference on the same random inputs.

Each family builds its reference and returns a list of :class:`Comparison`; this module holds the
shared pieces: :func:`run` (a family's comparisons under :func:`setup`), error metrics and the report
whose last line is ``verify: max_rel_err=<x> (tol <t>) PASS|FAIL``.

:func:`setup` is a context manager: exact (``"highest"``) JAX matmuls, torch seeded and without
autograd, for the ``with`` block only. The process-wide ``jax_default_matmul_precision``, torch's RNG
state and grad mode are what they were once the block ends, so verifying a conversion inside a larger program
(a notebook, a test session, a training job) changes nothing around it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

DEFAULT_TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    max_abs: float
    max_rel: float  # max|jax - torch| / max|torch|
    shape: tuple[int, ...]


@contextlib.contextmanager
def setup() -> Iterator[None]:
    """``with setup():`` exact matmuls and deterministic torch inside the block; nothing global changes.

    The JAX precision is scoped with ``jax.default_matmul_precision`` (a thread-local setting that also keys
    the jit cache, so functions compiled inside run at "highest"); torch's CPU RNG state and grad mode are
    restored on exit.
    """
    import jax
    import torch

    grad = torch.is_grad_enabled()
    try:
        with jax.default_matmul_precision("highest"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.set_grad_enabled(False)
            yield
    finally:
        torch.set_grad_enabled(grad)


def run(family: Any, ckpt: Any, plan: Any, params: Any) -> list[Comparison]:
    """``family.verify(ckpt, plan, params)`` under :func:`setup`: the comparisons of one conversion."""
    with setup():
        return family.verify(ckpt, plan, params)


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
