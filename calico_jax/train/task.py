"""What the training loop trains: a model, its loss, its trainable patterns and its data.

The loop (:mod:`calico_jax.train.loop`) is model-agnostic; it needs a :class:`Task`, built from the experiment
config by name (:mod:`calico_jax.train.tasks`):

* ``module`` (Linen, params with logical axis names) and :meth:`Task.init_variables`;
* :meth:`Task.loss_fn` ``(params, batch, rng) -> (loss, metrics)`` where metrics holds at least ``ce_loss``,
  ``mask_bce_loss``, ``mask_dice_loss`` (scalars) -- ``batch`` is one (micro-)batch of device arrays;
* ``trainable``: path regexes (full match on ``a/b/c``) of the leaves the optimizer updates;
* :meth:`Task.dataset` ``(process_index, process_count)``: a grain ``IterDataset`` of numpy batch dicts of
  ``batch_size // process_count`` rows whose iterator supports ``get_state``/``set_state``;
* :meth:`Task.batch_spec` (rows -> {name: (shape, dtype)}): the batch without data, for AOT planning;
* ``tokens_per_example`` / ``images_per_example`` for throughput;
* optionally held-out evaluation: :meth:`Task.eval_dataset` (a finite, fixed iterable of numpy batches of this
  process's rows: no augmentation) and :meth:`Task.eval_metrics` ``(params, batch) -> {name: (sum, count)}``;
  :func:`make_evaluator` turns them into the loop's ``eval_fn`` (each metric = total sum / total count);
* :meth:`Task.model_record`: what a checkpoint must record so the model can be restored without training code
  (:func:`calico_jax.checkpoints.workdir.restore_workdir`), or None.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from calico_jax.core.params import combine
from calico_jax.parallel import distributed


class Task:
    """Base class; subclasses set ``module``, ``trainable`` and the throughput counts in ``__init__``."""

    module: nn.Module
    trainable: tuple[str, ...] = ()
    tokens_per_example: int = 0
    images_per_example: int = 0

    def __init__(self, cfg, workdir=None, plan_only: bool = False):
        self.cfg, self.workdir, self.plan_only = cfg, workdir, plan_only

    def init_variables(self, rng: jax.Array) -> Any:
        raise NotImplementedError

    def loss_fn(self, params: Any, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def dataset(self, process_index: int, process_count: int) -> Any:
        raise NotImplementedError

    def batch_spec(self, rows: int) -> dict:
        raise NotImplementedError

    @property
    def has_eval(self) -> bool:
        return False

    def eval_dataset(self, process_index: int, process_count: int) -> Iterable[dict]:
        raise NotImplementedError

    def eval_metrics(self, params: Any, batch: dict) -> dict:
        raise NotImplementedError

    def model_record(self) -> dict | None:
        return None


def eval_rows(cfg, process_count: int) -> int:
    """Rows of one evaluation batch on this process: a micro-batch (fits like a training micro-step)."""
    return cfg.batch_size // cfg.optim.grad_accum // process_count


def make_evaluator(tr) -> Callable[[Any, Any, int], dict] | None:
    """The loop's ``eval_fn(state, frozen, step) -> {name: float}`` for a :class:`~.trainer.Trainer` whose
    task evaluates, else None. One jitted program (same shardings as the train step, compiled on the
    first call); batches are sharded over data x fsdp like training batches."""
    task = tr.task
    if not task.has_eval:
        return None
    fn = jax.jit(lambda train, frozen, batch: task.eval_metrics(combine(train, frozen), batch),
                 in_shardings=(tr.state_sh["params"], tr.frozen_sh, tr.batch_sh),
                 out_shardings=NamedSharding(tr.mesh, P()))

    compiled: dict[tuple, Any] = {}   # batch shapes -> program

    def evaluate(state, frozen, step):
        sums: dict[str, list[float]] = {}
        with tr.context():
            for batch in task.eval_dataset(jax.process_index(), jax.process_count()):
                dev = {k: jax.make_array_from_process_local_data(tr.batch_sh, np.asarray(v)) for k, v in batch.items()}
                shapes = tuple((k, v.shape, v.dtype.name) for k, v in sorted(dev.items()))
                if shapes not in compiled:   # compiled here, then every process starts its first run together
                    compiled[shapes] = fn.lower(state["params"], frozen, dev).compile()
                    distributed.barrier("first_eval")
                for k, (s, n) in jax.device_get(compiled[shapes](state["params"], frozen, dev)).items():
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0], acc[1] = acc[0] + float(s), acc[1] + float(n)
        if not sums:
            raise ValueError("evaluation: the held-out set gave no batch (fewer examples than one batch?)")
        return {k: s / n for k, (s, n) in sums.items() if n > 0}

    return evaluate
