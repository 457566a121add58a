"""bench/ plumbing (no timings asserted): alternating runner, cost analysis, a real item end to end."""
import dataclasses
import json

import jax
import jax.numpy as jnp

from bench import timing
from bench.__main__ import ITEM_MODULES, README_BEGIN, README_END, main, markdown, update_readme


def test_alternate_runs_round_robin():
    order = []
    stats = timing.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert stats["a"].runs == 3 and stats["a"].min_ms <= stats["a"].median_ms <= stats["a"].max_ms


def test_cost_analysis_counts_matmul_flops():
    x = jnp.ones((64, 32), jnp.float32)
    _, flops, _ = timing.compile_with_flops(jax.jit(lambda a, b: a @ b), x, x.T)
    assert flops == 2 * 64 * 32 * 64


def test_side_by_side_and_table():
    x = jnp.ones((128, 128), jnp.float32)
    res = timing.side_by_side("toy", jax.jit(lambda a: a @ a), (x,), lambda: None, peak_gflops=100.0,
                              bandwidth_gbs=10.0, repeats=3)
    row = dataclasses.asdict(res)
    assert {"name", "jax_ms", "torch_ms", "ratio", "gflops", "limit_fraction", "compile_s"} <= set(row)
    assert row["ratio"] == row["torch_ms"] / row["jax_ms"]
    limits = {"peak_gflops": {"jax": 200.0, "torch": 100.0}, "bandwidth_gbs": {"jax": 30.0, "torch": 30.0}}
    machine = {"cpu": "x", "threads": 2, "jax": "j", "torch": "t", "limits_before": limits,
               "warnings": timing.limits_check(limits, limits)}
    table = markdown([timing.normalise(json.loads(json.dumps(row)), limits)], machine)
    assert table.count("| `toy` |") == 2 and "warning: peak_gflops" in table


def _row(**kw):
    return {"name": "x", "jax_ms": 100.0, "torch_ms": 300.0, "ratio": 3.0, "flops": 10e9, "limit": "compute", **kw}


def test_normalised_ratio_divides_out_the_hosts_gemm_preference():
    # JAX's GEMM runs at twice PyTorch's on this host: a raw 3x is a normalised 1.5x
    limits = {"peak_gflops": {"jax": 200.0, "torch": 100.0}, "bandwidth_gbs": {"jax": 40.0, "torch": 20.0}}
    r = timing.normalise(_row(alt_torch_ms={"torch_fused": 150.0}), limits)
    assert r["jax_fraction"] == 10e9 / 0.1 / 1e9 / 200.0          # 0.5 of its own peak
    assert r["torch_fraction"] == 10e9 / 0.3 / 1e9 / 100.0        # 1/3 of its own
    assert abs(r["normalised_ratio"] - r["jax_fraction"] / r["torch_fraction"]) < 1e-12
    assert abs(r["normalised_ratio"] - 1.5) < 1e-12
    assert abs(r["alt_normalised"]["torch_fused"] - 0.75) < 1e-12
    # memory-bound items normalise by the read bandwidths instead
    b = timing.normalise(_row(limit="bandwidth", bytes_min=1e9, flops=0.0), limits)
    assert abs(b["normalised_ratio"] - 1.5) < 1e-12 and abs(b["jax_fraction"] - 0.25) < 1e-12


def test_limits_check_warns_on_gap_and_drift():
    same = {"peak_gflops": {"jax": 200.0, "torch": 190.0}, "bandwidth_gbs": {"jax": 40.0, "torch": 41.0}}
    assert timing.limits_check(same, same) == []
    slower = {"peak_gflops": {"jax": 170.0, "torch": 190.0}, "bandwidth_gbs": {"jax": 40.0, "torch": 41.0}}
    (w,) = timing.limits_check(same, slower)
    assert "jax" in w and "drifted" in w
    apart = {"peak_gflops": {"jax": 400.0, "torch": 200.0}, "bandwidth_gbs": {"jax": 40.0, "torch": 41.0}}
    assert any("differ by 50 %" in w for w in timing.limits_check(apart, apart))


def test_gemm_only_ceiling(monkeypatch):
    # the products alone really run (count x [m,k]x[k,n], outputs kept), and the note's arithmetic is
    # their FLOPs over the time over the peak
    assert timing.gemm_only_ms([(8, 16, 4, 3), (2, 4, 16, 1)], repeats=2) > 0
    monkeypatch.setattr(timing, "gemm_only_ms", lambda shapes: 50.0)
    note = timing.ceiling_note([(100, 100, 100, 5), (100, 100, 50, 10)], peak_gflops=1.0)
    # 2e6 * 5 + 1e6 * 10 = 2e7 FLOPs in 50 ms = 0.4 GFLOP/s = 40 % of a 1 GFLOP/s peak
    assert note.startswith("GEMM-only ceiling 40 % of peak") and "15 products" in note


def test_training_shapes_add_both_gradients_of_every_product():
    fwd = [(512, 768, 2048, 24), (512, 768, 32000, 1)]
    shapes = timing.training_shapes(fwd)
    assert shapes[:2] == fwd
    # dx = dy[m,n] @ w^T[n,k] and dw = x^T[k,m] @ dy[m,n]: same FLOPs, so a step does 3x the forward's
    assert set(shapes[2:]) == {(512, 2048, 768, 24), (512, 32000, 768, 1), (768, 512, 2048, 24), (768, 512, 32000, 1)}
    flops = lambda ss: sum(2 * m * k * n * c for m, k, n, c in ss)  # noqa: E731
    assert flops(shapes) == 3 * flops(fwd)


def test_every_item_is_defined():
    import importlib
    for name, module in ITEM_MODULES.items():
        assert name in importlib.import_module(module).ITEMS


def test_readme_block_is_replaced_and_a_bad_readme_is_refused_before_timing(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    update_readme(readme, "| new |\n")
    assert readme.read_text() == f"intro\n{README_BEGIN}\n| new |\n{README_END}\nafter\n"
    update_readme(readme, "| newer |\n")                       # idempotent on its own output
    assert readme.read_text().count("| newer |") == 1 and "| new |\n" not in readme.read_text()
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    out = tmp_path / "r.json"
    with __import__("pytest").raises(SystemExit) as e:
        main(["--only", "qformer", "--readme", str(plain), "--out", str(out)])
    assert e.value.code == 2 and "needs one <!-- bench:cpu:begin -->" in capsys.readouterr().err
    assert plain.read_text() == "no markers\n" and not out.exists()


def test_predict_plan_table_adds_the_decode_steps(tmp_path, capsys):
    from bench import predict_plans

    plan = {"mesh": {"data": 2, "fsdp": 1, "tensor": 4}, "device_kind": "TPU v5 lite", "weights_gb_total": 16.0,
            "estimate": {"step_s": 0.2}, "target": "v5e:2x4", "rows": 2, "peak_gb": 5.0,
            "memory_per_device_gb": 15.75, "fits": True, "compile_s": 100.0}
    (tmp_path / "predict_v5e_2x4_data2_tensor4.json").write_text(json.dumps(plan))
    r = predict_plans.row(plan, tokens=11)
    assert abs(r["call_s"] - (0.2 + 10 * 4.0 / 819.0)) < 1e-12 and abs(r["samples_per_s"] - 2 / r["call_s"]) < 1e-12
    assert predict_plans.main(["--dir", str(tmp_path), "--tokens", "11"]) == 0
    out = capsys.readouterr().out
    assert f"| v5e:2x4 | 2x1x4 | 2 | 5.00 / 15.75 | yes | 100 | {r['call_s']:.3f} |" in out
    assert out.count("no plan at") == len(predict_plans.PLANS) - 1
