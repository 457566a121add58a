"""The stand-in task the train tests use (seconds on CPU): a frozen "tower" and trainable heads with CE + mask
losses, registered as task ``toy``; its experiment config type (:class:`ToyExperiment`) has a :class:`ToyConfig`
model section and a data section with the toy's fields. ``tests/toy_config.py`` is the config file."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.core.config import Config
from calico_jax.data.pipeline import shard
from calico_jax.models import layers
from calico_jax.train.config import DataConfig, ExperimentConfig
from calico_jax.train.losses import LossConfig, causal_lm_loss, mask_losses
from calico_jax.train.task import Task, eval_rows
from calico_jax.train.tasks import register


@dataclasses.dataclass(frozen=True)
class ToyConfig(Config):
    vocab: int = 16
    width: int = 32
    hidden: int = 64
    mask_hw: int = 8
    seq: int = 8
    noise: bool = True
    trainable: tuple[str, ...] = (r"lora_.*", r"head_.*")


@dataclasses.dataclass(frozen=True)
class ToyData(DataConfig):
    num_examples: int = 64                # examples per epoch
    nan_steps: tuple[int, ...] = ()       # steps whose batch holds a NaN (robustness tests)


@dataclasses.dataclass(frozen=True)
class ToyExperiment(ExperimentConfig):
    task: str = "toy"
    model: ToyConfig = ToyConfig()
    data: ToyData = ToyData()


class Toy(nn.Module):
    """Frozen "tower" (embed -> mlp) + trainable heads: token logits [T, V] and mask logits [H, W].
    Parameter names mimic the real split: ``tower`` frozen, ``head``/``lora_*`` trainable."""

    config: ToyConfig = ToyConfig()

    @nn.compact
    def __call__(self, x, rng=None):
        c = self.config
        x = nn.with_logical_constraint(x, ("batch", "embed"))
        h = jax.nn.gelu(layers.dense(c.hidden, ("embed", "mlp"), name="tower_up")(x), approximate=False)
        a = self.param("lora_a", layers.param_init(nn.initializers.normal(0.02), ("mlp", None)), (c.hidden, 4))
        b = self.param("lora_b", layers.param_init(nn.initializers.zeros, (None, "embed")), (4, c.width))
        h2 = layers.dense(c.width, ("mlp", "embed"), name="tower_down")(h) + (h @ a) @ b
        if rng is not None and c.noise:   # dropout-like noise, so the RNG state matters for exact resume
            h2 = h2 * jax.random.bernoulli(rng, 0.9, h2.shape) / 0.9
        tok = layers.dense(c.seq * c.vocab, ("embed", "vocab"), name="head_text")(h2)
        mask = layers.dense(c.mask_hw * c.mask_hw, ("embed", None), name="head_mask")(h2)
        return tok.reshape(-1, c.seq, c.vocab), mask.reshape(-1, 1, c.mask_hw, c.mask_hw)


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


class ToyTask(Task):
    def __init__(self, cfg, workdir=None, plan_only: bool = False):
        super().__init__(cfg, workdir, plan_only)
        m = cfg.model
        self.module = Toy(m)
        self.trainable, self.tokens_per_example, self.images_per_example = tuple(m.trainable), m.seq, 1
        self.dtype, self.loss_cfg = jnp.dtype(cfg.dtype), LossConfig()
        batch = cfg.batch_size
        # A NaN is planted in every example of the batch consumed at step s (1-based), epoch-independent.
        self.nan_idx = frozenset(j for s in cfg.data.nan_steps for j in range((s - 1) * batch, s * batch))

    def init_variables(self, rng):
        return self.module.init(rng, jnp.zeros((1, self.cfg.model.width), self.dtype))

    def loss_fn(self, params, batch, rng):
        tok, mask = self.module.apply({"params": params}, batch["x"].astype(self.dtype), rng)
        # causal_lm_loss shifts by one (logits[:, :-1] vs labels[:, 1:]): pad both so tok[t] scores labels[t].
        logits = jnp.concatenate([tok, tok[:, -1:]], axis=1)
        labels = jnp.concatenate([jnp.full_like(batch["labels"][:, :1], -100), batch["labels"]], axis=1)
        ce = causal_lm_loss(logits, labels)["ce"]
        pix, dice = mask_losses(mask, batch["masks"], jnp.ones(batch["masks"].shape, bool), self.loss_cfg)
        bce, dice = jnp.mean(pix), jnp.mean(dice)
        c = self.loss_cfg
        loss = c.ce_weight * ce + c.pixel_weight * bce + c.dice_weight * dice
        return loss, {"ce_loss": ce, "mask_bce_loss": bce, "mask_dice_loss": dice}

    def _example(self, seed, nan):
        m = self.cfg.model
        return ToyExample(m.width, m.vocab, m.seq, m.mask_hw, seed, nan)

    def dataset(self, process_index: int, process_count: int):
        cfg = self.cfg
        ds = grain.MapDataset.range(10**9 if self.nan_idx else cfg.data.num_examples)
        if not self.nan_idx:
            ds = ds.seed(cfg.seed).shuffle().repeat(None)
        ds = ds.map(self._example(cfg.seed, self.nan_idx))
        block = cfg.batch_size // cfg.optim.grad_accum // process_count   # this process's rows of a micro-batch
        ds = shard(ds, process_index, process_count, block)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        return ds.batch(cfg.batch_size // process_count, drop_remainder=True)

    def batch_spec(self, rows: int) -> dict:
        m = self.cfg.model
        return {"x": ((rows, m.width), jnp.float32), "labels": ((rows, m.seq), jnp.int32),
                "masks": ((rows, 1, m.mask_hw, m.mask_hw), jnp.float32)}

    @property
    def has_eval(self) -> bool:
        return True

    def eval_dataset(self, process_index: int, process_count: int):
        """Held-out: examples of seed + 1, the same ones at every evaluation, this process's block of rows."""
        make, rows = self._example(self.cfg.seed + 1, frozenset()), eval_rows(self.cfg, process_count)
        for b in range(self.cfg.data.eval_batches):
            first = (b * process_count + process_index) * rows
            items = [make.map(i) for i in range(first, first + rows)]
            yield {k: np.stack([x[k] for x in items]) for k in items[0]}

    def eval_metrics(self, params, batch):   # no noise (rng None); batch means weighted by rows
        loss, m = self.loss_fn(params, batch, None)
        n = jnp.asarray(batch["x"].shape[0], jnp.float32)
        return {k: (v * n, n) for k, v in {"loss": loss, **m}.items()}


register("toy", ToyTask)
