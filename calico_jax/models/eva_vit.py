"""EVA-CLIP ViT-g, the BLIP-2 / InstructBLIP image encoder 𝓒 (HF ``Blip2VisionModel``).

𝓒 maps an image to X_global = ``post_layernorm(ViT(image))``: CLS + patch tokens,
``[B, 1 + (H/p)(W/p), D]``. Parameter names mirror HF's ``Blip2VisionModel`` /
``InstructBlipVisionModel`` (``embeddings.*``, ``encoder.layers.N.*``, ``post_layernorm``), so the
generic rule in ``convert.mapping`` maps every tensor except the qkv bias (below).

Numerics (HF ``Blip2VisionModel`` and LAVIS ``create_eva_vit_g``):

* pre-LN blocks ``x += proj(attn(LN1(x))); x += fc2(gelu(fc1(LN2(x))))``, exact GELU, LN eps 1e-6;
* the final norm has its own eps: HF uses ``layer_norm_eps`` (1e-6), LAVIS's ``ln_vision`` is a
  plain ``nn.LayerNorm`` (1e-5) -- ``post_layernorm_eps``;
* fused ``qkv`` Linear whose bias is ``cat(q_bias, 0, v_bias)``. We store ``self_attn.q_bias`` and
  ``self_attn.v_bias`` (LAVIS's own parametrisation) so the K bias is a constant zero, never a
  trainable parameter. A K bias has no effect anyway: it adds ``q·b_k`` to every logit of a query
  row, which softmax cancels; so a (trained) non-zero K third in an HF checkpoint can be dropped;
* the position table is learned for ``image_size``; another input size bicubically resizes its
  patch part exactly as HF's ``interpolate_pos_encoding`` does (torch bicubic a=-0.75,
  ``align_corners=False``, ``size=(H//p, W//p)``; CLS entry kept), via :mod:`calico_jax.core.resize`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError, hf_get
from calico_jax.core.resize import resize_2d
from calico_jax.models import layers, scan


@dataclasses.dataclass(frozen=True)
class EvaVitConfig(Config):
    """Defaults: EVA-CLIP ViT-g as used by BLIP-2 (39 blocks, 1408 wide, 16 heads of 88)."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    post_layernorm_eps: float = 1e-6
    remat: str = "none"    # block rematerialisation policy (layers.REMAT_POLICIES)
    scan_layers: bool = False   # blocks as one nn.scan (encoder/scan_0_N, models/scan.py)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"EvaVitConfig: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")

    def scan_stacks(self, prefix: tuple[str, ...] = ()) -> list[scan.Stack]:
        """The block stack (:func:`calico_jax.models.scan.stack_layers`) when ``scan_layers``."""
        return [scan.Stack((*prefix, "encoder"), "layers_", self.num_hidden_layers)] if self.scan_layers else []

    @property
    def grid(self) -> int:
        """Side of the native patch grid the position table was learned for (HF floors, as the conv does)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf_config(cls, cfg: Any) -> EvaVitConfig:
        """From a ``Blip2VisionConfig`` / ``InstructBlipVisionConfig`` (object or config.json dict)."""
        image_size, patch_size = hf_get(cfg, "image_size", 224), hf_get(cfg, "patch_size", 14)
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise ConfigError(f"vision config: only square int image_size/patch_size are supported "
                              f"(got {image_size!r}, {patch_size!r})")
        eps = hf_get(cfg, "layer_norm_eps", 1e-6)
        return cls(image_size=image_size, patch_size=patch_size, hidden_size=hf_get(cfg, "hidden_size", 1408),
                   intermediate_size=hf_get(cfg, "intermediate_size", 6144),
                   num_hidden_layers=hf_get(cfg, "num_hidden_layers", 39),
                   num_attention_heads=hf_get(cfg, "num_attention_heads", 16),
                   hidden_act=hf_get(cfg, "hidden_act", "gelu"), qkv_bias=hf_get(cfg, "qkv_bias", True),
                   layer_norm_eps=eps, post_layernorm_eps=eps)

    @classmethod
    def from_lavis(cls, img_size: int = 224, patch_size: int = 14, embed_dim: int = 1408, depth: int = 39,
                   num_heads: int = 16, mlp_ratio: float = 4.3637, qkv_bias: bool = True, in_chans: int = 3,
                   layer_norm_eps: float = 1e-6, ln_vision_eps: float = 1e-5) -> EvaVitConfig:
        """From LAVIS ``eva_vit.VisionTransformer`` arguments plus BLIP-2's ``ln_vision`` (eps 1e-5)."""
        return cls(image_size=img_size, patch_size=patch_size, num_channels=in_chans, hidden_size=embed_dim,
                   intermediate_size=int(embed_dim * mlp_ratio), num_hidden_layers=depth,
                   num_attention_heads=num_heads, qkv_bias=qkv_bias, layer_norm_eps=layer_norm_eps,
                   post_layernorm_eps=ln_vision_eps)


class EvaVitEmbeddings(nn.Module):
    """Patch conv + CLS + (interpolated) position table."""

    config: EvaVitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        d = cfg.hidden_size
        cls_emb = self.param("class_embedding", layers.param_init(nn.initializers.normal(0.02), (None, None, "embed")),
                             (1, 1, d))
        pos = self.param("position_embedding",
                         layers.param_init(nn.initializers.normal(0.02), (None, "length", "embed")),
                         (1, cfg.grid ** 2 + 1, d))
        x = layers.conv(d, cfg.patch_size, stride=cfg.patch_size, name="patch_embedding",
                        dtype=self.dtype)(pixel_values.astype(self.dtype))
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, d)
        x = jnp.concatenate([jnp.broadcast_to(cls_emb.astype(x.dtype), (b, 1, d)), x], axis=1)
        return x + self.position_table(pos, gh, gw).astype(x.dtype)

    def position_table(self, pos: jax.Array, gh: int, gw: int) -> jax.Array:
        """HF ``interpolate_pos_encoding``: bicubic resize of the patch grid when it is not native."""
        g = self.config.grid
        if (gh, gw) == (g, g):
            return pos
        patch = pos[:, 1:].reshape(1, g, g, pos.shape[-1])
        patch = resize_2d(patch, (gh, gw), mode="bicubic").reshape(1, gh * gw, pos.shape[-1])
        return jnp.concatenate([pos[:, :1], patch.astype(pos.dtype)], axis=1)


class EvaAttention(nn.Module):
    """HF ``Blip2Attention``: fused qkv, q/v bias only, head_dim**-0.5 scaling."""

    config: EvaVitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d, h = cfg.hidden_size, cfg.num_attention_heads
        qkv = layers.dense(3 * d, ("embed", "heads"), name="qkv", use_bias=False, dtype=self.dtype)(x)
        if cfg.qkv_bias:
            zeros = layers.param_init(nn.initializers.zeros_init(), ("heads",))
            q_bias = self.param("q_bias", zeros, (d,))
            v_bias = self.param("v_bias", zeros, (d,))
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        # [B, T, 3*D] -> three [B, T, H, D/H], the (3, heads, head_dim) order of HF's reshape.
        q, k, v = jnp.moveaxis(qkv.reshape(*qkv.shape[:-1], 3, h, d // h), -3, 0)
        out = layers.merge_heads(layers.attention(q, k, v))
        return layers.dense(d, ("heads", "embed"), name="projection", dtype=self.dtype)(out)


class EvaMlp(nn.Module):
    config: EvaVitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        x = layers.activation(cfg.hidden_act)(x)
        return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype)(x)


class EvaBlock(nn.Module):
    """Pre-LN transformer block (no layer-scale, no relative position bias)."""

    config: EvaVitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        x = x + EvaAttention(self.config, self.dtype, name="self_attn")(
            layers.layer_norm(eps, name="layer_norm1", dtype=self.dtype)(x))
        return x + EvaMlp(self.config, self.dtype, name="mlp")(
            layers.layer_norm(eps, name="layer_norm2", dtype=self.dtype)(x))


class ScannedEvaBlock(EvaBlock):
    """:class:`EvaBlock` in ``nn.scan``'s form (carry -> (carry, None))."""

    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        return super().__call__(x), None


class EvaEncoder(nn.Module):
    config: EvaVitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.config.num_hidden_layers
        if self.config.scan_layers:
            stack = scan.scanned(ScannedEvaBlock, length=n, remat=self.config.remat, in_axes=())
            return stack(self.config, self.dtype, name=scan.segment_name(0, n))(x)[0]
        for i in range(n):
            x = layers.remat_block(EvaBlock, self.config.remat)(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class EvaVit(nn.Module):
    """𝓒: NHWC pixels ``[B, H, W, C]`` -> ``{"last_hidden_state": X_global [B, 1+N, D],
    "pooler_output": [B, D]}``.

    ``pooler_output`` is ``post_layernorm`` applied a second time to the (already normalised) CLS
    token, as HF does. H and W need not be ``image_size``: the position table is interpolated.
    """

    config: EvaVitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        x = EvaVitEmbeddings(self.config, self.dtype, name="embeddings")(pixel_values)
        x = EvaEncoder(self.config, self.dtype, name="encoder")(x)
        post = layers.layer_norm(self.config.post_layernorm_eps, name="post_layernorm", dtype=self.dtype)
        x = post(x)
        return {"last_hidden_state": x, "pooler_output": post(x[:, 0])}

    def dummy_inputs(self) -> dict[str, Any]:
        cfg = self.config
        return {"pixel_values": jnp.zeros((1, cfg.patch_size, cfg.patch_size, cfg.num_channels), jnp.float32)}
