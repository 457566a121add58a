"""AOT plan of the predict program -- the very jitted function the predictor runs,
:func:`calico_jax.inference.predictor.generate_program` (prefill with the CAMs, KV-cache decode, SAM image
embeddings) -- for one batch, placed as the predictor places it on a mesh (:mod:`calico_jax.inference.placement`).

All weights are in ``cfg.frozen_dtype`` (the inference dtype: an exported model has no optimizer or fp32 masters),
sharded by the training logical-axis rules (a dimension a mesh axis does not divide stays replicated); the batch is
the contract's "predict" fields (:func:`calico_jax.models.inputs.spec`, the Q-Former's instruction tokens included
with ``qformer_text_input``) for one sample per ``data`` x ``fsdp`` device (the predictor's smallest batch on that
mesh), rows split over them, each of ``data.max_images`` images with a ``PROMPT_TOKENS``-token prompt, and
``InferenceConfig.max_new_tokens`` decode steps. Memory
covers the whole call (the KV cache for all decode steps is allocated up front); FLOPs count the prefill, the SAM
image encoder and one decode step (the decode ``while`` loop's trip count depends on the answer).
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.inference.placement import MeshContext, batch_sharding, rows_multiple
from calico_jax.inference.predictor import InferenceConfig, generate_program
from calico_jax.models import inputs as contract
from calico_jax.parallel.sharding import fit_shardings, make_mesh, param_shardings
from calico_jax.plans import roofline
from calico_jax.plans.train_plan import (
    GB,
    PlanDoesNotFit,
    as_target,
    compile_lowered,
    emit_report,
    memory_sizes,
    not_fit_message,
)
from calico_jax.train.step import compiler_options
from calico_jax.train.tasks import build as build_task

PROMPT_TOKENS = 128


def lower_predict(cfg, mesh, rows: int | None = None):
    """(traced, lowered predict program, abstract params) for ``rows`` samples (default: one per ``data`` x
    ``fsdp`` device)."""
    task = build_task(cfg, None, plan_only=True)
    rows = rows or rows_multiple(mesh)
    if rows % rows_multiple(mesh):
        raise ValueError(f"predict plan: {rows} rows do not split over data x fsdp = {rows_multiple(mesh)}")
    with MeshContext(mesh):
        boxed = jax.eval_shape(lambda: task.init_variables(jax.random.key(0)))["params"]
    shardings = fit_shardings(nn.unbox(boxed), param_shardings(boxed, mesh))
    dtype = jnp.dtype(cfg.frozen_dtype)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating)
                                                            else a.dtype, sharding=s), nn.unbox(boxed), shardings)
    fields = contract.spec(task.model_config, rows, cfg.data.max_images, PROMPT_TOKENS, program="predict")
    inputs = contract.CalicoInputs(**contract.abstract(fields, batch_sharding(mesh)))
    with MeshContext(mesh):
        traced = generate_program.trace(params, inputs, module=task.module,
                                        max_new_tokens=InferenceConfig().max_new_tokens, eos=2, pad=0)
        return traced, traced.lower(), params


def compile_predict(cfg, target, verbose: bool = True, memory_gb: float = 0.0, json_path=None) -> dict:
    """The plan of the predict program for one sample per data x fsdp device of ``target``; raises
    :class:`~.plan.PlanDoesNotFit`."""
    target = as_target(target)
    mesh = make_mesh(cfg.mesh, target.devices)
    t0 = time.perf_counter()
    traced, lowered, params = lower_predict(cfg, mesh)
    compiled, need, avail = compile_lowered(lowered, compiler_options(mesh))
    budget = memory_gb * GB or avail or target.memory_bytes
    report = {"program": "predict", "target": target.spec, "rows": rows_multiple(mesh), "dtype": cfg.frozen_dtype,
              "device_kind": target.devices[0].device_kind,
              "platform": target.platform, "devices": target.num_devices, "mesh": dict(mesh.shape),
              "memory_per_device_gb": budget / GB, "compile_s": time.perf_counter() - t0,
              "weights_gb_total": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params)) / GB, "remat": {}}
    if compiled is None:
        report.update({"fits": False, "per_device_memory_gb": need / GB})
        emit_report(report, json_path, verbose=False)
        raise PlanDoesNotFit(not_fit_message(cfg, target, need, budget, mesh), report)
    sz = memory_sizes(compiled)
    cost = roofline.compiled_cost(compiled)
    coll = roofline.collectives([roofline.hlo_text(compiled)], top=8)
    flops, whiles = roofline.traced_flops(traced)   # the decode loop's body counts once (see the module doc)
    largest = coll.pop("largest")
    est = roofline.estimate(flops / target.num_devices, cost["bytes"], sum(c["bytes"] for c in coll.values()),
                            target.chip)
    report.update({"per_device_memory_gb": sz["peak"] / GB, **{f"{k}_gb": v / GB for k, v in sz.items()},
                   "step_tflops": flops / 1e12, "while_loops": whiles, "xla_step_tflops": roofline.lowered_flops(
                       lowered) / 1e12, "step_bytes_per_device_gb": cost["bytes"] / GB,
                   "collectives_per_step": coll, "largest_collectives": largest,
                   "estimate": {**est, "note": "roofline estimate of one predict call; not a measurement"}
                   if est else {}})
    report["fits"] = bool(budget == 0 or sz["peak"] <= budget)
    emit_report(report, json_path, verbose)
    if not report["fits"]:
        raise PlanDoesNotFit(not_fit_message(cfg, target, sz["peak"], budget, mesh), report)
    return report
