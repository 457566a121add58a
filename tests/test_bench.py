"""bench/ plumbing (no timings asserted): alternating runner, cost analysis, a real item end to end."""
import dataclasses
import json

import jax
import jax.numpy as jnp

from bench import timing
from bench.__main__ import ITEM_MODULES, markdown


def test_alternate_runs_round_robin():
    order = []
    stats = timing.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert stats["a"].runs == 3 and stats["a"].min_ms <= stats["a"].median_ms <= stats["a"].max_ms


def test_cost_analysis_counts_matmul_flops():
    x = jnp.ones((64, 32), jnp.float32)
    _, flops, _ = timing.compiled_cost(jax.jit(lambda a, b: a @ b), x, x.T)
    assert flops == 2 * 64 * 32 * 64


def test_side_by_side_and_table():
    x = jnp.ones((128, 128), jnp.float32)
    res = timing.side_by_side("toy", jax.jit(lambda a: a @ a), (x,), lambda: None, peak_gflops=100.0,
                              bandwidth_gbs=10.0, repeats=3)
    row = dataclasses.asdict(res)
    assert {"name", "jax_ms", "torch_ms", "ratio", "gflops", "limit_fraction", "compile_s"} <= set(row)
    assert row["ratio"] == row["torch_ms"] / row["jax_ms"]
    machine = {"cpu": "x", "threads": 2, "jax": "j", "torch": "t", "peak_gflops_torch": 1.0, "peak_gflops_jax": 2.0,
               "bandwidth_gbs": 3.0}
    table = markdown([json.loads(json.dumps(row))], machine)
    assert "| `toy` |" in table


def test_every_item_is_defined():
    import importlib
    for name, module in ITEM_MODULES.items():
        assert name in importlib.import_module(module).ITEMS
