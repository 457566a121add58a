"""SAM image encoder 𝓖 (``ImageEncoderViT``): ViTDet backbone with windowed + global attention,
decomposed relative positions and a conv neck. Inputs and outputs are NHWC."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.core.resize import interp_matrix
from calico_jax.models import layers
from calico_jax.models.sam.common import MLPBlock, layer_norm_2d
from calico_jax.models.sam.config import ImageEncoderConfig


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """``image_encoder.get_rel_pos``: table rows for every (query, key) offset -> [q_size, k_size, C].

    A table whose length is not 2*max(q,k)-1 is first resized like ``F.interpolate(mode="linear")``.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        m = jnp.asarray(interp_matrix(rel_pos.shape[0], max_rel_dist, "bilinear"), jnp.float32)
        rel_pos = jnp.matmul(m, rel_pos.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST).astype(rel_pos.dtype)
    # torch builds these coordinates in float32 and truncates them with .long(); mirror that exactly.
    f = np.float32
    q_coords = np.arange(q_size, dtype=f)[:, None] * f(max(k_size / q_size, 1.0))
    k_coords = np.arange(k_size, dtype=f)[None, :] * f(max(q_size / k_size, 1.0))
    rel = (q_coords - k_coords) + f(k_size - 1) * f(max(q_size / k_size, 1.0))
    return rel_pos[rel.astype(np.int64)]


def _rel_terms(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, q_size: tuple[int, int],
               k_size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """The two factors of the decomposed bias: q·Rh [B, heads, q_h, q_w, k_h] and q·Rw [B, heads, q_h, q_w, k_w]."""
    (qh, qw), (kh, kw) = q_size, k_size
    rh = get_rel_pos(qh, kh, rel_pos_h)
    rw = get_rel_pos(qw, kw, rel_pos_w)
    b, _, n, d = q.shape
    r_q = q.reshape(b, qh, qw, n, d)
    hp = jax.lax.Precision.HIGHEST
    rel_h = jnp.einsum("byxnd,ykd->bnyxk", r_q, rh, precision=hp, preferred_element_type=jnp.float32)
    rel_w = jnp.einsum("byxnd,xkd->bnyxk", r_q, rw, precision=hp, preferred_element_type=jnp.float32)
    return rel_h, rel_w


def decomposed_rel_pos(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, q_size: tuple[int, int],
                       k_size: tuple[int, int]) -> jax.Array:
    """``add_decomposed_rel_pos`` as an additive logit bias [B, heads, q_h*q_w, k_h*k_w] (MViTv2).

    ``q`` is the *unscaled* query [B, q_h*q_w, heads, D]: bias[(y,x),(ky,kx)] = q·Rh[y,ky] + q·Rw[x,kx].
    """
    (qh, qw), (kh, kw) = q_size, k_size
    rel_h, rel_w = _rel_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    b, n = rel_h.shape[:2]
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, qh * qw, kh * kw)


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def blocked_rel_pos_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_pos_h: jax.Array,
                              rel_pos_w: jax.Array, q_size: tuple[int, int], k_size: tuple[int, int], *,
                              scale: float, block_bytes: int) -> jax.Array:
    """Softmax attention with the decomposed relative-position bias, [B, T, heads, D] in and out.

    Same maths as :func:`decomposed_rel_pos` + ``layers.attention``, but the bias is never
    materialised: logits are built one tile (some heads x some queries x all keys, for every example of the
    batch, at most ``block_bytes`` of float32 when the whole batch is on one device) at a time, the two factors
    broadcast-added in place, and the softmax normalised after the value product. On CPU the dense
    [B*heads, T, T] logits/bias/probabilities are fresh multi-GB buffers whose page faults cost more than the
    exps; tiles stay in cache. The tile loop runs over head groups and query chunks only, with the batch a
    leading axis every tile keeps whole: with the batch sharded, slicing it inside the loop made XLA gather the
    tiles of every device (an all-gather per tile).
    """
    _, (kh, kw) = q_size, k_size
    b, tq, n, d = q.shape
    tk = k.shape[1]
    rel_h, rel_w = _rel_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    row_bytes = b * tk * 4  # one query of one head's float32 logits, over the batch
    c = _largest_divisor(tq, block_bytes // row_bytes)  # queries per tile
    g = _largest_divisor(n, block_bytes // (row_bytes * c)) if c == tq else 1  # heads per tile

    def tiles(x: jax.Array) -> jax.Array:  # [B, heads, tq, F] -> [head groups, chunks, B, g, c, F]
        return x.reshape(b, n // g, g, tq // c, c, x.shape[-1]).transpose(1, 3, 0, 2, 4, 5)

    def heads_first(x: jax.Array) -> jax.Array:  # [B, T, heads, F] -> [B, heads, T, F]
        return x.transpose(0, 2, 1, 3)

    def groups_first(x: jax.Array) -> jax.Array:  # [B, T, heads, F] -> [head groups, B, g, T, F]
        return heads_first(x).reshape(b, n // g, g, *x.shape[1:2], x.shape[-1]).transpose(1, 0, 2, 3, 4)

    qs = tiles(heads_first(q * jnp.asarray(scale, q.dtype)))
    rhs, rws = tiles(rel_h.reshape(b, n, tq, kh)), tiles(rel_w.reshape(b, n, tq, kw))
    ks, vs = groups_first(k), groups_first(v)

    def tile(qt, rht, rwt, kt, vt):   # qt [B, g, c, D], kt / vt [B, g, tk, D]
        logits = jnp.einsum("bgqd,bgkd->bgqk", qt, kt, preferred_element_type=jnp.float32)
        logits = logits.reshape(b, g, c, kh, kw) + rht[..., :, None] + rwt[..., None, :]
        logits = logits.reshape(b, g, c, tk)
        p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        out = jnp.einsum("bgqk,bgkd->bgqd", p.astype(v.dtype), vt, preferred_element_type=jnp.float32)
        return (out / p.sum(-1, keepdims=True)).astype(v.dtype)

    def group(args):
        qg, rhg, rwg, kg, vg = args
        return jax.lax.map(lambda a: tile(*a, kg, vg), (qg, rhg, rwg))

    out = jax.lax.map(group, (qs, rhs, rws, ks, vs))  # [head groups, chunks, B, g, c, D]
    return out.transpose(2, 0, 3, 1, 4, 5).reshape(b, n, tq, d).transpose(0, 2, 1, 3)


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """[B, H, W, C] -> [B * nWindows, window, window, C], zero-padding bottom/right to a multiple of ``window``."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`window_partition`, cropping the padding away."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :h, :w, :]


class Attention(nn.Module):
    """Multi-head self-attention over a [B, H, W, C] grid with decomposed relative positions."""

    config: ImageEncoderConfig
    input_size: tuple[int, int]  # sizes the rel-pos tables: the window, or the full grid for global blocks
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, h, w, c = x.shape
        head_dim = c // cfg.num_heads
        qkv = layers.dense(3 * c, ("embed", "heads"), name="qkv", use_bias=cfg.qkv_bias, dtype=self.dtype)(x)
        qkv = qkv.reshape(b, h * w, 3, cfg.num_heads, head_dim)  # torch order: q|k|v, then heads
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scale = head_dim ** -0.5
        if cfg.use_rel_pos:
            init = layers.param_init(nn.initializers.zeros_init(), (None, None))
            rel_pos_h = self.param("rel_pos_h", init, (2 * self.input_size[0] - 1, head_dim))
            rel_pos_w = self.param("rel_pos_w", init, (2 * self.input_size[1] - 1, head_dim))
        if cfg.use_rel_pos and cfg.rel_pos_attention == "blocked":
            out = blocked_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, (h, w), (h, w), scale=scale,
                                            block_bytes=cfg.attention_block_bytes)
        else:
            bias = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, (h, w), (h, w)) if cfg.use_rel_pos else None
            out = layers.attention(q, k, v, scale=scale, bias=bias)
        return layers.dense(c, ("heads", "embed"), name="proj", dtype=self.dtype)(out.reshape(b, h, w, c))


class Block(nn.Module):
    """Pre-LN ViT block; windowed blocks pad *after* norm1, so padded zeros join border windows' attention."""

    config: ImageEncoderConfig
    window_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        ws = self.window_size
        shortcut = x
        x = layers.layer_norm(cfg.norm_eps, name="norm1", dtype=self.dtype)(x)
        h, w = x.shape[1:3]
        if ws > 0:
            x, pad_hw = window_partition(x, ws)
        input_size = (ws, ws) if ws > 0 else (cfg.grid, cfg.grid)
        x = Attention(cfg, input_size, dtype=self.dtype, name="attn")(x)
        if ws > 0:
            x = window_unpartition(x, ws, pad_hw, (h, w))
        x = shortcut + x
        y = layers.layer_norm(cfg.norm_eps, name="norm2", dtype=self.dtype)(x)
        return x + MLPBlock(cfg.hidden_dim, cfg.act, dtype=self.dtype, name="mlp")(y)


class PatchEmbed(nn.Module):
    embed_dim: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.conv(self.embed_dim, self.patch_size, stride=self.patch_size, name="proj", dtype=self.dtype)(x)


class ImageEncoderViT(nn.Module):
    """𝓖: pixels [B, img, img, in_chans] (normalised, padded) -> image embedding [B, g, g, out_chans]."""

    config: ImageEncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        x = PatchEmbed(cfg.embed_dim, cfg.patch_size, dtype=self.dtype, name="patch_embed")(pixel_values)
        if cfg.use_abs_pos:
            pos = self.param("pos_embed", layers.param_init(nn.initializers.zeros_init(), (None, None, None, "embed")),
                             (1, cfg.grid, cfg.grid, cfg.embed_dim))
            x = x + pos.astype(x.dtype)
        for i in range(cfg.depth):
            x = layers.remat_block(Block, cfg.remat)(cfg, cfg.block_window(i), dtype=self.dtype, name=f"blocks_{i}")(x)
        x = layers.conv(cfg.out_chans, 1, use_bias=False, name="neck_0", dtype=self.dtype)(x)
        x = layer_norm_2d(cfg.neck_norm_eps, name="neck_1", dtype=self.dtype)(x)
        x = layers.conv(cfg.out_chans, 3, padding=1, use_bias=False, name="neck_2", dtype=self.dtype)(x)
        return layer_norm_2d(cfg.neck_norm_eps, name="neck_3", dtype=self.dtype)(x)
