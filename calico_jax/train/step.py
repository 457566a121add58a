"""The compiled train step: gradients of the trainable subtree, the AdamW update, accumulation, non-finite skips.

Step signature: ``step(state, frozen, batch) -> (state, metrics)``, jitted with in/out shardings from the
logical-axis rules; ``state`` (trainable params, optimizer state, step, RNG key data, skipped count) is donated;
``frozen`` is a separate argument, neither donated nor differentiated; the batch is sharded over
``data × fsdp``. With gradient accumulation the step is a host loop over one compiled micro-step (gradients
summed in a donated buffer) followed by one compiled update (:class:`CompiledStep`).

A non-finite loss or gradient norm leaves params and optimizer state unchanged (``skip_nonfinite``) and is
counted (``skipped``); the loop stops after ``max_consecutive_nonfinite`` in a row.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from calico_jax.core.params import combine


def value_and_grad_trainable(loss_fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """``loss_fn(params, *args)`` -> ``f(trainable, frozen, *args) = (value, grads w.r.t. trainable)``."""
    def wrapped(trainable, frozen, *args, **kwargs):
        return loss_fn(combine(trainable, frozen), *args, **kwargs)
    return jax.value_and_grad(wrapped, has_aux=has_aux)


def micro_rng(key_data: jax.Array, i) -> jax.Array:
    """RNG of micro-batch ``i`` of the step whose RNG state is ``key_data``."""
    return jax.random.fold_in(jax.random.split(jax.random.wrap_key_data(key_data))[1], i)


def step_programs(cfg, loss_fn, tx, lr, state_sh, frozen_sh, batch_sh, rep) -> dict:
    """The jitted (not yet compiled) programs: ``{"step"}``, or ``{"grads", "add", "apply"}`` with accumulation."""
    accum = cfg.optim.grad_accum
    s_train = state_sh["params"]
    vg = value_and_grad_trainable(loss_fn, has_aux=True)

    def finish(st, out):
        """(summed) loss/aux/grads over ``accum`` micro-batches -> new state, metrics."""
        (loss, aux), grads = jax.tree.map(lambda x: x / accum, out) if accum > 1 else out
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
        params = optax.apply_updates(st["params"], updates)
        if cfg.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, st["params"]), keep(opt_state, st["opt_state"])
        rng = jax.random.split(jax.random.wrap_key_data(st["rng"]))[0]
        new = {"step": st["step"] + 1, "params": params, "opt_state": opt_state,
               "rng": jax.random.key_data(rng), "skipped": st["skipped"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr(st["step"]), "finite": finite}
        return new, metrics

    if accum == 1:   # one fused program
        return {"step": jax.jit(lambda st, frozen, batch: finish(st, vg(st["params"], frozen, batch,
                                                                        micro_rng(st["rng"], 0))),
                                in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                                donate_argnums=(0,))}
    # Accumulation as a host loop over one compiled micro-step: a lax.scan over micro-batches measured ~1.8x
    # the temporaries of a single micro-step (7B plan, CPU compiler).
    return {
        "grads": jax.jit(lambda params, frozen, mb, key_data, i: vg(params, frozen, mb, micro_rng(key_data, i)),
                         in_shardings=(s_train, frozen_sh, batch_sh, rep, rep), out_shardings=(rep, s_train)),
        "add": jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), in_shardings=((rep, s_train),) * 2,
                       out_shardings=(rep, s_train), donate_argnums=(0,)),
        "apply": jax.jit(finish, in_shardings=(state_sh, (rep, s_train)), out_shardings=(state_sh, rep),
                         donate_argnums=(0,))}


def flops(compiled) -> float:
    """XLA's cost-analysis FLOPs of a compiled program (per device); 0 where the backend gives none."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- cost analysis is optional on some backends
        return 0.0
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float((ca or {}).get("flops", 0.0))


@dataclasses.dataclass
class CompiledStep:
    """The compiled train step: ``run(state, frozen, micro_batches) -> (state, metrics)``; ``parts``
    are the compiled XLA programs (one, or grads/add/apply with gradient accumulation)."""
    parts: dict
    accum: int

    def __call__(self, state, frozen, micro):
        if self.accum == 1:
            return self.parts["step"](state, frozen, micro[0])
        total = None
        for i, mb in enumerate(micro):
            out = self.parts["grads"](state["params"], frozen, mb, state["rng"], np.int32(i))
            total = out if total is None else self.parts["add"](total, out)
        return self.parts["apply"](state, total)

    def flops(self) -> float:
        """Per-device FLOPs of one whole step (micro-steps x accum)."""
        if self.accum == 1:
            return flops(self.parts["step"])
        return (flops(self.parts["grads"]) * self.accum + flops(self.parts["add"]) * (self.accum - 1)
                + flops(self.parts["apply"]))


def compiler_options(mesh: jax.sharding.Mesh) -> dict | None:
    """Per platform, never mixed. XLA:CPU: its default copy insertion copies every donated parameter at the start
    of the step; region analysis proves those copies unnecessary (bench/results/llm_opt.md: -8..11 % of a step).
    XLA:GPU without an attached GPU (an AOT plan for a described device): Triton GEMM tiling fails there
    ("Couldn't find output tile sizes"), so GEMMs go to cuBLAS; a compile on a real GPU keeps XLA's default."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    if device.platform == "gpu" and not _attached(device):
        return {"xla_gpu_enable_triton_gemm": False}
    return None


def _attached(device) -> bool:
    """False for the devices of ``jax.experimental.topologies`` (a compile-only client: nothing can run there)."""
    return "CompileOnly" not in type(device.client).__name__


def compile_step(tr, state: Any, frozen: Any, micro: list) -> CompiledStep:
    """AOT-compiles ``tr``'s (a :class:`~.trainer.Trainer`) step for these (possibly abstract) arguments."""
    accum = tr.cfg.optim.grad_accum
    opts = compiler_options(tr.mesh)
    with tr.context():
        if accum == 1:
            return CompiledStep({"step": tr.step["step"].lower(state, frozen, micro[0]).compile(opts)}, 1)
        i = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(tr.mesh, P()))
        grads = tr.step["grads"].lower(state["params"], frozen, micro[0], state["rng"], i).compile(opts)
        out = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                           grads.out_info, grads.output_shardings)
        return CompiledStep({"grads": grads, "add": tr.step["add"].lower(out, out).compile(opts),
                             "apply": tr.step["apply"].lower(state, out).compile(opts)}, accum)


def device_batch(tr, batch: dict) -> list[dict]:
    """Process-local numpy batch -> ``grad_accum`` micro-batches of global arrays sharded over data x fsdp."""
    accum = tr.cfg.optim.grad_accum
    micro = []
    for i in range(accum):
        rows = {k: np.asarray(v)[i * (len(v) // accum):(i + 1) * (len(v) // accum)] for k, v in batch.items()}
        micro.append({k: jax.make_array_from_process_local_data(tr.batch_sh, v) for k, v in rows.items()})
    return micro
