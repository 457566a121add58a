"""SAM image-encoder attention with decomposed relative positions: the blocked form (bias never
materialised, logits tile by tile) against a float64 NumPy reference and against the dense form."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calico_jax.core.config import ConfigError
from calico_jax.models.sam import SamConfig
from calico_jax.models.sam.image_encoder import ImageEncoderViT, blocked_rel_pos_attention
from tests.helpers import rel_err


def reference(q, k, v, table_h, table_w, hw, scale):
    """softmax(q·k*scale + q·Rh[y-ky] + q·Rw[x-kx]) v in float64, straight from the definition (q_size == k_size)."""
    q, k, v, table_h, table_w = (np.asarray(a, np.float64) for a in (q, k, v, table_h, table_w))
    h, w = hw
    ys, xs = np.divmod(np.arange(h * w), w)
    rh = table_h[ys[:, None] - ys[None, :] + h - 1]  # [Tq, Tk, D] for every (query, key) pair
    rw = table_w[xs[:, None] - xs[None, :] + w - 1]
    logits = (np.einsum("bqnd,bknd->bnqk", q, k) * scale + np.einsum("bqnd,qkd->bnqk", q, rh)
              + np.einsum("bqnd,qkd->bnqk", q, rw))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknd->bqnd", p, v)


# (batch, grid h, grid w, heads, head dim, block_bytes): one query per tile (block < one query's logits), a
# third of the queries per tile, several heads per tile (all queries of 2 of 3 heads fit), everything in one
# tile, and a non-square grid whose query chunk (5 of 15) does not align with grid rows. A tile always holds
# the whole batch.
CASES = [(2, 4, 4, 3, 8, 1), (3, 3, 3, 2, 8, 2 * 9 * 9 * 4), (2, 3, 3, 3, 4, 2 * 2 * 9 * 9 * 4),
         (1, 5, 5, 2, 4, 1 << 20), (2, 5, 3, 2, 8, 2 * 5 * 15 * 4)]


@pytest.mark.parametrize("b,h,w,n,d,block", CASES)
def test_blocked_matches_float64_reference(b, h, w, n, d, block):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h * w, n, d)).astype(np.float32) for _ in range(3))
    th, tw = (rng.standard_normal((2 * h - 1, d)).astype(np.float32),
              rng.standard_normal((2 * w - 1, d)).astype(np.float32))
    got = blocked_rel_pos_attention(*(jnp.asarray(a) for a in (q, k, v, th, tw)), (h, w), (h, w), scale=d ** -0.5,
                                    block_bytes=block)
    assert got.shape == q.shape
    assert rel_err(got, reference(q, k, v, th, tw, (h, w), d ** -0.5)) < 2e-6


def test_blocked_grad_matches_dense():
    """lax.map tiles are differentiable; gradients agree with the materialised-bias form."""
    from calico_jax.models import layers
    from calico_jax.models.sam.image_encoder import decomposed_rel_pos

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 9, 2, 4), dtype=np.float32)) for _ in range(3))
    th, tw = (jnp.asarray(rng.standard_normal((5, 4), dtype=np.float32)) for _ in range(2))

    def blocked(q, k, v, th, tw):
        return blocked_rel_pos_attention(q, k, v, th, tw, (3, 3), (3, 3), scale=0.5, block_bytes=3 * 9 * 4).sum()

    def dense(q, k, v, th, tw):
        return layers.attention(q, k, v, scale=0.5, bias=decomposed_rel_pos(q, th, tw, (3, 3), (3, 3))).sum()

    for g_b, g_d in zip(jax.grad(blocked, argnums=range(5))(q, k, v, th, tw),
                        jax.grad(dense, argnums=range(5))(q, k, v, th, tw)):
        assert rel_err(g_b, g_d) < 1e-5


@pytest.mark.parametrize("block", [4 * 16 * 4, 1 << 20])   # one query per tile; everything in one tile
def test_blocked_keeps_a_sharded_batch_local(block):
    """With the batch sharded over 8 devices, the tile loop never slices the batch: the compiled program has no
    collective (slicing batch x heads rows inside the loop made XLA all-gather every tile)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from calico_jax.parallel.sharding import make_mesh

    mesh = make_mesh({"data": len(jax.devices())})
    b, h, w, n, d = len(jax.devices()), 4, 4, 2, 8
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((b, h * w, n, d)).astype(np.float32) for _ in range(3))
    th, tw = (rng.standard_normal((2 * h - 1, d)).astype(np.float32) for _ in range(2))
    batch, repl = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(lambda *a: blocked_rel_pos_attention(*a, (h, w), (h, w), scale=d ** -0.5, block_bytes=block),
                 in_shardings=(batch,) * 3 + (repl,) * 2, out_shardings=batch)
    hlo = fn.lower(q, k, v, th, tw).compile().as_text()
    assert not [op for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce") if op in hlo]
    assert rel_err(fn(q, k, v, th, tw), reference(q, k, v, th, tw, (h, w), d ** -0.5)) < 2e-6


def test_encoder_blocked_equals_dense():
    """A whole encoder (windowed blocks with padding + a global block) in both forms on the same params,
    with tiles small enough that every attention runs as several tiles."""
    base = SamConfig.preset("vit_b").image_encoder
    cfg = dataclasses.replace(base, img_size=96, patch_size=8, embed_dim=24, depth=2, num_heads=2, out_chans=16,
                              window_size=5, global_attn_indexes=(1,), attention_block_bytes=1000)
    dense = dataclasses.replace(cfg, rel_pos_attention="dense")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 96, 96, 3), dtype=np.float32))
    params = ImageEncoderViT(cfg).init(jax.random.key(0), x)
    # rel-pos tables and pos_embed start at zero: give them values so the bias matters
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape), params)
    got = ImageEncoderViT(cfg).apply(params, x)
    want = ImageEncoderViT(dense).apply(params, x)
    assert rel_err(got, want) < 1e-5


def test_unknown_rel_pos_attention():
    ie = dataclasses.replace(SamConfig.preset("vit_b").image_encoder, rel_pos_attention="flash")
    with pytest.raises(ConfigError, match="rel_pos_attention"):
        dataclasses.replace(SamConfig.preset("vit_b"), image_encoder=ie)

