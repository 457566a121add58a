"""AOT planning: compile the train step for an N-device mesh without running it (or allocating weights).

``python train.py --config configs/calico_7b.py --compile_only --devices 8`` (fake CPU devices) lowers
the same jitted step programs as the loop from ``ShapeDtypeStruct`` arguments that carry the mesh shardings,
compiles it, and prints the compiled memory analysis per device and the step FLOPs. The CPU compiler's
buffer assignment differs from the GPU/TPU ones, so the numbers are a plan, not a measurement.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from calico_jax.train.config import ExperimentConfig
from calico_jax.train.sharding import make_mesh
from calico_jax.train.step import compile_step
from calico_jax.train.tasks import build as build_task
from calico_jax.train.trainer import build


def abstract_micro_batches(tr) -> list[dict]:
    cfg, spec = tr.cfg, tr.task.batch_spec
    micro = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=tr.batch_sh)
             for name, (shape, dtype) in spec(cfg.batch_size // cfg.optim.grad_accum).items()}
    return [micro] * cfg.optim.grad_accum


def per_device_bytes(tree) -> int:
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _sizes(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
            "alias": getattr(m, "alias_size_in_bytes", 0)}


def compile_only(cfg: ExperimentConfig, num_devices: int, verbose: bool = True) -> dict:
    """Per-device memory = arguments + temporaries + outputs of the compiled step. With gradient
    accumulation the step is two programs run in turn; the peak is the larger of (micro-step +
    the optimizer state and gradient sum it does not take as arguments) and the update program."""
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise ValueError(f"--devices {num_devices}: only {len(devices)} {jax.default_backend()} devices")
    mesh = make_mesh(cfg.mesh, devices)
    task = build_task(cfg, None, plan_only=True)
    tr = build(cfg, task, mesh)
    t0 = time.perf_counter()
    step = compile_step(tr, tr.abstract_state, tr.abstract_frozen, abstract_micro_batches(tr))
    seconds = time.perf_counter() - t0
    gb = 1024 ** 3
    if cfg.optim.grad_accum == 1:
        sz = _sizes(step.parts["step"])
        peak = sz["argument"] + sz["output"] + sz["temp"]
        extra = {}
    else:
        sz = _sizes(step.parts["grads"])
        held = per_device_bytes(tr.abstract_state["opt_state"]) + sz["output"]   # opt state + running sum
        upd = _sizes(step.parts["apply"])
        peak_micro = sz["argument"] + sz["output"] + sz["temp"] + held
        peak_update = upd["argument"] + upd["output"] + upd["temp"]
        peak = max(peak_micro, peak_update)
        extra = {"micro_step_peak_gb": peak_micro / gb, "update_peak_gb": peak_update / gb}
    n_train = sum(x.size for x in jax.tree.leaves(tr.abstract_state["params"]))
    n_frozen = sum(x.size for x in jax.tree.leaves(tr.abstract_frozen))
    report = {"devices": len(devices), "mesh": dict(mesh.shape), "batch_size": cfg.batch_size,
              "grad_accum": cfg.optim.grad_accum, "per_device_memory_gb": peak / gb,
              **{f"{k}_gb": v / gb for k, v in sz.items()}, **extra,
              # cost_analysis counts the per-device partitioned program; x devices = the whole step.
              "step_tflops": step.flops() * len(devices) / 1e12,
              "trainable_params": int(n_train), "frozen_params": int(n_frozen), "compile_s": seconds}
    if verbose:
        for k, v in report.items():
            print(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    return report
