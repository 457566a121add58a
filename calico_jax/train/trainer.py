"""Everything one training run compiles against: mesh, shardings, optimizer, the initial state, the frozen weights.

:func:`build` reads top to bottom: abstract params (no allocation) -> shardings from the logical-axis rules ->
trainable/frozen split -> optimizer and its state shardings -> batch sharding -> the init program and the step
programs (:mod:`calico_jax.train.step`). :func:`load_frozen` then materialises the frozen weights (from the
base checkpoint, or the seeded init) on the mesh.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from calico_jax.checkpoints import workdir as ckpt_lib
from calico_jax.core.params import combine, partition
from calico_jax.parallel import distributed
from calico_jax.parallel.sharding import RULES, fit_shardings, param_shardings
from calico_jax.train import optim
from calico_jax.train.step import step_programs
from calico_jax.train.task import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trainer:
    """Everything the loop and the AOT planner need for one (config, task, mesh)."""
    cfg: Any
    task: Task
    mesh: jax.sharding.Mesh
    patterns: tuple[str, ...]
    tx: optax.GradientTransformation
    lr: Callable
    state_sh: Any
    frozen_sh: Any
    batch_sh: NamedSharding
    abstract_state: Any          # ShapeDtypeStructs with shardings (orbax restore target)
    abstract_frozen: Any
    init: Callable               # jitted: () -> (state, frozen)
    step: dict                   # jitted programs: {"step"} or {"grads", "add", "apply"} (see step.step_programs)

    def context(self):
        return _Context(self.mesh)


class _Context:
    def __init__(self, mesh):
        self.mesh, self.stack = mesh, []

    def __enter__(self):
        for cm in (jax.set_mesh(self.mesh), nn.logical_axis_rules(RULES)):
            cm.__enter__()
            self.stack.append(cm)

    def __exit__(self, *exc):
        while self.stack:
            self.stack.pop().__exit__(*exc)


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def build(cfg, task: Task, mesh: jax.sharding.Mesh) -> Trainer:
    rep = NamedSharding(mesh, P())
    patterns = tuple(task.trainable)

    # Parameters: shapes and shardings, split into trainable and frozen.
    with _Context(mesh):   # the key is made inside the trace: an eager one would run on the mesh's devices,
        boxed = jax.eval_shape(lambda: task.init_variables(jax.random.key(0)))["params"]   # which may be AOT-only
    full_sh = fit_shardings(nn.unbox(boxed), param_shardings(boxed, mesh))
    a_train, a_frozen = partition(nn.unbox(boxed), patterns, strict=True)
    s_train, s_frozen = partition(full_sh, patterns)
    a_frozen = jax.eval_shape(lambda t: ckpt_lib.cast_frozen(t, cfg.frozen_dtype), a_frozen)

    # Optimizer and state shardings.
    tx, lr = optim.make_optimizer(cfg.optim, cfg.total_steps)
    state_sh = {"step": rep, "params": s_train, "opt_state": optim.state_shardings(tx, a_train, s_train, rep),
                "rng": rep, "skipped": rep}

    # Batches: rows over data x fsdp.
    accum, shards = cfg.optim.grad_accum, mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.batch_size // accum) % shards:
        raise ValueError(f"batch_size {cfg.batch_size} / grad_accum {accum} is not divisible by data x fsdp = {shards}")
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))

    # The initial state: the frozen weights of a random-init run are re-created from the same key on restore.
    def init_fn():
        k_init, k_train = ckpt_lib.init_keys(cfg.seed)
        train, frozen = partition(nn.unbox(task.init_variables(k_init)["params"]), patterns)
        st = {"step": jnp.zeros((), jnp.int32), "params": train, "opt_state": tx.init(train),
              "rng": jax.random.key_data(k_train), "skipped": jnp.zeros((), jnp.int32)}
        return st, ckpt_lib.cast_frozen(frozen, cfg.frozen_dtype)

    abstract_state = _with_sharding(jax.eval_shape(lambda: init_fn()[0]), state_sh)
    programs = step_programs(cfg, task.loss_fn, tx, lr, state_sh, s_frozen, batch_sh, rep)
    init = jax.jit(init_fn, out_shardings=(state_sh, s_frozen))
    return Trainer(cfg, task, mesh, patterns, tx, lr, state_sh, s_frozen, batch_sh, abstract_state,
                   _with_sharding(a_frozen, s_frozen), init, programs)


def frozen_source(cfg) -> dict:
    """Where this run's frozen weights come from (recorded in every checkpoint's meta)."""
    base = cfg.base_checkpoint
    return {"kind": "base", "path": str(Path(base).absolute())} if base else {"kind": "init", "seed": cfg.seed}


def load_frozen(tr: Trainer, meta_source: dict | None = None) -> tuple[Any, dict]:
    """Frozen weights and their source: the base checkpoint (restored onto this mesh) or the seeded init."""
    source = frozen_source(tr.cfg)
    if meta_source is not None and meta_source != source:
        raise ValueError(f"checkpoint was trained on frozen weights {meta_source}, this run uses {source}; "
                         "use another workdir or the original base_checkpoint/seed")
    with tr.context():
        init = tr.init.lower().compile()
        distributed.barrier("init")   # the program may hold collectives: start it together
        state, frozen = init()
    if tr.cfg.base_checkpoint:
        state, frozen = _overlay_base(tr, tr.cfg.base_checkpoint, state, frozen)
    return (state, frozen), source


def _overlay_base(tr: Trainer, base: str, state: Any, frozen: Any) -> tuple[Any, Any]:
    """Takes every weight from a converted base checkpoint (``BASE/params``, same model config)."""
    check_base_preprocess(tr.cfg.model, base)
    params = combine(state["params"], frozen)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    train, frz = partition(ckpt_lib.load_base_params(base, target, tr.cfg.model), tr.patterns)
    return {**state, "params": train}, frz


def check_base_preprocess(model_cfg, base: str) -> None:
    """A base checkpoint converted or trained with other input sizes than the experiment asks for is an error."""
    import json
    meta_path = Path(base) / "config.json"
    pre = getattr(model_cfg, "preprocess", None)
    if pre is None or not meta_path.is_file():
        return
    stored = json.loads(meta_path.read_text()).get("config", {}).get("preprocess")
    if stored is not None:
        type(pre).from_dict(stored, where=f"{meta_path}: config.preprocess").check_same(
            pre, f"base_checkpoint {base} vs model.preprocess")
