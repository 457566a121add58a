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


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Memory read GB/s of both frameworks: a sum over an fp32 array much larger than the caches."""
    import jax
    import jax.numpy as jnp
    import torch

    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    with torch.inference_mode():
        stats = alternate({"jax": lambda: total(x).block_until_ready(), "torch": lambda: torch.sum(t)},
                          repeats=repeats, warmup=2)
    return {k: nbytes / (s.median_ms * 1e-3) / 1e9 for k, s in stats.items()}


def gemm_only_ms(shapes: list[tuple[int, int, int, int]], repeats: int = 5) -> float:
    """Median ms of an item's matrix products alone: ``(m, k, n, count)`` = ``count`` independent
    [m, k] x [k, n] GEMMs on fresh random weights, outputs kept, in one jitted program. Its FLOP rate
    over the peak (or the bandwidth floor over it, for matrix-vector products) is the item's *GEMM-only
    ceiling*: what the item would reach if everything but its products took no time."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.standard_normal((m, k), dtype=np.float32)) for m, k, _, _ in shapes]
    ws = [[jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)) for _ in range(c)] for _, k, n, c in shapes]
    fn = jax.jit(lambda xs, ws: [x @ w for x, group in zip(xs, ws) for w in group])
    stats = alternate({"gemm": lambda: jax.block_until_ready(fn(xs, ws))}, repeats=repeats, warmup=1)
    return stats["gemm"].median_ms


def training_shapes(shapes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """The products of a forward *and* its backward: each forward x[m,k] @ w[k,n] adds the input gradient
    dy[m,n] @ wᵀ[n,k] and the weight gradient xᵀ[k,m] @ dy[m,n] (as contiguous operands: the best case)."""
    return ([*shapes] + [(m, n, k, c) for m, k, n, c in shapes] + [(k, m, n, c) for m, k, n, c in shapes])


def ceiling_note(shapes: list[tuple[int, int, int, int]], peak_gflops: float, ms: float | None = None) -> str:
    """The GEMM-only ceiling of a compute-bound item, as a sentence for its note (``ms``: already timed)."""
    ms = gemm_only_ms(shapes) if ms is None else ms
    flops = sum(2.0 * m * k * n * c for m, k, n, c in shapes)
    return (f"GEMM-only ceiling {100 * flops / (ms * 1e-3) / 1e9 / peak_gflops:.0f} % of peak (its "
            f"{sum(c for *_, c in shapes)} products alone, {ms:.0f} ms)")


def limits_check(before: dict, after: dict, differ: float = 0.15, drift: float = 0.10) -> list[str]:
    """Warnings when the two frameworks' limits disagree by more than ``differ`` (the host favours one,
    so raw ratios measure the host) or either drifted by more than ``drift`` during the run (the
    machine's load changed, so the items were timed on a moving machine). ``before``/``after``:
    {"peak_gflops": {"jax", "torch"}, "bandwidth_gbs": {"jax", "torch"}}."""
    out = []
    for kind, unit in (("peak_gflops", "GFLOP/s"), ("bandwidth_gbs", "GB/s")):
        b, a = before[kind], after[kind]
        gap = abs(b["jax"] - b["torch"]) / max(b["jax"], b["torch"])
        if gap > differ:
            out.append(f"{kind}: jax {b['jax']:.0f} vs torch {b['torch']:.0f} {unit} differ by {100 * gap:.0f} % "
                       f"(> {100 * differ:.0f} %): the raw ratios favour the faster one; read the normalised ratios")
        for fw in ("jax", "torch"):
            d = abs(a[fw] - b[fw]) / b[fw]
            if d > drift:
                out.append(f"{kind} ({fw}) drifted {b[fw]:.0f} -> {a[fw]:.0f} {unit} ({100 * d:.0f} % > "
                           f"{100 * drift:.0f} %) during the run: the machine's load changed")
    return out


def normalise(row: dict, limits: dict) -> dict:
    """Adds each framework's fraction of its own measured limit and their quotient, the *normalised* ratio
    (= raw ratio × torch limit / JAX limit), which does not depend on which framework's GEMM (or memory
    read) the host happens to favour. Compute-bound items use the fp32 GEMM peaks, memory-bound ones
    (``limit == "bandwidth"``) the read bandwidths. Alternative PyTorch timings (``alt_torch_ms``) get
    their own normalised ratio."""
    kind = "bandwidth_gbs" if row.get("limit") == "bandwidth" else "peak_gflops"
    lim = limits[kind]
    scale = lim["torch"] / lim["jax"]
    row = dict(row)

    def fraction(ms, fw):
        if row.get("limit") == "bandwidth":
            return row["bytes_min"] / (lim[fw] * 1e9) / (ms * 1e-3) if row.get("bytes_min") else None
        return row["flops"] / (ms * 1e-3) / 1e9 / lim[fw] if row.get("flops") else None

    row["jax_fraction"] = fraction(row["jax_ms"], "jax")
    row["torch_fraction"] = fraction(row["torch_ms"], "torch") if row.get("torch_ms") else None
    row["normalised_ratio"] = row["ratio"] * scale if row.get("ratio") is not None else None
    row["alt_normalised"] = {k: ms / row["jax_ms"] * scale for k, ms in (row.get("alt_torch_ms") or {}).items()}
    return row


def compile_with_flops(jitted, *args, **kwargs) -> tuple[object, float, float]:
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
    bytes_min: float | None = None     # memory-bound items: bytes a step must at least read
    alt_torch_ms: dict | None = None   # other PyTorch variants of the same work, e.g. {"torch_fused": ms}


def side_by_side(name: str, jitted, args: tuple, torch_fn: Callable[[], object] | None, *, peak_gflops: float,
                 bandwidth_gbs: float, bytes_min: float | None = None, repeats: int = 5,
                 budget_s: float = 60.0, note: str = "") -> Result:
    """Times a jitted JAX function (compiled first, cost from XLA) against an eager torch callable."""
    import jax

    compiled, flops, compile_s = compile_with_flops(jitted, *args)
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
                  torch_range_ms=(t.min_ms, t.max_ms) if t else None, note=note, bytes_min=bytes_min)
