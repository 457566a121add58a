"""SAM prompt encoder: points, boxes, mask inputs and GLaMM/LISA's [SEG] "text_embeds" prompt.

Sparse prompts are [B, N, C] tokens; dense prompts and positional encodings are NHWC [B, h, w, C].
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.models import layers
from calico_jax.models.sam.common import embedding, layer_norm_2d
from calico_jax.models.sam.config import PromptEncoderConfig

_HP = jax.lax.Precision.HIGHEST


def _true_divide(x: jax.Array, d: tuple[float, ...]) -> jax.Array:
    """``x / d`` as an IEEE division, as torch computes it. XLA rewrites division by a constant or a
    broadcast divisor into multiplication by its reciprocal, which is 1 ulp off for about a third of the
    elements when ``d`` is not a power of two (e.g. 96); the barrier hides the divisor from that rewrite."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape))


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features: pe(c) = [sin(2π(2c-1)G), cos(2π(2c-1)G)] for c in [0,1]^2, G ~ N(0,1)^{2×F}."""

    num_pos_feats: int

    def setup(self):
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix", layers.param_init(nn.initializers.normal(1.0), (None, None)),
            (2, self.num_pos_feats))

    def encode(self, coords: jax.Array) -> jax.Array:
        g = self.positional_encoding_gaussian_matrix
        coords = 2 * coords.astype(g.dtype) - 1
        coords = 2 * math.pi * jnp.matmul(coords, g, precision=_HP)
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def grid(self, h: int, w: int) -> jax.Array:
        """Dense PE of pixel centres of an h×w grid -> [h, w, 2F]."""
        # Static, so built in numpy: an exact float32 division like torch's (cumsum - 0.5) / h (see _true_divide).
        f = np.float32
        y = (np.arange(h, dtype=f) + f(0.5)) / f(h)
        x = (np.arange(w, dtype=f) + f(0.5)) / f(w)
        coords = np.stack(np.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self.encode(jnp.asarray(coords))

    def with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """PE of (x, y) pixel coordinates in an image of ``image_size`` = (H, W)."""
        return self.encode(_true_divide(coords.astype(jnp.float32), (image_size[1], image_size[0])))


class PromptEncoder(nn.Module):
    """``PromptEncoder`` (+ the GLaMM/LISA ``text_embeds`` argument)."""

    config: PromptEncoderConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        c, m = cfg.embed_dim, cfg.mask_in_chans
        self.pe_layer = PositionEmbeddingRandom(c // 2)
        # (neg point, pos point, box top-left, box bottom-right)
        self.point_embeddings = [embedding(1, c) for _ in range(4)]
        self.not_a_point_embed = embedding(1, c)
        self.no_mask_embed = embedding(1, c)
        # Created eagerly so that every table exists whichever prompt the init call used.
        self._point_tables = [e.embedding for e in self.point_embeddings]
        self._not_a_point = self.not_a_point_embed.embedding
        self._no_mask = self.no_mask_embed.embedding
        # nn.Sequential indices 2 and 5 are the parameter-free activations.
        self.mask_downscaling = {
            "0": layers.conv(m // 4, 2, stride=2, name="mask_downscaling_0", dtype=self.dtype),
            "1": layer_norm_2d(cfg.mask_norm_eps, name="mask_downscaling_1", dtype=self.dtype),
            "3": layers.conv(m, 2, stride=2, name="mask_downscaling_3", dtype=self.dtype),
            "4": layer_norm_2d(cfg.mask_norm_eps, name="mask_downscaling_4", dtype=self.dtype),
            "6": layers.conv(c, 1, name="mask_downscaling_6", dtype=self.dtype),
        }
        if self.is_initializing():
            # The mask convs infer their shapes on first call: run them once on an empty mask input so their
            # tables exist whichever prompts the init call used (checkpoints always hold them; CALICO and
            # GLaMM's [SEG] path never pass a mask).
            h, w = cfg.image_embedding_size
            self._embed_masks(jnp.zeros((1, 4 * h, 4 * w, 1), jnp.float32))

    def get_dense_pe(self) -> jax.Array:
        """PE of the image-embedding grid, [1, h, w, C] (the key PE of the mask decoder)."""
        return self.pe_layer.grid(*self.config.image_embedding_size)[None]

    def _embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """points [B, N, 2] (x, y) in input-image pixels; labels [B, N]: 1 fg, 0 bg, -1 not a point."""
        points = points.astype(jnp.float32) + 0.5  # pixel centres
        if pad:  # a "not a point" token stands in for the missing box
            points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], axis=1)
        pe = self.pe_layer.with_coords(points, self.config.input_image_size)
        lab = labels[..., None]
        neg, pos = self._point_tables[0][0], self._point_tables[1][0]
        return jnp.where(lab == -1, self._not_a_point[0],
                         jnp.where(lab == 0, pe + neg, jnp.where(lab == 1, pe + pos, pe)))

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """boxes [B, 4] (x0, y0, x1, y1) -> two corner tokens [B, 2, C]."""
        coords = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.with_coords(coords, self.config.input_image_size)
        return pe + jnp.concatenate([self._point_tables[2], self._point_tables[3]], axis=0)[None]

    def _embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks [B, 4h, 4w, 1] (low-res logits) -> [B, h, w, C]."""
        act = layers.activation(self.config.act)
        s = self.mask_downscaling
        x = act(s["1"](s["0"](masks.astype(self.dtype))))
        x = act(s["4"](s["3"](x)))
        return s["6"](x)

    def __call__(self, points: jax.Array | None = None, labels: jax.Array | None = None,
                 boxes: jax.Array | None = None, masks: jax.Array | None = None,
                 text_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """-> (sparse [B, N, C], dense [B, h, w, C]).

        ``text_embeds`` [B, n, C] ([SEG] embeddings) are appended to the sparse tokens as they are:
        no positional encoding, no point-type embedding (GLaMM/LISA ``PromptEncoder.forward``).
        """
        cfg = self.config
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        for x in (points, boxes, masks, text_embeds):
            if x is not None:
                bs = x.shape[0]
                break
        else:
            bs = 1
        sparse = [jnp.zeros((bs, 0, cfg.embed_dim), jnp.float32)]
        if points is not None:
            sparse.append(self._embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        if text_embeds is not None:
            sparse.append(text_embeds.astype(jnp.float32))
        sparse = jnp.concatenate(sparse, axis=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = cfg.image_embedding_size
            dense = jnp.broadcast_to(self._no_mask[0], (bs, h, w, cfg.embed_dim))
        return sparse, dense
