"""CALICO's Correspondence Adaptation Modules (CAMs), adapted from VPG-C (Cheetah).

At each CAM layer l ∈ L (default {11, 22}, applied to the hidden states T^l *entering* 0-indexed
decoder layer l, prefill only):

* t = T^l[last prompt token]                       (the last token of the input prompt, never an
  answer token, so teacher forcing does not leak the answer)
* q' = q + f_adaptation(t)                         Eq. 7, f_adaptation: Linear D -> D_I, broadcast
                                                   to all S_I queries
* X'_embed = 𝓠(q', X'_global)                      Eq. 8, the *frozen* Q-Former, once per image
* I^l_fused = I^l + f_reintegration(X'_embed)     Eq. 9, f_reintegration: Linear D_I -> D, added
                                                   in place at that image's S_I token positions

Decisions on the paper's UNKNOWNs (table in ``docs/paper_map.md``): both linears are zero-initialised (VPG-C's
``zero_module``), so a fresh CAM leaves the LLM unchanged; each CAM has its own pair of linears;
q is a trainable copy of the Q-Former's queries initialised from them (Cheetah's
``new_query_tokens``), shared by all CAMs by default (``queries="shared"``: Eq. 7 uses one q for
every l). ``"per_cam"`` gives each CAM its own copy; ``"base"`` uses the vision module's q itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError
from calico_jax.models import layers

QUERY_MODES = ("shared", "per_cam", "base")


@dataclasses.dataclass(frozen=True)
class CamConfig(Config):
    layers: tuple[int, ...] = (11, 22)   # () = no CAM (ablation); paper's Fig. 8: (16,), (11, 22), (8, 16, 24)
    queries: str = "shared"
    zero_init: bool = True

    def __post_init__(self):
        if self.queries not in QUERY_MODES:
            raise ConfigError(f"CamConfig: queries must be one of {QUERY_MODES}, got {self.queries!r}")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ConfigError(f"CamConfig: layers must be distinct non-negative indices, got {self.layers}")


class CorrespondenceAdaptation(nn.Module):
    """One CAM's trainable maps: ``f_adaptation`` (D -> D_I) and ``f_reintegration`` (D_I -> D)."""

    llm_width: int
    qformer_width: int
    zero_init: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.initializers.zeros_init() if self.zero_init else layers.torch_linear_init
        self.f_adaptation = layers.dense(self.qformer_width, ("embed", None), name="f_adaptation",
                                         dtype=jnp.float32, kernel_init=init)
        self.f_reintegration = layers.dense(self.llm_width, (None, "embed"), name="f_reintegration",
                                            dtype=self.dtype, kernel_init=init)

    def guided_queries(self, queries: jax.Array, t: jax.Array) -> jax.Array:
        """Eq. 7: q [1 or B, S_I, D_I], t [B, D] -> q' [B, S_I, D_I] (float32, as the Q-Former runs)."""
        return queries.astype(jnp.float32) + self.f_adaptation(t.astype(jnp.float32))[:, None, :]

    def __call__(self, x_embed: jax.Array) -> jax.Array:
        """Eq. 9's increment: X'_embed [..., S_I, D_I] -> f_reintegration(X'_embed) [..., S_I, D]."""
        return self.f_reintegration(x_embed.astype(self.dtype))


def scatter_image_tokens(hidden: jax.Array, update: jax.Array, positions: jax.Array,
                         valid: jax.Array) -> jax.Array:
    """hidden [B, T, D] += update [B, N, S_I, D] at positions [B, N, S_I] for valid [B, N] images."""
    b = hidden.shape[0]
    upd = jnp.where(valid[:, :, None, None], update, 0).astype(hidden.dtype).reshape(b, -1, hidden.shape[-1])
    rows = jnp.arange(b)[:, None]
    return hidden.at[rows, positions.reshape(b, -1)].add(upd, mode="drop")
