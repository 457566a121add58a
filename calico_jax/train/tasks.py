"""What the training loop trains: a model, its loss, its trainable patterns and its data.

The loop (:mod:`calico_jax.train.loop`) is model-agnostic; it needs a :class:`Task`:

* ``module`` (Linen, params with logical axis names) and ``init_variables(rng)``;
* ``loss_fn(params, batch, rng) -> (loss, metrics)`` where metrics holds at least ``ce_loss``,
  ``mask_bce_loss``, ``mask_dice_loss`` (scalars) -- ``batch`` is one (micro-)batch of device arrays;
* ``trainable``: path regexes (full match on ``a/b/c``) of the leaves the optimizer updates;
* ``dataset(process_index, process_count)``: a grain ``IterDataset`` of numpy batch dicts of
  ``batch_size // process_count`` rows whose iterator supports ``get_state``/``set_state``;
* ``tokens_per_example`` / ``images_per_example`` for throughput;
* optionally ``eval_dataset(process_index, process_count)`` (a finite, fixed iterable of numpy batches of
  this process's rows: held-out, no augmentation) and ``eval_metrics(params, batch) -> {name: (sum, count)}``;
  :func:`make_evaluator` turns them into the loop's ``eval_fn`` (each metric = total sum / total count).

Tasks: ``toy`` (a small stand-in with CE + mask losses, for fast tests) and ``calico``
(:mod:`calico_jax.models.calico` + :func:`calico_jax.losses.calico_loss` on the grain pipeline).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from calico_jax import layers
from calico_jax.losses import LossConfig, causal_lm_loss, mask_losses
from calico_jax.train import state as state_lib
from calico_jax.train.config import ExperimentConfig


@dataclasses.dataclass
class Task:
    module: nn.Module
    init_variables: Callable[[jax.Array], Any]
    loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
    trainable: tuple[str, ...]
    dataset: Callable[[int, int], Any]
    tokens_per_example: int = 0
    images_per_example: int = 0
    model_name: str = ""
    batch_spec: Callable[[int], dict] | None = None   # rows -> {name: (shape, dtype)} (AOT planning)
    eval_dataset: Callable[[int, int], Iterable[dict]] | None = None   # None: no periodic evaluation
    eval_metrics: Callable[[Any, dict], dict] | None = None


def eval_rows(cfg: ExperimentConfig, process_count: int) -> int:
    """Rows of one evaluation batch on this process: a micro-batch (fits like a training micro-step)."""
    return cfg.batch_size // cfg.optim.grad_accum // process_count


def make_evaluator(tr) -> Callable[[Any, Any, int], dict] | None:
    """The loop's ``eval_fn(state, frozen, step) -> {name: float}`` for a :class:`~.loop.Trainer` whose
    task evaluates, else None. One jitted program (same shardings as the train step, compiled on the
    first call); batches are sharded over data x fsdp like training batches."""
    task = tr.task
    if task.eval_dataset is None or task.eval_metrics is None:
        return None
    fn = jax.jit(lambda train, frozen, batch: task.eval_metrics(state_lib.combine(train, frozen), batch),
                 in_shardings=(tr.state_sh["params"], tr.frozen_sh, tr.batch_sh),
                 out_shardings=NamedSharding(tr.mesh, P()))

    def evaluate(state, frozen, step):
        sums: dict[str, list[float]] = {}
        with tr.context():
            for batch in task.eval_dataset(jax.process_index(), jax.process_count()):
                dev = {k: jax.make_array_from_process_local_data(tr.batch_sh, np.asarray(v)) for k, v in batch.items()}
                for k, (s, n) in jax.device_get(fn(state["params"], frozen, dev)).items():
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0], acc[1] = acc[0] + float(s), acc[1] + float(n)
        if not sums:
            raise ValueError("evaluation: the held-out set gave no batch (fewer examples than one batch?)")
        return {k: s / n for k, (s, n) in sums.items() if n > 0}

    return evaluate


# ------------------------------------------------------------------------------------------- toy
class Toy(nn.Module):
    """Frozen "tower" (embed -> mlp) + trainable heads: token logits [T, V] and mask logits [H, W].
    Parameter names mimic the real split: ``tower`` frozen, ``head``/``lora_*`` trainable."""

    vocab: int = 16
    width: int = 32
    hidden: int = 64
    mask_hw: int = 8
    seq: int = 8
    noise: bool = True

    @nn.compact
    def __call__(self, x, rng=None):
        x = nn.with_logical_constraint(x, ("batch", "embed"))
        h = jax.nn.gelu(layers.dense(self.hidden, ("embed", "mlp"), name="tower_up")(x), approximate=False)
        a = self.param("lora_a", layers.param_init(nn.initializers.normal(0.02), ("mlp", None)), (self.hidden, 4))
        b = self.param("lora_b", layers.param_init(nn.initializers.zeros, (None, "embed")), (4, self.width))
        h2 = layers.dense(self.width, ("mlp", "embed"), name="tower_down")(h) + (h @ a) @ b
        if rng is not None and self.noise:   # dropout-like noise, so the RNG state matters for exact resume
            h2 = h2 * jax.random.bernoulli(rng, 0.9, h2.shape) / 0.9
        tok = layers.dense(self.seq * self.vocab, ("embed", "vocab"), name="head_text")(h2)
        mask = layers.dense(self.mask_hw * self.mask_hw, ("embed", None), name="head_mask")(h2)
        return tok.reshape(-1, self.seq, self.vocab), mask.reshape(-1, 1, self.mask_hw, self.mask_hw)


class ToyExample(grain.transforms.Map):
    def __init__(self, width: int, vocab: int, seq: int, hw: int, seed: int, nan_indices: frozenset):
        self.width, self.vocab, self.seq, self.hw, self.seed, self.nan = width, vocab, seq, hw, seed, nan_indices

    def map(self, i):
        rng = np.random.default_rng((self.seed, int(i)))
        x = rng.standard_normal(self.width).astype(np.float32)
        labels = (np.abs(x[:self.seq] * 3).astype(np.int32) % self.vocab)
        masks = (rng.random((1, self.hw, self.hw)) < 0.5) | (x[:self.hw, None] > 0)[None]
        if int(i) in self.nan:
            x[0] = np.nan
        return {"x": x, "labels": labels, "masks": masks.astype(np.float32)}


def toy_task(cfg: ExperimentConfig, workdir: Path | None = None) -> Task:
    opts = {"vocab": 16, "width": 32, "hidden": 64, "mask_hw": 8, "seq": 8, "noise": True, **cfg.model.options}
    module = Toy(**opts)
    dtype = jnp.dtype(cfg.model.dtype)
    loss_cfg = LossConfig()

    def init_variables(rng):
        return module.init(rng, jnp.zeros((1, module.width), dtype))

    def loss_fn(params, batch, rng):
        tok, mask = module.apply({"params": params}, batch["x"].astype(dtype), rng)
        # causal_lm_loss shifts by one (logits[:, :-1] vs labels[:, 1:]): pad both so tok[t] scores labels[t].
        logits = jnp.concatenate([tok, tok[:, -1:]], axis=1)
        labels = jnp.concatenate([jnp.full_like(batch["labels"][:, :1], -100), batch["labels"]], axis=1)
        ce = causal_lm_loss(logits, labels)["ce"]
        pix, dice = mask_losses(mask, batch["masks"], jnp.ones(batch["masks"].shape, bool), loss_cfg)
        bce, dice = jnp.mean(pix), jnp.mean(dice)
        loss = loss_cfg.ce_weight * ce + loss_cfg.pixel_weight * bce + loss_cfg.dice_weight * dice
        return loss, {"ce_loss": ce, "mask_bce_loss": bce, "mask_dice_loss": dice}

    n, batch = cfg.data.num_examples, cfg.batch_size
    # A NaN is planted in every example of the batch consumed at step s (1-based), epoch-independent.
    nan_idx = frozenset(j for s in cfg.data.nan_steps for j in range((s - 1) * batch, s * batch))

    def dataset(process_index: int, process_count: int):
        ds = grain.MapDataset.range(10**9 if nan_idx else n)
        if not nan_idx:
            ds = ds.seed(cfg.seed).shuffle().repeat(None)
        ds = ds.map(ToyExample(module.width, module.vocab, module.seq, module.mask_hw, cfg.seed, nan_idx))
        ds = ds[process_index::process_count].to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        return ds.batch(batch // process_count, drop_remainder=True)

    spec = lambda b: {"x": ((b, module.width), jnp.float32), "labels": ((b, module.seq), jnp.int32),  # noqa: E731
                      "masks": ((b, 1, module.mask_hw, module.mask_hw), jnp.float32)}

    def eval_dataset(process_index: int, process_count: int):
        """Held-out: examples of seed + 1, the same ones at every evaluation, this process's rows."""
        make = ToyExample(module.width, module.vocab, module.seq, module.mask_hw, cfg.seed + 1, frozenset())
        rows = eval_rows(cfg, 1)
        for b in range(cfg.data.eval_batches):
            items = [make.map(i) for i in range(b * rows + process_index, (b + 1) * rows, process_count)]
            yield {k: np.stack([x[k] for x in items]) for k in items[0]}

    def eval_metrics(params, batch):   # no noise (rng None); batch means weighted by rows
        loss, m = loss_fn(params, batch, None)
        n = jnp.asarray(batch["x"].shape[0], jnp.float32)
        return {k: (v * n, n) for k, v in {"loss": loss, **m}.items()}

    return Task(module, init_variables, loss_fn, trainable=(r"lora_.*", r"head_.*"), dataset=dataset,
                tokens_per_example=module.seq, images_per_example=1, model_name="toy", batch_spec=spec,
                eval_dataset=eval_dataset, eval_metrics=eval_metrics)


TASKS: dict[str, Callable[[ExperimentConfig, Path | None], Task]] = {"toy": toy_task}


def build(cfg: ExperimentConfig, workdir: Path | None = None, plan_only: bool = False) -> Task:
    if cfg.model.task == "calico":
        from calico_jax.train.calico_task import calico_task
        return calico_task(cfg, workdir, plan_only)
    if cfg.model.task not in TASKS:
        raise ValueError(f"model.task {cfg.model.task!r} unknown; known: {sorted([*TASKS, 'calico'])}")
    return TASKS[cfg.model.task](cfg, workdir)
