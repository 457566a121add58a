"""Segment Anything (SAM) as used by GLaMM / LISA: image encoder 𝓖, prompt encoder, mask decoder 𝓓.

Layouts: images and image-shaped features are NHWC; masks are [b, M, H, W] (a stack of M mask
logit maps per prompt, as in torch). The methods below are usable one at a time with
``Sam(cfg).apply({"params": p}, ..., method="image_embeddings")`` etc.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.models.sam.config import SamConfig
from calico_jax.models.sam.image_encoder import ImageEncoderViT
from calico_jax.models.sam.mask_decoder import MaskDecoder
from calico_jax.models.sam.prompt_encoder import PromptEncoder

# Sam.pixel_mean / pixel_std (0..255 scale); non-persistent buffers in torch, constants here.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def postprocess_masks(masks: jax.Array, img_size: int, input_size: tuple[int, int],
                      original_size: tuple[int, int]) -> jax.Array:
    """``Sam.postprocess_masks``: [b, M, h, w] logits -> bilinear to img_size², crop the padding to
    ``input_size`` (the resized image before padding), bilinear to ``original_size``; torch-exact
    ``F.interpolate(bilinear, align_corners=False)`` without anti-aliasing, computed in float32.

    ``jax.image.resize(antialias=False)`` rather than :func:`calico_jax.core.resize.resize_2d`: both are
    torch's formula, but jax computes the taps in float32 like ATen, which lands closer to torch for
    non-dyadic ratios (measured 9e-7 vs 2.4e-6 relative, 32 -> 37x90).
    """
    def resize(x, hw):
        return jax.image.resize(x, (*x.shape[:-2], *hw), "bilinear", antialias=False)

    masks = resize(masks.astype(jnp.float32), (img_size, img_size))
    masks = masks[..., :input_size[0], :input_size[1]]
    return resize(masks, tuple(original_size))


class Sam(nn.Module):
    config: SamConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.image_encoder = ImageEncoderViT(self.config.image_encoder, dtype=self.dtype)
        self.prompt_encoder = PromptEncoder(self.config.prompt_encoder, dtype=self.dtype)
        self.mask_decoder = MaskDecoder(self.config.mask_decoder, dtype=self.dtype)

    def image_embeddings(self, pixel_values: jax.Array) -> jax.Array:
        """𝓖: normalised, padded pixels [B, img, img, 3] -> image embeddings [B, h, w, C]."""
        return self.image_encoder(pixel_values)

    def encode_prompts(self, points: jax.Array | None = None, labels: jax.Array | None = None,
                       boxes: jax.Array | None = None, masks: jax.Array | None = None,
                       text_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """-> (sparse [b, N, C], dense [b, h, w, C]); see :class:`PromptEncoder`."""
        return self.prompt_encoder(points, labels, boxes, masks, text_embeds)

    def dense_pe(self) -> jax.Array:
        """Positional encoding of the image-embedding grid, [1, h, w, C]."""
        return self.prompt_encoder.get_dense_pe()

    def decode_masks(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse_prompt_embeddings: jax.Array,
                     dense_prompt_embeddings: jax.Array, multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
        """𝓓 -> (low-res mask logits [b, M, 4h, 4w], IoU predictions [b, M])."""
        return self.mask_decoder(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                 multimask_output)

    def postprocess(self, masks: jax.Array, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> jax.Array:
        return postprocess_masks(masks, self.config.image_encoder.img_size, input_size, original_size)

    def __call__(self, pixel_values: jax.Array | None = None, points: jax.Array | None = None,
                 labels: jax.Array | None = None, boxes: jax.Array | None = None, masks: jax.Array | None = None,
                 text_embeds: jax.Array | None = None, image_embeddings: jax.Array | None = None,
                 multimask_output: bool = False) -> dict[str, jax.Array]:
        """The full pipeline for the prompts of one image (or of B images, each image's prompts contiguous).

        Give ``pixel_values`` or precomputed ``image_embeddings``. Returns ``image_embeddings``,
        ``low_res_masks`` [b, M, 4h, 4w] and ``iou_predictions`` [b, M].
        """
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass exactly one of pixel_values and image_embeddings")
        if image_embeddings is None:
            image_embeddings = self.image_embeddings(pixel_values)
        sparse, dense = self.encode_prompts(points, labels, boxes, masks, text_embeds)
        if masks is None:   # every row is the no-mask embedding: one row lets the decoder work per image
            dense = dense[:1]
        low_res, iou = self.decode_masks(image_embeddings, self.dense_pe(), sparse, dense, multimask_output)
        return {"image_embeddings": image_embeddings, "low_res_masks": low_res, "iou_predictions": iou}

    def dummy_inputs(self) -> dict[str, Any]:
        """Points + a box + a mask input: together they create every parameter."""
        ie, pe = self.config.image_encoder, self.config.prompt_encoder
        h, w = pe.image_embedding_size
        return {"pixel_values": jnp.zeros((1, ie.img_size, ie.img_size, ie.in_chans), jnp.float32),
                "points": jnp.zeros((1, 1, 2), jnp.float32), "labels": jnp.ones((1, 1), jnp.int32),
                "boxes": jnp.zeros((1, 4), jnp.float32), "masks": jnp.zeros((1, 4 * h, 4 * w, 1), jnp.float32),
                "text_embeds": jnp.zeros((1, 1, pe.embed_dim), jnp.float32)}
