"""AOT plans: compile the train step for a target's devices without running it (or allocating a weight).

``python train.py --config configs/calico_7b.py --compile_only --target v5p:2x2x1`` lowers the same jitted step
programs as the loop from ``ShapeDtypeStruct`` arguments that carry the mesh shardings, compiles them with the
target's own compiler (libtpu, XLA:GPU via the CUDA PJRT plugin, or XLA:CPU for ``cpu:N``; see
:mod:`calico_jax.plans.targets`) and reports per device: argument / output / temp / alias bytes of each program,
the step's peak against the chip's memory, FLOPs and bytes, the collectives of the optimised HLO, the compile time
and a roofline estimate of the step time and FLOP utilisation (:mod:`calico_jax.plans.roofline`; an estimate, not
a measurement). A plan over the chip's memory raises :class:`PlanDoesNotFit`, whose one-line message says what to
change; ``train.py`` prints it and exits with 2.

Memory of one step: with gradient accumulation the step is two programs run in turn (micro-step, update); the peak
is the larger of (micro-step program + the optimizer state and running gradient sum it does not take as arguments)
and the update program. A program's own peak is arguments + outputs + temporaries - aliased (donated) bytes.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from calico_jax.parallel.sharding import make_mesh
from calico_jax.plans import roofline
from calico_jax.plans import targets as targets_lib
from calico_jax.train.config import ExperimentConfig
from calico_jax.train.step import compiler_options
from calico_jax.train.tasks import build as build_task
from calico_jax.train.trainer import build

GB = 1024 ** 3
# --config paths of each tower's remat field (CalicoConfig.remat_policies names).
REMAT_FIELDS = {"llm": "model.llm.remat", "vision": "model.vision.vision.remat", "sam": "model.sam.image_encoder.remat",
                "dinov2": "model.dinov2.remat", "qformer": "model.vision.qformer.remat", "clip": "model.clip.remat"}


# Towers the backward pass goes through (LoRA in the LLM, the CAMs re-query the Q-Former): only their remat saves
# memory; the frozen encoders keep no activations for a backward pass.
BACKWARD_TOWERS = ("llm", "qformer")


class PlanDoesNotFit(RuntimeError):
    """The plan needs more memory per device than the target has; ``str()`` is the one-line answer."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def abstract_micro_batches(tr) -> list[dict]:
    """The step's batch arguments from the task's ``batch_spec`` (CALICO: the batch contract's
    :func:`calico_jax.models.inputs.spec`), rows sharded over data x fsdp as the loop feeds them."""
    cfg, spec = tr.cfg, tr.task.batch_spec
    micro = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=tr.batch_sh)
             for name, (shape, dtype) in spec(cfg.batch_size // cfg.optim.grad_accum).items()}
    return [micro] * cfg.optim.grad_accum


def per_device_bytes(tree) -> int:
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def memory_sizes(compiled) -> dict:
    """Per-device argument / output / temp / alias bytes of a compiled program, and its peak."""
    m = compiled.memory_analysis()
    sz = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
          "alias": getattr(m, "alias_size_in_bytes", 0)}
    return {**sz, "peak": sz["argument"] + sz["output"] + sz["temp"] - sz["alias"]}


def trace_step(tr) -> dict:
    """The step's programs traced from abstract arguments: {"step"} or {"grads", "add", "apply"}
    (``.lower()`` each; ``.jaxpr`` for the FLOP count)."""
    st, fr, micro = tr.abstract_state, tr.abstract_frozen, abstract_micro_batches(tr)[0]
    with tr.context():
        if tr.cfg.optim.grad_accum == 1:
            return {"step": tr.step["step"].trace(st, fr, micro)}
        i = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(tr.mesh, P()))
        grads = tr.step["grads"].trace(st["params"], fr, micro, st["rng"], i)
        out = grads.out_info
        return {"grads": grads, "add": tr.step["add"].trace(out, out), "apply": tr.step["apply"].trace(st, out)}


_HBM = re.compile(r"\(([\d.]+)([KMGT])\)\s*exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNIT = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def compile_lowered(lowered, opts):
    """Compiles; libtpu's out-of-HBM refusal becomes (None, needed bytes, available bytes)."""
    try:
        return lowered.compile(opts), 0.0, 0.0
    except jax.errors.JaxRuntimeError as e:
        m = _HBM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or m is None:
            raise
        return None, float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)]


def compile_programs(cfg: ExperimentConfig, target: targets_lib.Target) -> dict:
    """Builds the trainer on ``target``'s devices, lowers and compiles the step's programs. Returns
    {"trainer", "mesh", "traced", "lowered", "compiled", "refused": None or (program, needed, available bytes),
    "seconds"}."""
    mesh = make_mesh(cfg.mesh, target.devices)
    tr = build(cfg, build_task(cfg, None, plan_only=True), mesh)
    t0 = time.perf_counter()
    traced = trace_step(tr)
    with tr.context():
        lowered = {k: t.lower() for k, t in traced.items()}
    opts = compiler_options(mesh)
    compiled, refused = {}, None
    for name, low in lowered.items():
        c, need, avail = compile_lowered(low, opts)
        if c is None:
            refused = (name, need, avail)
            break
        compiled[name] = c
    return {"trainer": tr, "mesh": mesh, "traced": traced, "lowered": lowered, "compiled": compiled, "refused": refused,
            "seconds": time.perf_counter() - t0}


def as_target(target) -> targets_lib.Target:
    if isinstance(target, targets_lib.Target):
        return target
    return targets_lib.parse(target if isinstance(target, str) else f"cpu:{target or 0}")


def compile_only(cfg: ExperimentConfig, target: targets_lib.Target | str | int | None = None,
                 verbose: bool = True, memory_gb: float = 0.0, json_path: str | Path | None = None) -> dict:
    """The plan of ``cfg``'s train step on ``target`` (a :class:`~.targets.Target`, a ``--target`` string, or a
    CPU device count); ``memory_gb`` overrides the chip's memory per device. Raises :class:`PlanDoesNotFit`."""
    target = as_target(target)
    return plan_report(cfg, target, compile_programs(cfg, target), verbose, memory_gb, json_path)


def plan_report(cfg, target, progs: dict, verbose: bool = True, memory_gb: float = 0.0, json_path=None) -> dict:
    """The plan of compiled programs (:func:`compile_programs`); raises :class:`PlanDoesNotFit`."""
    tr, mesh, accum = progs["trainer"], progs["mesh"], cfg.optim.grad_accum
    budget = memory_gb * GB if memory_gb else target.memory_bytes
    report = {"program": "train", "target": target.spec, "device_kind": target.devices[0].device_kind,
              "platform": target.platform, "devices": target.num_devices, "mesh": dict(mesh.shape),
              "batch_size": cfg.batch_size, "grad_accum": accum,
              "micro_batch_per_device": cfg.batch_size // accum // (mesh.shape["data"] * mesh.shape["fsdp"]),
              "remat": _remat(cfg), "memory_per_device_gb": budget / GB, "compile_s": progs["seconds"],
              "trainable_params": int(sum(x.size for x in jax.tree.leaves(tr.abstract_state["params"]))),
              "frozen_params": int(sum(x.size for x in jax.tree.leaves(tr.abstract_frozen)))}
    if progs["refused"] is not None:   # libtpu refused a program: its own numbers
        name, need, avail = progs["refused"]
        budget = memory_gb * GB or avail
        report.update({"fits": False, "refused_program": name, "per_device_memory_gb": need / GB,
                       "memory_per_device_gb": budget / GB})
        emit_report(report, json_path, verbose=False)
        raise PlanDoesNotFit(not_fit_message(cfg, target, need, budget, mesh), report)
    report.update(_memory(tr, progs["compiled"], accum))
    report.update(_costs(progs, accum, target))
    peak = report["per_device_memory_gb"] * GB
    report["fits"] = bool(budget == 0 or peak <= budget)
    emit_report(report, json_path, verbose)
    if not report["fits"]:
        raise PlanDoesNotFit(not_fit_message(cfg, target, peak, budget, mesh), report)
    return report


def _remat(cfg) -> dict:
    policies = getattr(cfg.model, "remat_policies", None)
    return dict(policies()) if policies else {}


def _memory(tr, compiled, accum) -> dict:
    if accum == 1:
        sz = memory_sizes(compiled["step"])
        return {"per_device_memory_gb": sz["peak"] / GB, **{f"{k}_gb": v / GB for k, v in sz.items()}}
    sz = memory_sizes(compiled["grads"])
    held = per_device_bytes(tr.abstract_state["opt_state"]) + sz["output"]   # opt state + running sum
    upd = memory_sizes(compiled["apply"])
    peak_micro, peak_update = sz["peak"] + held, upd["peak"]
    return {"per_device_memory_gb": max(peak_micro, peak_update) / GB, **{f"{k}_gb": v / GB for k, v in sz.items()},
            "micro_step_peak_gb": peak_micro / GB, "update_peak_gb": peak_update / GB,
            "update_program_gb": {k: v / GB for k, v in upd.items()}}


def _costs(progs, accum, target) -> dict:
    """Whole-step FLOPs (traced programs; XLA's count of the lowered modules beside it), per-device bytes and
    collectives (compiled programs), the roofline estimate."""
    runs = {"step": 1} if accum == 1 else {"grads": accum, "add": accum - 1, "apply": 1}
    n, compiled = target.num_devices, progs["compiled"]
    counts = {k: roofline.traced_flops(progs["traced"][k]) for k in runs}
    whole = sum(counts[k][0] * r for k, r in runs.items())
    xla = sum(roofline.lowered_flops(progs["lowered"][k]) * r for k, r in runs.items())
    dev = {k: roofline.compiled_cost(compiled[k]) for k in runs}
    coll = {k: roofline.collectives([roofline.hlo_text(compiled[k])], top=8) for k in runs}
    per_step = {op: {"count": sum(coll[k][op]["count"] * r for k, r in runs.items()),
                     "bytes": sum(coll[k][op]["bytes"] * r for k, r in runs.items())} for op in roofline.COLLECTIVES}
    bytes_dev = sum(dev[k]["bytes"] * r for k, r in runs.items())
    coll_bytes = sum(v["bytes"] for v in per_step.values())
    est = roofline.estimate(whole / n, bytes_dev, coll_bytes, target.chip)
    return {"step_tflops": whole / 1e12, "step_tflops_per_device": whole / n / 1e12,
            "xla_step_tflops": xla / 1e12, "while_loops": sum(counts[k][1] for k in runs),
            "compiled_tflops_per_device": sum(dev[k]["flops"] * r for k, r in runs.items()) / 1e12,
            "step_bytes_per_device_gb": bytes_dev / GB,
            "collectives_per_step": per_step, "collectives_per_program": coll,
            "estimate": {**est, "note": "roofline estimate (matmul FLOPs at peak, HBM and link bandwidth, perfect "
                                        "overlap); not a measurement"} if est else {}}


def not_fit_message(cfg, target, need: float, avail: float, mesh) -> str:
    """One line: target, needed vs available per device, what to change."""
    n, hints = target.num_devices, []
    tensor = mesh.shape["tensor"]
    if mesh.shape["fsdp"] * tensor < n:
        hints.append(f"FSDP over all {n} devices (--config.mesh='{{\"data\": 1, \"fsdp\": {n // tensor}, "
                     f"\"tensor\": {tensor}}}')")
    plain = [t for t in BACKWARD_TOWERS if _remat(cfg).get(t) == "none"]
    if plain:
        hints.append("remat per tower (" + ", ".join(f"--config.{REMAT_FIELDS[t]}=full" for t in plain) + ")")
    accum, shards = cfg.optim.grad_accum, mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // accum // shards
    if micro > 1 and cfg.batch_size % (accum * 2 * shards) == 0:
        hints.append(f"a smaller micro-batch (--config.optim.grad_accum={accum * 2}: {micro} -> {micro // 2} "
                     "per device)")
    if not hints:
        hints.append("more devices (a larger slice) or a smaller model")
    return (f"plan does not fit: {target.describe()} needs {need / GB:.2f} GiB per device, {avail / GB:.2f} GiB "
            f"available; change: " + "; ".join(hints))


def emit_report(report: dict, json_path, verbose: bool) -> None:
    """Writes the plan as JSON (when ``json_path``) and prints it (when ``verbose``)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if verbose:
        print(format_report(report))


def format_report(r: dict) -> str:
    """key=value lines (machine-greppable, as before) then the collectives and the estimate."""
    lines = []
    for k, v in r.items():
        if isinstance(v, dict):
            continue
        lines.append(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    lines.append(f"mesh={r['mesh']} remat={r['remat']}")
    for op, c in r.get("collectives_per_step", {}).items():
        if c["count"]:
            lines.append(f"collective {op}: {c['count']} per step, {c['bytes'] / GB:.3f} GiB per device")
    est = r.get("estimate") or {}
    if est:
        lines.append(f"ESTIMATE (roofline, not measured): step {est['step_s']:.3f} s ({est['bound']}-bound: compute "
                     f"{est['compute_s']:.3f} s, HBM {est['hbm_s']:.3f} s, collectives {est['collective_s']:.3f} s), "
                     f"MFU {100 * est['mfu']:.1f} %")
    return "\n".join(lines)
