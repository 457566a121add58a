"""The training loop (model-agnostic: any :class:`~calico_jax.train.task.Task`), top to bottom:

1. workdir and ``config.json``; 2. mesh; 3. task (model, loss, data); 4. trainer (shardings, optimizer, compiled
step: :mod:`calico_jax.train.trainer`, :mod:`calico_jax.train.step`); 5. restore the newest checkpoint or start
fresh; 6. steps: log, evaluate, checkpoint, stop on SIGTERM (a final checkpoint) or on too many non-finite steps.

Rerunning in the same workdir resumes exactly (params, optimizer, RNG, data order).

Several processes (:mod:`calico_jax.parallel.distributed`): each one feeds the block of every global batch its devices
hold (:func:`~calico_jax.parallel.distributed.batch_block`: process ``i`` of ``n`` reads rows ``[i*B/n, (i+1)*B/n)``
of each
micro-batch), so the global batches -- rows in order -- are those of a one-process run; process 0 alone writes
``config.json``, ``metrics.jsonl`` and the progress bar; a SIGTERM to any process stops all of them after the same
step (one small collective per step) with a final checkpoint.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from calico_jax.checkpoints.training import Checkpointer
from calico_jax.parallel import distributed
from calico_jax.parallel.sharding import make_mesh
from calico_jax.train import config as config_lib
from calico_jax.train import tasks as tasks_lib
from calico_jax.train.metrics_log import MetricsFile, data_skip_record, peak_tflops, step_record
from calico_jax.train.step import compile_step, device_batch
from calico_jax.train.task import Task, make_evaluator
from calico_jax.train.trainer import build, load_frozen

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


def train(cfg, workdir: str | Path, task: Task | None = None, eval_fn: Callable[[Any, Any, int], dict] | None = None,
          on_step: Callable[[int], None] | None = None) -> dict:
    """Trains to ``cfg.total_steps`` (resuming from the newest checkpoint in the workdir); returns a summary.
    ``on_step(step)`` runs after each step's logging and evaluation, before its checkpoint (tests inject faults)."""
    from tqdm import tqdm

    # 1. workdir
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    first = jax.process_index() == 0
    if first:
        config_lib.save(cfg, workdir)
    # 2. mesh
    devices = jax.devices()[:cfg.num_devices] if cfg.num_devices > 0 else jax.devices()
    mesh = make_mesh(cfg.mesh, devices)
    # 3. task, 4. trainer
    task = task or tasks_lib.build(cfg, workdir)
    tr = build(cfg, task, mesh)
    if eval_fn is None and cfg.eval_every > 0:
        eval_fn = make_evaluator(tr)   # None when the task does not evaluate
    # 5. checkpoint
    ckpt = Checkpointer(cfg.checkpoint.directory or workdir / "checkpoints", cfg.checkpoint)
    data_it = iter(task.dataset(*data_shard(tr)))
    with tr.context():
        restored = ckpt.restore_latest(tr.abstract_state, data_it, global_rows=cfg.batch_size)
    state, meta = restored if restored is not None else (None, {})
    if restored is not None and first:
        print(f"train: resuming from checkpoint step {int(state['step'])} in {ckpt.directory}", file=sys.stderr,
              flush=True)
    (fresh, frozen), source = load_frozen(tr, meta.get("frozen_source"))
    state = fresh if state is None else state
    meta = {"frozen_source": source, "config": cfg.name}
    record = task.model_record()
    if record is not None:
        meta["model"] = record
    # 6. steps
    metrics = (MetricsFile(workdir / "metrics.jsonl", int(state["step"]), workdir / "tensorboard") if first
               else _NoMetrics())
    run = _Run(cfg, tr, ckpt, metrics, eval_fn, on_step, meta, len(devices), int(state["skipped"]))
    stop = {"signal": None}
    prev = signal.signal(signal.SIGTERM, lambda sig, _: stop.update(signal=sig))
    bar, show = None, cfg.progress and first
    preempted = False
    try:
        for step in range(int(state["step"]), cfg.total_steps):
            state, rec = run.step(state, frozen, next(data_it), step + 1)
            if bar is None:   # the bar starts after the compile, so its rate and ETA count steps only
                if show:
                    print(f"train: compiled the training step in {run.compile_s:.1f} s", file=sys.stderr, flush=True)
                bar = tqdm(total=cfg.total_steps, initial=step + 1, desc="train", unit="step", disable=not show,
                           dynamic_ncols=True)
            else:
                bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", samples_per_s=f"{rec['examples_per_s']:.1f}")
            # One decision for every process (a signal may reach them during different steps).
            if run.after_step(step + 1, state, frozen, data_it,
                              lambda: distributed.any_process(stop["signal"] is not None)):
                preempted = True
                log.warning("SIGTERM: saved a final checkpoint at step %d", step + 1)
                break
    finally:
        if bar is not None:
            bar.close()
        run.metrics.close()
        ckpt.close()   # waits for async saves to commit
        signal.signal(signal.SIGTERM, prev)
        if hasattr(data_it, "close"):
            data_it.close()
    return {"step": int(state["step"]), "last": run.last, "preempted": preempted,
            "state": state, "frozen": frozen, "skipped": run.skipped, "trainer": tr,
            "compiled": run.compiled, "compile_s": run.compile_s}


def data_shard(tr) -> tuple[int, int]:
    """(block, blocks) of every micro-batch this process feeds; the loop requires block = process index."""
    block, blocks = distributed.batch_block(tr.batch_sh, tr.cfg.batch_size // tr.cfg.optim.grad_accum)
    if (block, blocks) != (jax.process_index(), jax.process_count()):
        raise ValueError(f"process {jax.process_index()} of {jax.process_count()} holds batch block {block} of "
                         f"{blocks}: each process must hold its own block (mesh {tr.cfg.mesh} over devices ordered "
                         "by process)")
    return block, blocks


class _NoMetrics:
    """The metrics file of processes other than 0 (every value is global: process 0 writes it)."""

    def write(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Run:
    """The per-step work of :func:`train`: the compiled step, the metrics record, the non-finite rule,
    evaluation and checkpoints."""

    def __init__(self, cfg, tr, ckpt, metrics, eval_fn, on_step, meta, num_devices, skipped: int):
        self.cfg, self.tr, self.ckpt = cfg, tr, ckpt
        self.metrics, self.eval_fn, self.on_step = metrics, eval_fn, on_step
        self.meta, self.num_devices = meta, num_devices
        self.compiled, self.flops, self.peak = None, 0.0, peak_tflops(cfg)
        self.compile_s = 0.0
        self.consecutive, self.skipped, self.last = 0, skipped, {}

    def step(self, state, frozen, batch, s: int):
        cfg, tr = self.cfg, self.tr
        micro = device_batch(tr, batch)
        t0 = time.perf_counter()
        with tr.context():
            if self.compiled is None:
                self.compiled = compile_step(tr, state, frozen, micro)
                self.compile_s = time.perf_counter() - t0
                self.flops = self.compiled.flops()
                distributed.barrier("first_train_step")   # peers compile at different speeds
                t0 = time.perf_counter()   # step time excludes compilation
            state, m = self.compiled(state, frozen, micro)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        finite = bool(m.pop("finite"))
        self.consecutive = 0 if finite else self.consecutive + 1
        self.skipped += not finite
        rec = step_record(s, m, dt, self.skipped, cfg, tr.task, self.flops, self.peak, self.num_devices)
        if s % cfg.log_every == 0 or s == cfg.total_steps or not finite:
            rec.update(data_skip_record(tr.task))   # counted, never silently dropped
            self.metrics.write(rec)
        self.last = rec
        if not finite and (not cfg.skip_nonfinite or self.consecutive >= cfg.max_consecutive_nonfinite):
            steps = self.ckpt.all_steps()
            raise NonFiniteError(
                f"step {s}: non-finite loss/gradients ({self.consecutive} in a row, {self.skipped} skipped in total, "
                f"limit {cfg.max_consecutive_nonfinite if cfg.skip_nonfinite else 1}); last good checkpoint: "
                f"{steps[-1] if steps else 'none'}. Lower optim.learning_rate or inspect the data around this step.")
        return state, rec

    def after_step(self, s: int, state, frozen, data_it, stop_requested: Callable[[], bool]) -> bool:
        """Evaluation, the test hook, the checkpoint; returns whether training stops here (SIGTERM)."""
        cfg = self.cfg
        if self.eval_fn is not None and cfg.eval_every and s % cfg.eval_every == 0:
            evals = self.eval_fn(state, frozen, s)
            self.metrics.write({"step": s, **{f"eval_{k}": float(v) for k, v in evals.items()}})
        if self.on_step is not None:
            self.on_step(s)
        self.ckpt.check()
        stopping = stop_requested()
        if s % cfg.checkpoint_every == 0 or s == cfg.total_steps or stopping:
            self.ckpt.save(s, state, data_it, self.meta)
        return stopping
