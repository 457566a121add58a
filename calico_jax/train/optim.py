"""Optimizer: AdamW (β 0.9/0.95) + linear warmup and linear/cosine decay + global-norm clipping.

The transformation is built for the *trainable* subtree only (see :mod:`calico_jax.core.params`):
frozen leaves never reach it, so they get no optimizer state and no update, and stay bit-identical.
Gradient accumulation never reaches the optimizer either: the step runs a host loop over one compiled
micro-step (gradients summed in a donated buffer), then one compiled update that applies this
transformation once (:class:`calico_jax.train.step.CompiledStep`). So one optimizer update is one
training step, and the schedule counts steps, not micro-batches.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from calico_jax.train.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(step): 0 -> peak over ``warmup_steps``, then to ``peak * end_lr_ratio`` at ``total_steps``."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    warm = max(int(cfg.warmup_steps), 0)
    decay_steps = max(int(total_steps) - warm, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    # Step 0 gets peak/warm rather than 0, so the first update is not wasted.
    return optax.join_schedules([optax.linear_schedule(peak / warm, peak, warm - 1) if warm > 1
                                 else optax.constant_schedule(peak), after], [warm])


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (kernels, embeddings), not on biases, norms or scalars."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """-> (tx for the trainable subtree, lr schedule)."""
    lr = schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), lr


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                    replicated: Any) -> Any:
    """Sharding tree of ``tx.init(params)``: moments like their params, counters replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_shardings,
                                 transform_non_params=lambda _: replicated)
