"""The sharded, jitted train step and the loop around it (model-agnostic: any :class:`~.tasks.Task`).

Step signature: ``step(state, frozen, batch) -> (state, metrics)`` compiled with ``jax.jit``
in/out shardings from the logical-axis rules; ``state`` (trainable params, optimizer state, step,
RNG key data, skipped count) is donated; ``frozen`` is a separate argument, neither donated nor
differentiated (gradients exist for the trainable subtree only); the batch is sharded over
``data × fsdp``. With gradient accumulation the step is a host loop over one compiled micro-step
(gradients summed in a donated buffer) followed by one compiled update (see :class:`CompiledStep`).

A non-finite loss or gradient norm leaves params and optimizer state unchanged (``skip_nonfinite``),
is counted (``skipped``), and ``max_consecutive_nonfinite`` in a row stop the run with a message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from calico_jax.train import config as config_lib
from calico_jax.train import optim, state as state_lib
from calico_jax.train.checkpoint import Checkpointer
from calico_jax.train.config import ExperimentConfig
from calico_jax.train.sharding import RULES, make_mesh, param_shardings
from calico_jax.train.tasks import Task

log = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "lr", "grad_norm")
# Dense bf16 peak TFLOP/s per device, by substring of ``device_kind``.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v6": 918.0, "TPU v5p": 459.0,
               "TPU v5": 197.0, "TPU v4": 275.0}


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class Trainer:
    """Everything the loop and the AOT planner need for one (config, task, mesh)."""
    cfg: ExperimentConfig
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
    step: dict                   # jitted programs: {"step"} or {"grads", "add", "apply"} (see compile_step)

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


def fit_shardings(abstract: Any, shardings: Any) -> Any:
    """Drops the mesh axes of a dimension they do not divide (e.g. a 32007-row vocabulary on
    ``tensor`` 2): that dimension is replicated instead of failing to compile."""
    def fit(a, sh):
        spec = list(sh.spec) + [None] * (len(a.shape) - len(sh.spec))
        for i, axes in enumerate(spec):
            names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            if names and a.shape[i] % int(np.prod([sh.mesh.shape[n] for n in names])):
                log.info("replicating dim %d (%d) of a %s param: not divisible by %s", i, a.shape[i], a.shape, names)
                spec[i] = None
        return NamedSharding(sh.mesh, P(*spec))
    return jax.tree.map(fit, abstract, shardings)


def build(cfg: ExperimentConfig, task: Task, mesh: jax.sharding.Mesh) -> Trainer:
    rep = NamedSharding(mesh, P())
    patterns = tuple(cfg.model.trainable or task.trainable)
    frozen_dtype = jnp.dtype(cfg.model.frozen_dtype)
    with _Context(mesh):
        boxed = jax.eval_shape(task.init_variables, jax.random.key(0))["params"]
    full_sh = fit_shardings(nn.unbox(boxed), param_shardings(boxed, mesh))
    a_train, a_frozen = state_lib.partition(nn.unbox(boxed), patterns, strict=True)
    s_train, s_frozen = state_lib.partition(full_sh, patterns)
    cast = lambda x: x.astype(frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    a_frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, frozen_dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype), a_frozen)
    tx, lr = optim.make_optimizer(cfg.optim, cfg.total_steps)
    state_sh = {"step": rep, "params": s_train, "opt_state": optim.state_shardings(tx, a_train, s_train, rep),
                "rng": rep, "skipped": rep}
    accum = cfg.optim.grad_accum
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.batch_size // accum) % shards:
        raise ValueError(f"batch_size {cfg.batch_size} / grad_accum {accum} is not divisible by data x fsdp = {shards}")
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))

    def init_fn():
        k_init, k_train = jax.random.split(jax.random.key(cfg.seed))
        full = nn.unbox(task.init_variables(k_init)["params"])
        train, frozen = state_lib.partition(full, patterns)
        st = {"step": jnp.zeros((), jnp.int32), "params": train, "opt_state": tx.init(train),
              "rng": jax.random.key_data(k_train), "skipped": jnp.zeros((), jnp.int32)}
        return st, jax.tree.map(cast, frozen)

    abstract_state = _with_sharding(jax.eval_shape(lambda: init_fn()[0]), state_sh)
    vg = state_lib.value_and_grad_trainable(task.loss_fn, has_aux=True)

    def micro_rng(key_data, i):   # micro-batch i of the step whose RNG state is key_data
        return jax.random.fold_in(jax.random.split(jax.random.wrap_key_data(key_data))[1], i)

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
        programs = {"step": jax.jit(lambda st, frozen, batch: finish(st, vg(st["params"], frozen, batch,
                                                                            micro_rng(st["rng"], 0))),
                                    in_shardings=(state_sh, s_frozen, batch_sh), out_shardings=(state_sh, rep),
                                    donate_argnums=(0,))}
    else:
        # Accumulation as a host loop over one compiled micro-step: a lax.scan over micro-batches
        # measured ~1.8x the temporaries of a single micro-step (7B plan, CPU compiler).
        programs = {
            "grads": jax.jit(lambda params, frozen, mb, key_data, i: vg(params, frozen, mb, micro_rng(key_data, i)),
                             in_shardings=(s_train, s_frozen, batch_sh, rep, rep), out_shardings=(rep, s_train)),
            "add": jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), in_shardings=((rep, s_train),) * 2,
                           out_shardings=(rep, s_train), donate_argnums=(0,)),
            "apply": jax.jit(finish, in_shardings=(state_sh, (rep, s_train)), out_shardings=(state_sh, rep),
                             donate_argnums=(0,))}
    init = jax.jit(init_fn, out_shardings=(state_sh, s_frozen))
    return Trainer(cfg, task, mesh, patterns, tx, lr, state_sh, s_frozen, batch_sh, abstract_state,
                   _with_sharding(a_frozen, s_frozen), init, programs)


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
            return _flops(self.parts["step"])
        return (_flops(self.parts["grads"]) * self.accum + _flops(self.parts["add"]) * (self.accum - 1)
                + _flops(self.parts["apply"]))


def compiler_options(mesh: jax.sharding.Mesh) -> dict | None:
    """XLA:CPU's default copy insertion copies every donated parameter at the start of the step; its
    region analysis proves those copies unnecessary (bench/results/llm_opt.md: -8..11 % of a step)."""
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if mesh.devices.flat[0].platform == "cpu" else None


def compile_step(tr: Trainer, state: Any, frozen: Any, micro: list) -> CompiledStep:
    """AOT-compiles the step for these (possibly abstract) arguments."""
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


def device_batch(tr: Trainer, batch: dict) -> list[dict]:
    """Process-local numpy batch -> ``grad_accum`` micro-batches of global arrays sharded over data x fsdp."""
    accum = tr.cfg.optim.grad_accum
    micro = []
    for i in range(accum):
        rows = {k: np.asarray(v)[i * (len(v) // accum):(i + 1) * (len(v) // accum)] for k, v in batch.items()}
        micro.append({k: jax.make_array_from_process_local_data(tr.batch_sh, v) for k, v in rows.items()})
    return micro


def load_frozen(tr: Trainer, meta_source: dict | None = None) -> tuple[Any, dict]:
    """Frozen weights and their source: the base checkpoint (restored onto this mesh) or the seeded init."""
    base = tr.cfg.model.base_checkpoint
    source = {"kind": "base", "path": str(Path(base).absolute())} if base else {"kind": "init", "seed": tr.cfg.seed}
    if meta_source is not None and meta_source != source:
        raise ValueError(f"checkpoint was trained on frozen weights {meta_source}, this run uses {source}; "
                         "use another workdir or the original model.base_checkpoint/seed")
    with tr.context():
        state, frozen = tr.init()
    if base:
        state, frozen = _overlay_base(tr, base, state, frozen)
    return (state, frozen), source


def _overlay_base(tr: Trainer, base: str, state: Any, frozen: Any) -> tuple[Any, Any]:
    """Takes every weight from a converted base checkpoint (``OUT/params``, same model config)."""
    import orbax.checkpoint as ocp
    params = state_lib.combine(state["params"], frozen)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    with ocp.StandardCheckpointer() as ckptr:
        loaded = ckptr.restore(Path(base).absolute() / "params", target)
    train, frz = state_lib.partition(loaded, tr.patterns)
    return {**state, "params": train}, frz


# --------------------------------------------------------------------------------------- metrics
class MetricsFile:
    """``metrics.jsonl``: one complete line per logged step. On resume, lines after the restored step
    (and any torn last line) are dropped atomically, so the file always reads as one clean run.
    With ``tensorboard_dir`` the numeric values also go to TensorBoard scalars (tensorboardX); its
    ``purge_step`` hides events a resumed run replays, for the same reason."""

    def __init__(self, path: Path, resume_step: int, tensorboard_dir: Path | None = None):
        self.path = path
        self.tb = None
        if tensorboard_dir is not None and jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        config_lib.write_atomic(path, "".join(f"{x}\n" for x in kept))
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")   # one write of a whole line, then flush
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])
            self.tb.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def _peak_tflops(cfg: ExperimentConfig) -> float:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)


def _flops(compiled) -> float:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", 0.0))
    except Exception:  # noqa: BLE001 -- cost analysis is optional on some backends
        return 0.0


# ------------------------------------------------------------------------------------------ loop
def train(cfg: ExperimentConfig, workdir: str | Path, task: Task | None = None,
          eval_fn: Callable[[Any, Any, int], dict] | None = None) -> dict:
    """Trains to ``cfg.total_steps`` (resuming from the newest checkpoint in the workdir); returns a summary."""
    from calico_jax.train import tasks as tasks_lib
    from tqdm import tqdm

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, workdir)
    devices = jax.devices()[:cfg.num_devices] if cfg.num_devices > 0 else jax.devices()
    mesh = make_mesh(cfg.mesh, devices)
    task = task or tasks_lib.build(cfg, workdir)
    tr = build(cfg, task, mesh)
    if eval_fn is None and cfg.eval_every > 0:
        eval_fn = tasks_lib.make_evaluator(tr)   # None when the task does not evaluate
    ckpt = Checkpointer(cfg.checkpoint.directory or workdir / "checkpoints", cfg.checkpoint)
    data_it = iter(task.dataset(jax.process_index(), jax.process_count()))
    with tr.context():
        restored = ckpt.restore_latest(tr.abstract_state, data_it)
    if restored is None:
        (state, frozen), source = load_frozen(tr)
    else:
        state, meta = restored
        (_, frozen), source = load_frozen(tr, meta.get("frozen_source"))
    start = int(state["step"])
    metrics = MetricsFile(workdir / "metrics.jsonl", start, workdir / "tensorboard")

    fault = os.environ.get("CALICO_TRAIN_FAULT", "").partition(":")   # e.g. "kill:7" (fault injection)
    fault = (fault[0], int(fault[2])) if fault[2] else None
    stop = {"signal": None}
    prev = signal.signal(signal.SIGTERM, lambda sig, _: stop.update(signal=sig))
    peak, flops, compiled = _peak_tflops(cfg), 0.0, None
    consecutive, last, skipped = 0, {}, int(state["skipped"])
    bar = tqdm(total=cfg.total_steps, initial=start, disable=not cfg.progress, dynamic_ncols=True)
    try:
        for step in range(start, cfg.total_steps):
            batch = device_batch(tr, next(data_it))
            t0 = time.perf_counter()
            with tr.context():
                if compiled is None:
                    compiled = compile_step(tr, state, frozen, batch)
                    flops = compiled.flops()
                    t0 = time.perf_counter()   # step time excludes compilation
                state, m = compiled(state, frozen, batch)
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            s = step + 1
            finite = bool(m.pop("finite"))
            consecutive = 0 if finite else consecutive + 1
            skipped += not finite
            n = cfg.batch_size
            rec = {"step": s, **{k: float(m[k]) for k in METRIC_KEYS}, "step_time_s": dt,
                   "examples_per_s": n / dt, "skipped": skipped,
                   **{k: float(v) for k, v in m.items() if k not in METRIC_KEYS}}
            if task.tokens_per_example:
                rec["tokens_per_s"] = n * task.tokens_per_example / dt
            if task.images_per_example:
                rec["images_per_s"] = n * task.images_per_example / dt
            if flops:
                rec["step_tflops"] = flops * len(devices) / 1e12
                if peak:
                    rec["mfu"] = flops / dt / (peak * 1e12)
            if s % cfg.log_every == 0 or s == cfg.total_steps or not finite:
                metrics.write(rec)
            last = rec
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", ex_s=f"{rec['examples_per_s']:.1f}")
            if not finite and (not cfg.skip_nonfinite or consecutive >= cfg.max_consecutive_nonfinite):
                raise NonFiniteError(
                    f"step {s}: non-finite loss/gradients ({consecutive} in a row, {skipped} skipped in total, "
                    f"limit {cfg.max_consecutive_nonfinite if cfg.skip_nonfinite else 1}); last good checkpoint: "
                    f"{ckpt.all_steps()[-1] if ckpt.all_steps() else 'none'}. Lower optim.learning_rate or "
                    "inspect the data around this step.")
            if eval_fn is not None and cfg.eval_every and s % cfg.eval_every == 0:
                metrics.write({"step": s, **{f"eval_{k}": float(v) for k, v in eval_fn(state, frozen, s).items()}})
            if fault and fault[1] == s:   # tests: a real kill -9 / SIGTERM to this process after step s
                os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[fault[0]])
            if s % cfg.checkpoint_every == 0 or s == cfg.total_steps or stop["signal"] is not None:
                ckpt.save(s, state, data_it, {"frozen_source": source, "config": cfg.name})
            if stop["signal"] is not None:
                log.warning("SIGTERM: saved a final checkpoint at step %d", s)
                break
    finally:
        bar.close()
        metrics.close()
        ckpt.close()   # waits for async saves to commit
        signal.signal(signal.SIGTERM, prev)
        if hasattr(data_it, "close"):
            data_it.close()
    return {"step": int(state["step"]), "last": last, "preempted": stop["signal"] is not None,
            "state": state, "frozen": frozen, "skipped": skipped, "trainer": tr}
