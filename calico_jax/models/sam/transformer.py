"""SAM's TwoWayTransformer: prompt tokens and image tokens attend to each other in both directions."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax import layers
from calico_jax.models.sam.common import MLPBlock, repeat_per_prompt
from calico_jax.models.sam.config import TwoWayTransformerConfig


class Attention(nn.Module):
    """q/k/v projections to ``embedding_dim // downsample_rate``, softmax(QKᵀ/√d_head)V, out_proj back."""

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        internal = self.embedding_dim // self.downsample_rate

        def proj(x, name):
            x = layers.dense(internal, ("embed", "heads"), name=name, dtype=self.dtype)(x)
            return layers.split_heads(x, self.num_heads)

        q, k, v = proj(q, "q_proj"), proj(k, "k_proj"), proj(v, "v_proj")
        b = q.shape[0]
        if k.shape[0] != b:   # keys per image, queries per prompt: each image's prompts attend together
            q = q.reshape(k.shape[0], -1, *q.shape[2:])
        out = layers.attention(q, k, v).reshape(b, -1, self.num_heads, internal // self.num_heads)
        return layers.dense(self.embedding_dim, ("heads", "embed"), name="out_proj",
                            dtype=self.dtype)(layers.merge_heads(out))


def _per_prompt(x: jax.Array, batch: int) -> jax.Array:
    """An image-side tensor at the prompt batch (batch 1 stays for broadcasting)."""
    return x if x.shape[0] == 1 else repeat_per_prompt(x, batch)


class TwoWayAttentionBlock(nn.Module):
    """(1) token self-attn, (2) token->image cross-attn, (3) token MLP, (4) image->token cross-attn; post-LN."""

    config: TwoWayTransformerConfig
    skip_first_layer_pe: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array,
                 key_pe: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        c, n, r = cfg.embedding_dim, cfg.num_heads, cfg.attention_downsample_rate

        def norm(name):
            return layers.layer_norm(cfg.norm_eps, name=name, dtype=self.dtype)

        self_attn = Attention(c, n, 1, dtype=self.dtype, name="self_attn")
        if self.skip_first_layer_pe:  # first layer: the tokens *are* their PE; no residual either
            queries = self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries)
        queries = norm("norm1")(queries)

        # keys may still be per image (the first layer): their projections then run once per image
        q, k = queries + query_pe, keys + _per_prompt(key_pe, keys.shape[0])
        queries = queries + Attention(c, n, r, dtype=self.dtype, name="cross_attn_token_to_image")(q, k, keys)
        queries = norm("norm2")(queries)

        queries = queries + MLPBlock(cfg.mlp_dim, cfg.act, dtype=self.dtype, name="mlp")(queries)
        queries = norm("norm3")(queries)

        b = queries.shape[0]
        keys = repeat_per_prompt(keys, b)   # from here on the image side depends on the prompt
        q, k = queries + query_pe, keys + _per_prompt(key_pe, b)
        keys = keys + Attention(c, n, r, dtype=self.dtype, name="cross_attn_image_to_token")(k, q, queries)
        keys = norm("norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """image_embedding [B or B_img, h, w, C] with image_pe [1 or B_img, h, w, C]; point_embedding (tokens)
    [B, N, C], B a multiple of B_img (each image's prompts contiguous) -> (queries [B, N, C], keys [B, h*w, C]).
    Image-side inputs given per image are projected once per image in the first token->image attention."""

    config: TwoWayTransformerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
                 point_embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
        queries = point_embedding
        for i in range(cfg.depth):
            queries, keys = TwoWayAttentionBlock(cfg, skip_first_layer_pe=i == 0, dtype=self.dtype,
                                                 name=f"layers_{i}")(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + _per_prompt(key_pe, keys.shape[0])
        attn = Attention(c, cfg.num_heads, cfg.attention_downsample_rate, dtype=self.dtype,
                         name="final_attn_token_to_image")(q, k, keys)
        queries = layers.layer_norm(cfg.final_norm_eps, name="norm_final_attn", dtype=self.dtype)(queries + attn)
        return queries, keys
