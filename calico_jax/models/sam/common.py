"""Pieces shared by SAM's encoder and decoder: MLPBlock, the IoU / hypernetwork MLP, LayerNorm2d, Embedding."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.models import layers


class MLPBlock(nn.Module):
    """``common.MLPBlock``: lin2(act(lin1(x)))."""

    hidden: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(self.hidden, ("embed", "mlp"), name="lin1", dtype=self.dtype)(x)
        h = layers.activation(self.act)(h)
        return layers.dense(x.shape[-1], ("mlp", "embed"), name="lin2", dtype=self.dtype)(h)


class MLP(nn.Module):
    """``mask_decoder.MLP``: ``num_layers`` Linear layers with ReLU between them (no sigmoid in SAM)."""

    hidden: int
    out: int
    num_layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = layers.dense(self.out if last else self.hidden, ("embed", "mlp"), name=f"layers_{i}",
                             dtype=self.dtype)(x)
            x = x if last else jax.nn.relu(x)
        return x


def layer_norm_2d(eps: float, *, name: str, dtype: Any = jnp.float32) -> nn.LayerNorm:
    """``common.LayerNorm2d`` (normalises over channels of NCHW) == LayerNorm over the last axis of NHWC."""
    return layers.layer_norm(eps, name=name, dtype=dtype)


def embedding(num: int, features: int, *, name: str | None = None) -> nn.Embed:
    """``nn.Embedding(num, features)`` used as a learned token table (torch init N(0, 1))."""
    kwargs = {} if name is None else {"name": name}
    return nn.Embed(num, features, embedding_init=layers.param_init(nn.initializers.normal(1.0), (None, "embed")),
                    **kwargs)


def repeat_per_prompt(x: jax.Array, batch: int) -> jax.Array:
    """``repeat_interleave`` of per-image tensors to the prompt batch (each image's prompts contiguous)."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"prompt batch {batch} is not a multiple of the image batch {x.shape[0]}")
    return jnp.repeat(x, batch // x.shape[0], axis=0)
