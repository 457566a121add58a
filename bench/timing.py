"""Alternating timing of competing implementations, and the machine's limits measured in the same run."""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stats:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int


def _once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def alternate(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
              budget_s: float | None = None) -> dict[str, Stats]:
    """Runs each callable ``warmup`` times, then round-robin ``repeats`` times (A B A B ...) so that slow
    drifts of the machine hit every contender alike. Each callable must block until its result is ready.
    ``budget_s`` stops early (after at least 3 rounds) when the rounds take too long."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in fns.items():
            times[name].append(_once(fn))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: Stats(statistics.median(v), min(v), max(v), len(v)) for k, v in times.items()}


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 GEMM GFLOP/s of both frameworks on an n³ product (2n³ FLOPs)."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    jmm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.inference_mode():
        stats = alternate({"jax": lambda: jmm(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)},
                          repeats=repeats, warmup=2)
    flops = 2.0 * n ** 3
    return {k: flops / (s.median_ms * 1e-3) / 1e9 for k, s in stats.items()}


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Memory read GB/s: a jitted sum over an array much larger than the caches."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    s = alternate({"sum": lambda: total(x).block_until_ready()}, repeats=repeats, warmup=2)["sum"]
    return nbytes / (s.median_ms * 1e-3) / 1e9


def compiled_cost(jitted, *args, **kwargs) -> tuple[object, float, float]:
    """Compiles ``jitted`` for the given args; returns (compiled, flops from XLA cost analysis, compile s)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, float(cost.get("flops", 0.0)), compile_s


@dataclasses.dataclass
class Result:
    """One row of the suite (the JSON keys the issue fixes, plus min-max and context)."""

    name: str
    jax_ms: float
    torch_ms: float | None
    ratio: float | None            # torch_ms / jax_ms
    gflops: float                  # achieved by JAX: XLA-counted FLOPs / median time
    limit_fraction: float          # of the compute peak, or of the bandwidth floor for memory-bound items
    compile_s: float
    flops: float = 0.0
    limit: str = "compute"         # "compute" | "bandwidth"
    jax_range_ms: tuple[float, float] = (0.0, 0.0)
    torch_range_ms: tuple[float, float] | None = None
    note: str = ""


def side_by_side(name: str, jitted, args: tuple, torch_fn: Callable[[], object] | None, *, peak_gflops: float,
                 bandwidth_gbs: float, bytes_min: float | None = None, repeats: int = 5,
                 budget_s: float = 60.0, note: str = "") -> Result:
    """Times a jitted JAX function (compiled first, cost from XLA) against an eager torch callable."""
    import jax

    compiled, flops, compile_s = compiled_cost(jitted, *args)
    fns = {"jax": lambda: jax.block_until_ready(compiled(*args))}
    if torch_fn is not None:
        fns["torch"] = torch_fn
    stats = alternate(fns, repeats=repeats, budget_s=budget_s)
    j = stats["jax"]
    t = stats.get("torch")
    gflops = flops / (j.median_ms * 1e-3) / 1e9
    if bytes_min is not None:  # memory-bound: fraction of the bandwidth floor reached
        floor_ms = bytes_min / (bandwidth_gbs * 1e9) * 1e3
        limit, frac = "bandwidth", floor_ms / j.median_ms
    else:
        limit, frac = "compute", gflops / peak_gflops
    return Result(name=name, jax_ms=j.median_ms, torch_ms=t.median_ms if t else None,
                  ratio=(t.median_ms / j.median_ms) if t else None, gflops=gflops, limit_fraction=frac,
                  compile_s=compile_s, flops=flops, limit=limit, jax_range_ms=(j.min_ms, j.max_ms),
                  torch_range_ms=(t.min_ms, t.max_ms) if t else None, note=note)
