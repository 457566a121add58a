"""CLIP vision tower (HF ``CLIPVisionModel``) as used by LLaVA/GLaMM: the image tokenizer of the paper's
"Multi-Image GLaMM" efficiency baseline (CLIP-ViT-L/14-336 -> 576 patch tokens per image).

Layout mirrors HF's ``CLIPVisionTransformer`` (``embeddings.{class_embedding, patch_embedding,
position_embedding}``, ``pre_layrnorm``, ``encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1,
mlp.fc1, mlp.fc2, layer_norm2}``), so the generic key rule maps it once the ``vision_model.`` prefix
is stripped. Numerics: CLS + patch conv (no bias) + learned position table, a LayerNorm *before* the
encoder (``pre_layrnorm``), pre-LN blocks with ``quick_gelu`` (x·σ(1.702x)), every LayerNorm eps 1e-5.

Output (LLaVA ``select_layer=-2``, ``select_feature="patch"``): ``hidden_states[select_layer]`` with the
CLS token dropped. ``hidden_states[k]`` is the state after k encoder layers (k = 0: after
``pre_layrnorm``), so only the first k layers are built and run; the unused last layer and
``post_layernorm`` of a checkpoint are not parameters here (a converter skips them). UNKNOWN decided
here: FLOPs therefore exclude the final CLIP layer that HF/LLaVA computes and discards (~1/24 of CLIP).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError, hf_get
from calico_jax.models import layers


def quick_gelu(x: jax.Array) -> jax.Array:
    """HF ``quick_gelu`` (OpenAI CLIP's activation)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu}


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(Config):
    """Defaults: CLIP-ViT-L/14-336 (openai/clip-vit-large-patch14-336), LLaVA feature selection."""

    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = -2                 # index into hidden_states (LLaVA mm_vision_select_layer)
    remat: str = "none"                    # block rematerialisation policy (layers.REMAT_POLICIES)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"ClipVisionConfig: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if not 0 <= self.layers_used <= self.num_hidden_layers:
            raise ConfigError(f"ClipVisionConfig: select_layer {self.select_layer} outside the "
                              f"{self.num_hidden_layers + 1} hidden states")

    @property
    def layers_used(self) -> int:
        """Encoder layers before ``hidden_states[select_layer]``."""
        return self.select_layer if self.select_layer >= 0 else self.num_hidden_layers + 1 + self.select_layer

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_config(cls, cfg: Any, select_layer: int = -2) -> ClipVisionConfig:
        """From a ``CLIPVisionConfig`` (object or config.json dict)."""
        return cls(image_size=hf_get(cfg, "image_size", 224), patch_size=hf_get(cfg, "patch_size", 32),
                   num_channels=hf_get(cfg, "num_channels", 3), hidden_size=hf_get(cfg, "hidden_size", 768),
                   intermediate_size=hf_get(cfg, "intermediate_size", 3072),
                   num_hidden_layers=hf_get(cfg, "num_hidden_layers", 12),
                   num_attention_heads=hf_get(cfg, "num_attention_heads", 12),
                   hidden_act=hf_get(cfg, "hidden_act", "quick_gelu"),
                   layer_norm_eps=hf_get(cfg, "layer_norm_eps", 1e-5), select_layer=select_layer)


def _act(name: str):
    return ACTIVATIONS[name] if name in ACTIVATIONS else layers.activation(name)


class ClipAttention(nn.Module):
    """HF ``CLIPAttention``: biased q/k/v/out projections, head_dim**-0.5 scaling, no mask."""

    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, h = self.config.hidden_size, self.config.num_attention_heads
        q, k, v = (layers.split_heads(layers.dense(d, ("embed", "heads"), name=f"{n}_proj", dtype=self.dtype)(x), h)
                   for n in ("q", "k", "v"))
        out = layers.merge_heads(layers.attention(q, k, v))
        return layers.dense(d, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out)


class ClipBlock(nn.Module):
    """``x += attn(LN1(x)); x += fc2(act(fc1(LN2(x))))``."""

    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        eps = cfg.layer_norm_eps
        x = x + ClipAttention(cfg, self.dtype, name="self_attn")(
            layers.layer_norm(eps, name="layer_norm1", dtype=self.dtype)(x))
        return x + _Mlp(cfg, self.dtype, name="mlp")(layers.layer_norm(eps, name="layer_norm2", dtype=self.dtype)(x))


class _Mlp(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype)(_act(cfg.hidden_act)(x))


class _Encoder(nn.Module):
    """The first ``layers_used`` blocks of HF ``CLIPEncoder``."""

    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.layers_used):
            x = layers.remat_block(ClipBlock, self.config.remat)(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class ClipVision(nn.Module):
    """NHWC pixels ``[B, S, S, C]`` (S = ``image_size``, CLIP-normalised) -> patch features ``[B, P, D]``
    (P = (S/p)², ``hidden_states[select_layer]`` without CLS)."""

    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        if pixel_values.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"CLIP vision: expected {cfg.image_size}² pixels, got {pixel_values.shape[1:3]}")
        x = _Embeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = layers.layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", dtype=self.dtype)(x)
        return _Encoder(cfg, self.dtype, name="encoder")(x)[:, 1:]

    def dummy_inputs(self) -> dict[str, Any]:
        s = self.config.image_size
        return {"pixel_values": jnp.zeros((1, s, s, self.config.num_channels), jnp.float32)}


class _Embeddings(nn.Module):
    """HF ``CLIPVisionEmbeddings``: [CLS; conv patches] + position_embedding(arange(1 + P))."""

    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        d = cfg.hidden_size
        cls_emb = self.param("class_embedding", layers.param_init(nn.initializers.normal(0.02), ("embed",)), (d,))
        pos = nn.Embed(cfg.num_patches + 1, d, name="position_embedding",
                       embedding_init=layers.param_init(nn.initializers.normal(0.02), ("length", "embed")))
        x = layers.conv(d, cfg.patch_size, stride=cfg.patch_size, use_bias=False, name="patch_embedding",
                        dtype=self.dtype)(pixel_values.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, d)
        x = jnp.concatenate([jnp.broadcast_to(cls_emb.astype(x.dtype), (b, 1, d)), x], axis=1)
        return x + pos.embedding.astype(x.dtype)[None]
