"""SAM's TwoWayTransformer: prompt tokens and image tokens attend to each other in both directions."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.models import layers
from calico_jax.models.sam.common import MLPBlock, repeat_per_prompt
from calico_jax.models.sam.config import TwoWayTransformerConfig


def _block_diagonal(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, H*D] -> [B, H*D, H*T]: column (h, t) holds x[t, h, :] in rows (h, :), zeros elsewhere, so that
    one GEMM against a token-major [B, L, H*D] operand gives every head's products with the T tokens."""
    b, t, hd = x.shape
    x = x.reshape(b, t, num_heads, hd // num_heads)
    eye = jnp.eye(num_heads, dtype=x.dtype)
    return jnp.einsum("bthd,hg->bhdgt", x, eye).reshape(b, hd, num_heads * t)


def _attend_few_keys(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
    """Many queries [B, L, H*D] over a few keys [B, T, H*D] (image -> token): the large side is read
    token-major, as it lies, by plain GEMMs against block-diagonal copies of the small side."""
    b, length, hd = q.shape
    t = k.shape[1]
    scale = jnp.asarray((hd // num_heads) ** -0.5, q.dtype)
    logits = jnp.matmul(q * scale, _block_diagonal(k, num_heads), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits.reshape(b, length, num_heads, t), axis=-1).astype(v.dtype)
    return probs.reshape(b, length, num_heads * t) @ jnp.swapaxes(_block_diagonal(v, num_heads), 1, 2)


def _attend_few_queries(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
    """A few queries [B, T, H*D] over many keys [B, L, H*D] (token -> image), the same way: the
    [H*T, H*D] products of every head's weights with every head's values are formed (the small side's
    H-fold redundancy) and the diagonal head blocks kept."""
    b, t, hd = q.shape
    d = hd // num_heads
    scale = jnp.asarray(d ** -0.5, q.dtype)
    logits = jnp.matmul(k, _block_diagonal(q * scale, num_heads), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=1).astype(v.dtype)                       # [B, L, H*T] over L
    full = jnp.einsum("blm,bld->bmd", probs, v).reshape(b, num_heads, t, num_heads, d)
    return jnp.swapaxes(jnp.diagonal(full, axis1=1, axis2=3), 2, 3).reshape(b, t, hd)


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, few: int = 256) -> jax.Array:
    """softmax(QKᵀ/√d)V per head on token-major [B, T, H*D] inputs -> [B, Tq, H*D].

    Between a handful of prompt tokens and thousands of image tokens (H * T_small <= ``few`` and the
    other side at least 4x longer) the products run as GEMMs on the token-major large side. The
    head-major form (:func:`calico_jax.models.layers.attention`) transposes the large side first, which took
    ~40 % of these attentions' time on XLA:CPU (bench/results/sam_opt.md). Equal up to fp32 rounding.
    """
    tq, tk = q.shape[1], k.shape[1]
    if num_heads * tk <= few and tq >= 4 * tk:
        return _attend_few_keys(q, k, v, num_heads)
    if num_heads * tq <= few and tk >= 4 * tq:
        return _attend_few_queries(q, k, v, num_heads)
    heads = [layers.split_heads(x, num_heads) for x in (q, k, v)]
    return layers.merge_heads(layers.attention(*heads))


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
            return layers.dense(internal, ("embed", "heads"), name=name, dtype=self.dtype)(x)

        q, k, v = proj(q, "q_proj"), proj(k, "k_proj"), proj(v, "v_proj")
        b = q.shape[0]
        if k.shape[0] != b:   # keys per image, queries per prompt: each image's prompts attend together
            q = q.reshape(k.shape[0], -1, internal)
        out = cross_attention(q, k, v, self.num_heads).reshape(b, -1, internal)
        return layers.dense(self.embedding_dim, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out)


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
