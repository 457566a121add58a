"""AOT plans for hardware that is not attached: a small CALICO train step and the predict program compiled by libtpu
for ``v5e:2x2`` and by XLA:GPU for 2 x H100 (our device description); the rules table's shardings as the compilers
took them; the over-budget answer (one line, exit code 2); FLOP counts where XLA:GPU gives none."""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from calico_jax.parallel import chips
from calico_jax.plans import roofline, targets
from calico_jax.plans.predict_plan import compile_predict
from calico_jax.plans.search import candidates, config_hash
from calico_jax.plans.train_plan import PlanDoesNotFit, compile_programs, not_fit_message, plan_report
from calico_jax.train.config import load
from calico_jax.train.step import compiler_options

ROOT = Path(__file__).resolve().parents[1]
HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_GPU = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
needs_tpu = pytest.mark.skipif(not HAS_TPU, reason="needs the tpu-aot extra (libtpu)")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs the gpu-aot extra (jax-cuda12-plugin/-pjrt)")
SMALL = 2048     # parameters with more elements than this must be sharded on an FSDP mesh


def small_calico(mesh: dict, **changes):
    """configs/tiny.py cut to one layer per tower (compile time), the given mesh, one micro-batch."""
    over = [("mesh", json.dumps(mesh)), ("batch_size", "4"), ("model.llm.num_hidden_layers", "2"),
            ("model.cam.layers", "[1]"), ("model.vision.vision.num_hidden_layers", "1"),
            ("model.vision.qformer.num_hidden_layers", "1"), ("model.dinov2.num_hidden_layers", "1"),
            ("model.sam.image_encoder.depth", "1"), ("model.sam.image_encoder.global_attn_indexes", "[0]"),
            ("model.sam.mask_decoder.transformer.depth", "1"), ("data.max_tokens", "48")]
    return load(ROOT / "configs/tiny.py", over + [(k, str(v)) for k, v in changes.items()])


def _leaves_with_shardings(abstract, shardings):
    """(abstract leaf, compiled sharding) pairs; jax reports None for an argument the program does not use."""
    compiled = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)
    assert len(compiled) == len(jax.tree.leaves(abstract))
    return [(a, s) for a, s in zip(jax.tree.leaves(abstract), compiled) if s is not None]


def check_shardings(progs, rows: int):
    """Every param above SMALL elements is split over the mesh; the batch rows over data x fsdp."""
    tr, compiled = progs["trainer"], progs["compiled"]["step"]
    (state_sh, frozen_sh, batch_sh), _ = compiled.input_shardings
    params = _leaves_with_shardings(tr.abstract_state["params"], state_sh["params"])
    params += _leaves_with_shardings(tr.abstract_frozen, frozen_sh)
    big = [(a.shape, s) for a, s in params if a.size > SMALL]
    assert len(big) > 10
    replicated = [shape for shape, s in big if s.is_fully_replicated]
    assert not replicated, f"fully replicated params above {SMALL} elements: {replicated}"
    n = math.prod(progs["mesh"].shape.values())
    for shape, s in big:   # each device holds 1/fsdp of every big param
        assert math.prod(s.shard_shape(shape)) * progs["mesh"].shape["fsdp"] == math.prod(shape)
    ids = batch_sh["input_ids"]
    assert ids.shard_shape((rows, 48))[0] == rows * ids.mesh.shape["tensor"] // n   # rows over data x fsdp


@needs_tpu
def test_tpu_v5e_train_step_and_predict_compile_with_the_rules_shardings():
    target = targets.parse("v5e:2x2")
    assert target.num_devices == 4 and target.chip.peak_tflops == 197.0
    cfg = small_calico({"data": 1, "fsdp": 4, "tensor": 1})
    progs = compile_programs(cfg, target)
    assert progs["refused"] is None
    check_shardings(progs, rows=4)
    # the FSDP program gathers the sharded weights
    assert roofline.collectives([progs["compiled"]["step"].as_text()])["all-gather"]["count"] > 0
    plan = compile_predict(cfg, target, verbose=False)
    assert plan["fits"] and 0 < plan["per_device_memory_gb"] < plan["memory_per_device_gb"] == 15.75
    assert plan["step_tflops"] > 0


@needs_gpu
def test_gpu_h100_train_step_and_predict_compile_from_our_description():
    target = targets.parse("h100:2")
    assert target.platform == "cuda" and target.devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    assert target.memory_bytes == pytest.approx(85520809984 * 0.75)
    cfg = small_calico({"data": 2, "fsdp": 1, "tensor": 1})
    progs = compile_programs(cfg, target)
    ids = progs["compiled"]["step"].input_shardings[0][2]["input_ids"]
    assert "data" in jax.tree.leaves(ids.spec[0]) and ids.shard_shape((4, 48)) == (2, 48)   # rows split on data
    plan = plan_report(cfg, target, progs, verbose=False)
    assert plan["fits"] and plan["step_tflops"] > 0 and plan["per_device_memory_gb"] > 0
    assert plan["estimate"]["step_s"] > 0 and 0 < plan["estimate"]["mfu"] <= 1
    # data parallel: the gradients of the trainable params are all-reduced
    assert plan["collectives_per_step"]["all-reduce"]["count"] > 0
    pred = compile_predict(small_calico({"data": 1, "fsdp": 2, "tensor": 1}), target, verbose=False)
    assert pred["fits"] and pred["step_tflops"] > 0


@needs_gpu
def test_gpu_flops_fallback_is_the_analytic_matmul_count():
    target = targets.parse("h100:1")
    mesh = Mesh(np.asarray(target.devices).reshape(1), ("x",))
    m, k, n = 256, 512, 128
    a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    b = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    traced = jax.jit(lambda a, b: jax.lax.map(lambda _: a @ b, jnp.arange(3)).sum(0)).trace(a, b)
    compiled = traced.lower().compile(compiler_options(mesh))
    assert not compiled.cost_analysis()          # XLA:GPU gives none: the fallback is what is tested
    assert roofline.traced_flops(traced) == (3 * 2 * m * k * n, 0)     # the loop body 3 times
    assert roofline.lowered_flops(traced.lower()) < 3 * 2 * m * k * n  # XLA's count: the body once
    assert roofline.compiled_cost(compiled)["bytes"] > 0


@needs_tpu
def test_peaks_are_exact_per_chip():
    from calico_jax.train.metrics_log import PEAK_TFLOPS
    assert targets.parse("v5p:2x2x1").chip.peak_tflops == 459.0      # kind "TPU v5", not v5e's 197
    assert targets.parse("v4:2x2x1").num_devices == 4                  # megacore: one device per chip
    assert PEAK_TFLOPS["TPU v5 lite"] == 197.0 and PEAK_TFLOPS["TPU v5"] == 459.0
    assert PEAK_TFLOPS.get("TPU v5 something") is None


def _train_py(*args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "tests/toy_train.py", "--config", "tests/toy_config.py", "--compile_only", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@needs_tpu
def test_over_budget_plan_is_one_line_and_exit_code_2(tmp_path):
    # a real overflow: 2 x (32 x 2^26) f32 frozen weights = 16 GiB on each device of data=4: libtpu refuses
    p = _train_py("--target", "v5e:2x2", "--config.model.hidden=67108864", "--plan_json", str(tmp_path / "p.json"))
    assert p.returncode == 2, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: plan does not fit: v5e:2x2 (4 x TPU v5 lite) needs ")
    assert "15.75 GiB available" in line and "FSDP over all 4 devices" in line and "grad_accum=2" in line
    assert "Traceback" not in p.stderr
    assert json.loads((tmp_path / "p.json").read_text())["fits"] is False


def test_over_budget_on_a_memory_budget_and_the_hints(capsys):
    import tests.toy  # noqa: F401 -- registers the toy task
    from calico_jax.plans.cli import run_plan
    cfg = load(ROOT / "tests/toy_config.py", [("mesh", '{"data": 2, "fsdp": 2}')])
    args = argparse.Namespace(target="cpu:4", devices=0, search=False, program="train", plan_json="",
                              memory_gb=1e-6, plan_cache="")
    assert run_plan(cfg, args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train.py: plan does not fit: cpu:4 (4 x cpu) needs ") and "0.00 GiB available" in line
    assert '"fsdp": 4' in line and "--config.optim.grad_accum=2" in line
    mesh = type("M", (), {"shape": {"data": 1, "fsdp": 4, "tensor": 1}})()

    class T:   # the message needs only the description and count
        num_devices = 4

        def describe(self):
            return "v5e:2x2 (4 x TPU v5 lite)"
    msg = not_fit_message(small_calico({"data": 1, "fsdp": 4, "tensor": 1}), T(), 20 * 1024 ** 3,
                          15.75 * 1024 ** 3, mesh)
    assert "needs 20.00 GiB per device, 15.75 GiB available" in msg
    assert "--config.model.llm.remat=full, --config.model.vision.qformer.remat=full" in msg and "FSDP" not in msg


def test_cpu_predict_plan_with_the_instruction_aware_qformer(tmp_path):
    """``train.py --config configs/tiny.py --compile_only --target cpu:1 --program predict
    --config.model.qformer_text_input=true``, in process: the plan compiles the predictor's own program with the
    Q-Former's instruction tokens (without them the model raises, which run_plan would answer with exit code 2)."""
    from calico_jax.plans.cli import run_plan
    cfg = load(ROOT / "configs/tiny.py", [("model.qformer_text_input", "true")])
    args = argparse.Namespace(target="cpu:1", devices=0, search=False, program="predict",
                              plan_json=str(tmp_path / "plan.json"), memory_gb=0.0, plan_cache="")
    assert run_plan(cfg, args) == 0
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["program"] == "predict" and report["fits"] and report["devices"] == 1


def test_missing_extra_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "libtpu", "jax_plugins.xla_cuda12") else real(name, *a))
    with pytest.raises(targets.TargetError, match=r"tpu-aot"):
        targets.parse("v5p:2x2x1")
    with pytest.raises(targets.TargetError, match=r"gpu-aot"):
        targets.parse("h100:8")
    with pytest.raises(targets.TargetError, match="expected cpu:N"):
        targets.parse("z80:4")


def test_search_grid_least_memory_first_and_cache_key():
    cfg = load(ROOT / "configs/calico_7b.py")
    grid = candidates(cfg, 8)
    first_label, first = grid[0]
    assert dict(first)["model.llm.remat"] == "full" and dict(first)["optim.grad_accum"] == "20"
    assert json.loads(dict(first)["mesh"]) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert all(cfg.batch_size % int(dict(o)["optim.grad_accum"]) == 0 for _, o in grid)
    assert "remat none" in grid[-1][0]
    assert config_hash(cfg, "v5p:2x2x1") == config_hash(load(ROOT / "configs/calico_7b.py"), "v5p:2x2x1")
    assert config_hash(cfg, "v5p:2x2x1") != config_hash(cfg.replace(batch_size=80), "v5p:2x2x1")
    with pytest.raises(PlanDoesNotFit):   # PlanDoesNotFit carries the report for the cache
        raise PlanDoesNotFit("x", {"fits": False})


def test_collectives_are_read_from_the_optimised_hlo():
    hlo = """  %all-gather.3 = bf16[4096,1024]{1,0} all-gather(%p), dimensions={0}, metadata={op_name="jit(f)/llm/dot"}
  %ags = (bf16[10]{0}, bf16[40]{0}) all-gather-start(%x)
  %agd = bf16[40]{0} all-gather-done(%ags)
  %rs = f32[2,8]{1,0} reduce-scatter(%y), dimensions={0}, to_apply=%add
  ROOT %all-reduce.1 = f32[8]{0} all-reduce(%y), to_apply=%add"""
    c = roofline.collectives([hlo], top=1)
    assert c["all-gather"] == {"count": 2, "bytes": 4096 * 1024 * 2 + 40 * 2}   # async pair counted once
    assert c["reduce-scatter"] == {"count": 1, "bytes": 64} and c["all-reduce"] == {"count": 1, "bytes": 32}
    assert c["largest"] == [{"bytes": 4096 * 1024 * 2, "op": "all-gather", "shape": "bf16[4096,1024]{1,0}",
                             "op_name": "jit(f)/llm/dot"}]
    chip = chips.CHIPS["TPU v5"]
    est = roofline.estimate(459e12, 2765e9 / 2, 0.0, chip)     # 1 s of compute, 0.5 s of HBM traffic
    assert est["bound"] == "compute" and est["step_s"] == pytest.approx(1.0) and est["mfu"] == pytest.approx(1.0)
