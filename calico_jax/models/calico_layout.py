"""Static-shape sequence layout for :class:`~calico_jax.models.calico.Calico`: splicing image tokens into
the expanded sequence, routing each [SEG] to an image by the identifier that follows it, and GLaMM's mask
post-processing as interpolation matrices built from traced sizes (so everything jits with fixed shapes).
See the :mod:`calico_jax.models.calico` docstring, steps 3, 5 and 7."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.config import Config, ConfigError

@dataclasses.dataclass(frozen=True)
class SegConfig(Config):
    token_id: int = 32004                                # [SEG] in GLaMM's tokenizer
    identifier_ids: tuple[tuple[int, ...], ...] = ()      # per image: ids of " (IMAGE{i+1})" after [SEG]
    hidden_position: str = "before"                      # "before" [SEG] (GLaMM/LISA) | "at" [SEG]
    projection: str = "mlp"                              # "mlp" (text_hidden_fcs) | "linear"
    max_seg: int = 8                                     # static [SEG] slots per sample
    mask_size: tuple[int, int] = (1024, 1024)            # static (H_pad, W_pad) of the output masks
    unrouted: str = "drop"                               # "drop" | "first"

    def __post_init__(self):
        for field, value, options in (("hidden_position", self.hidden_position, ("before", "at")),
                                      ("projection", self.projection, ("mlp", "linear")),
                                      ("unrouted", self.unrouted, ("drop", "first"))):
            if value not in options:
                raise ConfigError(f"SegConfig: {field} must be one of {options}, got {value!r}")
        if any(len(t) == 0 for t in self.identifier_ids):
            raise ConfigError("SegConfig: an identifier has no tokens")



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


def route_segs(input_ids: jax.Array, seg: SegConfig, num_valid_images: jax.Array,
               seg_image: jax.Array | None = None) -> dict[str, jax.Array]:
    """[SEG] slots [B, M]: original positions, target image, validity and the counts (see module doc)."""
    b, t = input_ids.shape
    is_seg = input_ids == seg.token_id
    pos = jax.vmap(lambda m: jnp.nonzero(m, size=seg.max_seg, fill_value=-1)[0])(is_seg)
    present = pos >= 0
    if seg_image is None:
        if not seg.identifier_ids:
            raise ValueError("no seg.identifier_ids in the config: pass seg_image (host-side routing)")
        width = max(len(p) for p in seg.identifier_ids)
        table = np.full((len(seg.identifier_ids), width), -1, np.int64)
        for i, p in enumerate(seg.identifier_ids):
            table[i, :len(p)] = p
        idx = pos[..., None] + 1 + jnp.arange(width)                                    # [B, M, L]
        window = jnp.where(idx < t, jnp.take_along_axis(input_ids[:, None, :], jnp.minimum(idx, t - 1), axis=2),
                           -2)
        ok = (window[:, :, None, :] == table) | (table == -1)                         # [B, M, K, L]
        match = jnp.all(ok, axis=-1)
        image = jnp.where(jnp.any(match, -1), jnp.argmax(match, -1), -1)
    else:
        image = jnp.asarray(seg_image, jnp.int32)
    routed = present & (image >= 0) & (image < num_valid_images[:, None])
    unrouted = present & ~routed
    if seg.unrouted == "first":
        image, valid = jnp.where(unrouted, 0, image), present & (num_valid_images[:, None] > 0)
    else:
        valid = routed
    return {"position": pos, "image": jnp.where(valid, image, 0).astype(jnp.int32), "valid": valid,
            "num_unrouted": jnp.sum(unrouted, axis=1),
            "num_dropped": jnp.sum(is_seg, axis=1) - jnp.sum(present, axis=1)}


def bilinear_matrix(in_size: jax.Array, out_size: jax.Array, out_len: int, src_len: int) -> jax.Array:
    """Rows of torch's ``F.interpolate(bilinear, align_corners=False)`` from ``in_size`` source pixels
    (the first ``in_size`` of ``src_len``) to ``out_size`` outputs, padded with zero rows to ``out_len``.
    Sizes may be traced arrays [...] -> [..., out_len, src_len]."""
    in_size = jnp.asarray(in_size, jnp.int32)[..., None]
    out_size = jnp.asarray(out_size, jnp.int32)[..., None]
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    i = jnp.arange(out_len, dtype=jnp.float32)
    src = jnp.maximum((i + 0.5) * scale - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
    i1 = jnp.minimum(i0 + 1, in_size - 1)
    l1 = src - i0.astype(jnp.float32)
    w = ((1.0 - l1)[..., None] * jax.nn.one_hot(i0, src_len) + l1[..., None] * jax.nn.one_hot(i1, src_len))
    return jnp.where((jnp.arange(out_len) < out_size)[..., None], w, 0.0)


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
