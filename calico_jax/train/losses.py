"""CALICO's training loss (paper Eqs. 10-11), with GLaMM's normalisation (``model/GLaMM.py``; LISA's is identical).

𝓛 = λ_text·CE + λ_pix·𝓛_pix + λ_dice·𝓛_Dice, defaults 1.0 / 2.0 / 0.5 (GLaMM's ce/bce/dice weights).

* CE: HF causal shift (logits[:, :-1] predict labels[:, 1:]), mean over labels != -100 (prompt and
  image positions carry -100); 0 when a batch has no target.
* Pixel loss per mask: mean over the mask's valid pixels of sigmoid BCE (GLaMM, default) or of the
  sigmoid focal loss (the paper cites Lin et al.; α, γ configurable, torchvision's formula).
* Dice per mask: ``1 - (2·Σ(σ(x)/1000·g) + 1e-6) / (Σσ(x)/1000 + Σg/1000 + 1e-6)`` over valid pixels
  (the 1/1000 scale changes the effective smoothing; kept).
* Both mask terms: sum over the valid masks of the whole batch / (N + 1e-8), N = their count. GLaMM
  divides each sample's sum by (n_b + 1e-8) and multiplies it back by n_b; equal up to the 1e-8.

Masks come at a padded static size: ``pixel_hw`` [.., 2] (the original H, W) marks the valid top-left
region; ``mask_valid`` marks which [SEG] slots carry a prediction *and* a ground-truth mask.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError
from calico_jax.core.tokens import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class LossConfig(Config):
    ce_weight: float = 1.0
    pixel_weight: float = 2.0      # λ_focal / GLaMM's bce_loss_weight
    dice_weight: float = 0.5
    pixel_loss: str = "bce"        # "bce" (GLaMM) | "focal" (paper)
    focal_alpha: float = 0.25      # < 0 disables the α weighting (torchvision convention)
    focal_gamma: float = 2.0
    dice_scale: float = 1000.0
    dice_eps: float = 1e-6

    def __post_init__(self):
        if self.pixel_loss not in ("bce", "focal"):
            raise ConfigError(f"LossConfig: pixel_loss must be 'bce' or 'focal', got {self.pixel_loss!r}")


def next_token_targets(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, T] labels -> (targets, valid) [B, T]: position t predicts ``labels[t + 1]`` (the HF causal shift without
    slicing: the last position has no target); ignored targets are 0 with ``valid`` False."""
    nxt = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    valid = nxt != IGNORE_INDEX
    return jnp.where(valid, nxt, 0), valid


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """logits [B, T, V], labels [B, T] (unshifted) -> ce (mean), num_tokens, num_correct."""
    logits = logits.astype(jnp.float32)
    targets, valid = next_token_targets(labels)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    n = jnp.sum(valid)
    correct = jnp.sum(valid & (jnp.argmax(logits, -1) == targets))
    return {"ce": jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(n, 1), "num_tokens": n, "num_correct": correct}


@jax.custom_vjp
def _linear_ce(hidden, kernel, targets, weights):
    return _linear_ce_fwd(hidden, kernel, targets, weights)[0]


def _linear_ce_fwd(hidden, kernel, targets, weights):
    logits = jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)   # [N, V]
    m = jnp.max(logits, axis=-1, keepdims=True)
    lse = m[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1))
    nll = lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    hits = (jnp.argmax(logits, axis=-1) == targets) & (weights > 0)
    return (jnp.sum(weights * nll), jnp.sum(hits).astype(jnp.float32)), (hidden, kernel, logits, lse, targets, weights)


def _linear_ce_bwd(res, cotangents):
    hidden, kernel, logits, lse, targets, weights = res
    g = cotangents[0]
    d = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    d = (d * (weights * g)[:, None]).astype(hidden.dtype)
    d_hidden = jax.lax.dot_general(d, kernel.astype(hidden.dtype), (((1,), (1,)), ((), ())))
    d_kernel = jax.lax.dot_general(hidden, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return d_hidden, d_kernel.astype(kernel.dtype), None, None


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)


def causal_lm_loss_from_hidden(hidden: jax.Array, kernel: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """:func:`causal_lm_loss` of ``logits = hidden @ kernel`` (hidden [B, T, H], kernel [H, V], labels [B, T]),
    the output projection and the loss in one differentiable step with a written-out backward
    (``softmax - onehot`` straight into the two weight/input GEMMs). Autodiff of the sliced logits instead
    pads the logits gradient back to [B, T, V] and feeds the kernel gradient from a transposed copy of it: on
    the bench's training step (134 M LLaMA, 2 x 256 tokens, XLA:CPU) this form is ~7 % faster
    (bench/results/train_step_opt.md). Logits are accumulated in fp32 whatever the compute dtype."""
    targets, valid = next_token_targets(labels)
    n = jnp.sum(valid)
    weights = valid.astype(jnp.float32) / jnp.maximum(n, 1)
    ce, hits = _linear_ce(hidden.reshape(-1, hidden.shape[-1]), kernel, targets.reshape(-1), weights.reshape(-1))
    return {"ce": ce, "num_tokens": n, "num_correct": hits.astype(jnp.int32)}


def pixel_mask(hw: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[..., 2] valid (H, W) -> [..., H_pad, W_pad] bool, True in the top-left H x W region."""
    hw = jnp.asarray(hw)
    rows = jnp.arange(size[0]) < hw[..., 0, None]
    cols = jnp.arange(size[1]) < hw[..., 1, None]
    return rows[..., :, None] & cols[..., None, :]


def sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise ``BCEWithLogits`` (stable form)."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def sigmoid_focal(logits: jax.Array, targets: jax.Array, alpha: float, gamma: float) -> jax.Array:
    """Elementwise torchvision ``sigmoid_focal_loss`` (reduction none)."""
    p = jax.nn.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = sigmoid_bce(logits, targets) * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def mask_losses(logits: jax.Array, targets: jax.Array, valid_pixels: jax.Array,
                cfg: LossConfig = LossConfig()) -> tuple[jax.Array, jax.Array]:
    """Per-mask (pixel loss, dice) over [..., H, W] with a validity map; each [...]."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    vp = valid_pixels.astype(jnp.float32)
    if cfg.pixel_loss == "bce":
        pix = sigmoid_bce(logits, targets)
    else:
        pix = sigmoid_focal(logits, targets, cfg.focal_alpha, cfg.focal_gamma)
    pix = jnp.sum(pix * vp, axis=(-2, -1)) / jnp.maximum(jnp.sum(vp, axis=(-2, -1)), 1.0)
    p = jax.nn.sigmoid(logits) / cfg.dice_scale * vp
    g = targets / cfg.dice_scale * vp
    num = 2 * jnp.sum(p * targets, axis=(-2, -1)) + cfg.dice_eps
    den = jnp.sum(p, axis=(-2, -1)) + jnp.sum(g, axis=(-2, -1)) + cfg.dice_eps
    return pix, 1 - num / den


def calico_loss(outputs: Mapping[str, Any], gt_masks: jax.Array, gt_valid: jax.Array | None = None,
                cfg: LossConfig = LossConfig(),
                lm_head: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its parts from :class:`~calico_jax.models.calico.Calico` outputs.

    ``gt_masks`` [B, M, H_pad, W_pad] in {0, 1}, one per [SEG] slot in order; ``gt_valid`` [B, M]
    marks slots with a ground-truth mask (default: all). Uses ``outputs["labels"]`` (the expanded
    labels), ``mask_logits``, ``mask_hw`` and ``seg_valid``. With ``lm_head`` (the LLM's output kernel
    [H, V]) the CE comes from ``outputs["hidden_states"]`` through :func:`causal_lm_loss_from_hidden` (the
    same value; under jit the model's own logits are then never computed), else from ``outputs["logits"]``.
    """
    text = (causal_lm_loss(outputs["logits"], outputs["labels"]) if lm_head is None
            else causal_lm_loss_from_hidden(outputs["hidden_states"], lm_head, outputs["labels"]))
    valid = outputs["seg_valid"] if gt_valid is None else outputs["seg_valid"] & gt_valid.astype(bool)
    pixels = pixel_mask(outputs["mask_hw"], gt_masks.shape[-2:])
    pix, dice = mask_losses(outputs["mask_logits"], gt_masks, pixels, cfg)
    n = jnp.sum(valid)
    pix = jnp.sum(jnp.where(valid, pix, 0.0)) / (n + 1e-8)
    dice = jnp.sum(jnp.where(valid, dice, 0.0)) / (n + 1e-8)
    total = cfg.ce_weight * text["ce"] + cfg.pixel_weight * pix + cfg.dice_weight * dice
    parts = {"loss": total, "ce": text["ce"], "pixel": pix, "dice": dice, "num_masks": n,
             "num_tokens": text["num_tokens"],
             "token_accuracy": text["num_correct"] / jnp.maximum(text["num_tokens"], 1)}
    return total, parts
