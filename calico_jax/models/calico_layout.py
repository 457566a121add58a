"""Static-shape sequence layout for :class:`~calico_jax.models.calico.Calico`: splicing image tokens into
the expanded sequence and GLaMM's mask post-processing as interpolation matrices built from traced sizes
(so everything jits with fixed shapes). Routing each [SEG] to an image (and to a hidden state) lives in
:mod:`calico_jax.models.seg_routing`. See the :mod:`calico_jax.models.calico` docstring, steps 3, 5 and 7."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from calico_jax.core.resize import bilinear_matrix


def expand_sequence(input_ids: jax.Array, image_token_index: int, num_images: int, num_query: int):
    """Where every token of ``input_ids`` [B, T] lands once each placeholder is widened to S_I tokens.

    -> ``newpos`` [B, T] (an image slot maps to its block start), ``text_target`` [B, T] (T' for image
    slots: scatter with mode="drop"), ``image_positions`` [B, N, S_I] (T' for absent images),
    ``has_image`` [B, N], and T'. At most N placeholders per sample (checked on the host).
    """
    b, t = input_ids.shape
    t_exp = t + num_images * (num_query - 1)
    is_img = input_ids == image_token_index
    before = jnp.cumsum(is_img, axis=1) - is_img
    newpos = jnp.arange(t)[None] + (num_query - 1) * before
    text_target = jnp.where(is_img, t_exp, newpos)
    slots = jax.vmap(lambda m: jnp.nonzero(m, size=num_images, fill_value=-1)[0])(is_img)
    has_image = slots >= 0
    start = jnp.take_along_axis(newpos, jnp.maximum(slots, 0), axis=1)
    image_positions = jnp.where(has_image[..., None], start[..., None] + jnp.arange(num_query), t_exp)
    return newpos, text_target, image_positions, has_image, t_exp


def postprocess_masks(low_res: jax.Array, img_size: int, resized_hw: jax.Array, original_hw: jax.Array,
                      mask_size: tuple[int, int]) -> jax.Array:
    """GLaMM's ``postprocess_masks`` on low-res logits [n, h, w] with traced sizes [n, 2] -> [n, H_pad, W_pad]."""
    h, w = low_res.shape[-2:]
    hi = jax.lax.Precision.HIGHEST
    up_h = bilinear_matrix(h, img_size, img_size, h)          # [img, h]: low-res -> img_size²
    up_w = bilinear_matrix(w, img_size, img_size, w)
    a_h = jnp.matmul(bilinear_matrix(resized_hw[:, 0], original_hw[:, 0], mask_size[0], img_size), up_h, precision=hi)
    a_w = jnp.matmul(bilinear_matrix(resized_hw[:, 1], original_hw[:, 1], mask_size[1], img_size), up_w, precision=hi)
    return jnp.einsum("nih,nhw,njw->nij", a_h, low_res.astype(jnp.float32), a_w, precision=hi)
