"""SAM mask decoder 𝓓: TwoWayTransformer over [iou token, mask tokens, prompt tokens] and the image,
ConvTranspose upscaling, hypernetwork MLPs per mask token, IoU head."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.models import layers
from calico_jax.models.sam.common import MLP, embedding, layer_norm_2d, repeat_per_prompt
from calico_jax.models.sam.config import MaskDecoderConfig
from calico_jax.models.sam.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    config: MaskDecoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse_prompt_embeddings: jax.Array,
                 dense_prompt_embeddings: jax.Array, multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """image_embeddings [B_img, h, w, C]; image_pe [1 or B_img, h, w, C]; sparse [b, N, C];
        dense [b or 1, h, w, C], with b a multiple of B_img (each image's prompts contiguous).

        -> (masks [b, M, 4h, 4w] low-res logits, iou_pred [b, M]); M = num_multimask_outputs if
        ``multimask_output`` else 1 (mask token 0).
        """
        cfg = self.config
        c, n_mask = cfg.transformer_dim, cfg.num_mask_tokens
        iou_token = embedding(1, c, name="iou_token")
        mask_tokens = embedding(n_mask, c, name="mask_tokens")
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = jnp.concatenate([iou_token.embedding, mask_tokens.embedding], axis=0)
        output_tokens = jnp.broadcast_to(output_tokens[None], (b, *output_tokens.shape))
        tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)

        # With one dense embedding per image (or one for all: no mask prompts), the image side stays per
        # image until the first image->token update makes it per prompt (the transformer repeats it there).
        per_image = dense_prompt_embeddings.shape[0] in (1, image_embeddings.shape[0])
        src = image_embeddings if per_image else repeat_per_prompt(image_embeddings, b)
        src = src + dense_prompt_embeddings
        hs, src = TwoWayTransformer(cfg.transformer, dtype=self.dtype, name="transformer")(src, image_pe, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:1 + n_mask]

        # output_upscaling (ConvT 2x2/2 -> LayerNorm2d -> GELU -> ConvT 2x2/2 -> GELU) and the per-pixel
        # hypernetwork product, all in patch form: [b, h, w, 2, 2, 2, 2, c/8], interleaved once at the end.
        h, w = image_embeddings.shape[1:3]
        # (the per-pixel steps run on 2-D [pixels, channels] views: XLA:CPU's LayerNorm on the 6-D patch
        # layout ran at half the speed)
        up = layers.PatchConvTranspose(c // 4, 2, dtype=self.dtype, name="output_upscaling_0")(src.reshape(-1, c))
        up = layer_norm_2d(cfg.upscale_norm_eps, name="output_upscaling_1", dtype=self.dtype)(up.reshape(-1, c // 4))
        up = layers.gelu(layers.PatchConvTranspose(c // 8, 2, dtype=self.dtype, name="output_upscaling_3")(
            layers.gelu(up)))                                                   # [b*h*w*4, 2, 2, c/8]

        hyper_in = jnp.stack([MLP(c, c // 8, 3, dtype=self.dtype, name=f"output_hypernetworks_mlps_{i}")(
            mask_tokens_out[:, i]) for i in range(n_mask)], axis=1)                     # [b, n_mask, c/8]
        # pixels x channels times channels x masks (the masks axis minor): XLA:CPU reads `up` as it lies
        masks = jnp.einsum("bxc,bmc->bxm", up.reshape(b, -1, c // 8), hyper_in, precision=jax.lax.Precision.HIGHEST)
        masks = masks.reshape(b, h, w, 2, 2, 2, 2, n_mask)
        masks = layers.interleave_patches(jnp.moveaxis(masks, -1, 1), levels=2)        # [b, n_mask, 4h, 4w]
        iou_pred = MLP(cfg.iou_head_hidden_dim, n_mask, cfg.iou_head_depth, dtype=self.dtype,
                       name="iou_prediction_head")(iou_token_out)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]
