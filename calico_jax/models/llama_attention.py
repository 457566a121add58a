"""The functional core of LLaMA attention: RoPE (HF's rotate_half form) and grouped-query attention with a
written-out backward. :class:`~calico_jax.models.llama.LlamaAttention` holds the projections and calls these."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def rope_tables(config: Any, positions: jax.Array, dtype: Any, rows: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, D] as HF computes them: fp32 ``pos * inv_freq`` duplicated over both halves.

    ``rows``: a static bound, every position < rows. The tables are then computed once for 0..rows-1 and
    gathered. Computed directly, XLA:CPU fuses cos/sin into every consumer and evaluates them again for each
    head of q and k in every layer (15 % of the bench's 134M prefill)."""
    if rows is not None:
        cos, sin = rope_tables(config, jnp.arange(rows), dtype)
        return jnp.take(cos, positions, axis=0, mode="clip"), jnp.take(sin, positions, axis=0, mode="clip")
    d = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    inv_freq = (inv_freq / np.float32(config.rope_linear_factor)).astype(np.float32)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]; ``x*cos + rotate_half(x)*sin`` with rotate_half(x) = (-x2, x1)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


@jax.custom_vjp
def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,K,Q,D] (pre-scaled), k/v [B,K,S,D], mask [B,1,Q,S] -> [B,K,Q,D], softmax in fp32."""
    return _causal_attention_fwd(q, k, v, mask)[0]


def _causal_attention_fwd(q, k, v, mask):
    logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _causal_attention_bwd(res, d_out):
    # FlashAttention's form: d_logits = P * (dP - rowsum(dO * O)); the row sum runs over D, not over S.
    q, k, v, probs, out = res
    d_v = jnp.einsum("bkqs,bkqd->bksd", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bkqd,bksd->bkqs", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = (probs * (d_probs - row)).astype(q.dtype)
    d_q = jnp.einsum("bkqs,bksd->bkqd", d_logits, k)
    d_k = jnp.einsum("bkqs,bkqd->bksd", d_logits, q)
    return d_q, d_k, d_v, None


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                      cache_layout: bool = False) -> jax.Array:
    """q [B,T,H,D], k/v [B,S,KV,D] (``cache_layout``: k [B*KV,S,D], v [B*KV,D,S] as
    :class:`~calico_jax.models.llama.KVCache` stores them), mask [B,T,S] (True = attend) -> [B,T,H*D]; softmax
    in fp32.

    Query head h reads k/v head h // (H/KV), as HF's ``repeat_kv``, without materialising the repeat.
    The products run head-major: per (batch, k/v head) one [G*T, D] x [D, S] and one [G*T, S] x [S, D]
    GEMM over the G query heads sharing it. Without a cache (training, plain forward) the backward is
    written out (:func:`_causal_attention`). Against autodiff of the token-major einsums (``btkgd,bskd``)
    the two cut a decoder layer's forward + backward on XLA:CPU by ~20 % (bench/results/train_step_opt.md).
    """
    b, t, h, d = q.shape
    kv = k.shape[0] // b if cache_layout else k.shape[2]
    g = h // kv
    q = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b, kv, g * t, d)
    if not cache_layout:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, KV, S, D]
        grouped_mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, mask.shape[-1])).reshape(b, 1, g * t, -1)
        out = _causal_attention(q, k, v, grouped_mask)
    else:
        k, v = k.reshape(b, kv, *k.shape[1:]), v.reshape(b, kv, *v.shape[1:])
        logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32).reshape(b, kv, g, t, -1)
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
        out = jnp.einsum("bkqs,bkds->bkqd", probs, v)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)
