"""CALICO's Correspondence Extraction Module (CEM) 𝓐 and its switches.

X'_global = 𝓐(X_global, X_semantic) (paper Eq. 6): a multi-head cross-attention whose queries come
from the EVA-CLIP tokens X_global [S_C, D_C] and whose keys/values come from the frozen DINOv2
tokens X_semantic [S_S, D_S], applied per image; the output keeps X_global's shape. S_S and S_C are
independent (keys/values may have any length: the DINOv2 grid, CLS and registers need not match the
EVA grid).

Everything beyond "cross-attention, queries X_global, keys/values X_semantic" is UNKNOWN in the
paper (see ``docs/paper_map.md``); the defaults are our decisions:

* ``nn.MultiheadAttention(D_C, 16, kdim=vdim=D_S)`` semantics: separate q/k/v/out projections with
  biases (``q_proj``/``k_proj``/``v_proj``/``out_proj``), 16 heads at width 1408 (head dim 88);
* residual: X'_global = X_global + out_proj(attn), with ``out_proj`` zero-initialised so that at
  step 0 X'_global == X_global (the frozen Q-Former sees its usual input distribution);
* no LayerNorm, FFN, positional encoding or dropout (``layer_norm=True`` adds a pre-LN on the
  queries and on the keys/values);
* X_semantic = DINOv2's final ``layernorm`` output with CLS and register tokens kept
  (``dinov2_layer``/``drop_prefix_tokens`` select another layer or drop them).

Ablation switches: ``enabled=False`` (no CEM: X'_global = X_global, DINOv2 not run) and
``use_dinov2=False`` (no DINOv2: the attention reads X_global itself, i.e. self-attention).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError
from calico_jax.models import layers


@dataclasses.dataclass(frozen=True)
class CemConfig(Config):
    enabled: bool = True
    use_dinov2: bool = True
    num_heads: int = 16
    residual: bool = True
    zero_init_output: bool = True
    layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    dinov2_layer: int = -1            # -1: final layernorm output; k >= 0: hidden_states[k] (pre-norm)
    drop_prefix_tokens: bool = False  # drop CLS + register tokens from X_semantic

    def __post_init__(self):
        if self.num_heads < 1:
            raise ConfigError(f"CemConfig: num_heads must be >= 1, got {self.num_heads}")


class CorrespondenceExtraction(nn.Module):
    """𝓐: ``(X_global [B, S_C, D_C], X_semantic [B, S_S, D_S]) -> X'_global [B, S_C, D_C]``."""

    config: CemConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_global: jax.Array, x_semantic: jax.Array) -> jax.Array:
        cfg = self.config
        width = x_global.shape[-1]
        if width % cfg.num_heads:
            raise ConfigError(f"CemConfig: num_heads {cfg.num_heads} does not divide the EVA width {width}")
        q_in, kv_in = x_global.astype(self.dtype), x_semantic.astype(self.dtype)
        if cfg.layer_norm:
            q_in = layers.layer_norm(cfg.layer_norm_eps, name="norm_q", dtype=self.dtype)(q_in)
            kv_in = layers.layer_norm(cfg.layer_norm_eps, name="norm_kv", dtype=self.dtype)(kv_in)

        def proj(name):
            return layers.dense(width, ("embed", "heads"), name=name, dtype=self.dtype)

        q = layers.split_heads(proj("q_proj")(q_in), cfg.num_heads)
        k = layers.split_heads(proj("k_proj")(kv_in), cfg.num_heads)
        v = layers.split_heads(proj("v_proj")(kv_in), cfg.num_heads)
        out = layers.merge_heads(layers.attention(q, k, v))
        init = nn.initializers.zeros_init() if cfg.zero_init_output else layers.torch_linear_init
        out = layers.dense(width, ("heads", "embed"), name="out_proj", dtype=self.dtype, kernel_init=init)(out)
        return x_global.astype(self.dtype) + out if cfg.residual else out


def select_semantic(dino_out: dict[str, Any], cfg: CemConfig, num_prefix: int) -> jax.Array:
    """X_semantic from a :class:`~calico_jax.models.dinov2.Dinov2` output dict (see module docstring)."""
    x = dino_out["last_hidden_state"] if cfg.dinov2_layer < 0 else dino_out["hidden_states"][cfg.dinov2_layer]
    return x[:, num_prefix:] if cfg.drop_prefix_tokens else x
