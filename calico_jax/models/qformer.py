"""Q-Former 𝓠 (HF ``Blip2QFormerModel`` / ``InstructBlipQFormerModel``): learned queries q read X_global.

A BERT encoder with **post-LN** layers (LN eps 1e-12). Each layer runs bidirectional self-attention
over ``[queries ; instruction text]``; then the query part alone goes through cross-attention to
the image tokens X_global (layers with ``idx % cross_attention_frequency == 0``) and the
query-only FFN (``intermediate_query`` / ``output_query``), while the text part (InstructBLIP) goes
through its own FFN (``intermediate`` / ``output``). There is no final LayerNorm.

Parameter names are HF's (the ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` state dicts). The one
naming difference between the two HF classes is the embedding LayerNorm: BLIP-2 keeps it at the top level
(``layernorm``), InstructBLIP inside ``embeddings`` (``embeddings.layernorm``, beside
``word_embeddings``/``position_embeddings``); ``text_embeddings`` selects which. ``text_ffn`` adds the
per-layer text FFN (always on for InstructBLIP; HF BLIP-2's ``use_qformer_text_input``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError, hf_get
from calico_jax.models import layers

MODEL_TYPES = ("blip_2_qformer", "instructblip_qformer")


@dataclasses.dataclass(frozen=True)
class QFormerConfig(Config):
    """Defaults: the BLIP-2 Q-Former (BERT-base, cross-attention every 2nd layer, EVA-g width 1408)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    text_embeddings: bool = False   # InstructBLIP: embeddings.{word,position}_embeddings + embeddings.layernorm
    text_ffn: bool = False          # per-layer intermediate/output for the text tokens
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    remat: str = "none"             # layer rematerialisation policy (layers.REMAT_POLICIES)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"QFormerConfig: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.cross_attention_frequency < 1:
            raise ConfigError(f"QFormerConfig: cross_attention_frequency must be >= 1, "
                              f"got {self.cross_attention_frequency}")
        if self.text_embeddings and not self.text_ffn:
            raise ConfigError("QFormerConfig: text_embeddings needs text_ffn (text tokens need their FFN)")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @classmethod
    def from_hf_config(cls, cfg: Any) -> QFormerConfig:
        """From a ``Blip2QFormerConfig`` / ``InstructBlipQFormerConfig`` (object or config.json dict)."""
        model_type = hf_get(cfg, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"qformer config: unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")
        instruct = model_type == "instructblip_qformer"
        return cls(hidden_size=hf_get(cfg, "hidden_size", 768), num_hidden_layers=hf_get(cfg, "num_hidden_layers", 12),
                   num_attention_heads=hf_get(cfg, "num_attention_heads", 12),
                   intermediate_size=hf_get(cfg, "intermediate_size", 3072),
                   hidden_act=hf_get(cfg, "hidden_act", "gelu"),
                   layer_norm_eps=hf_get(cfg, "layer_norm_eps", 1e-12),
                   cross_attention_frequency=hf_get(cfg, "cross_attention_frequency", 2),
                   encoder_hidden_size=hf_get(cfg, "encoder_hidden_size", 1408), text_embeddings=instruct,
                   text_ffn=instruct or bool(hf_get(cfg, "use_qformer_text_input", False)),
                   vocab_size=hf_get(cfg, "vocab_size", 30522),
                   max_position_embeddings=hf_get(cfg, "max_position_embeddings", 512))

    @classmethod
    def from_lavis(cls, vision_width: int = 1408, cross_attention_freq: int = 2, qformer_text_input: bool = False,
                   hidden_size: int = 768, num_hidden_layers: int = 12, num_attention_heads: int = 12,
                   intermediate_size: int = 3072, layer_norm_eps: float = 1e-12, vocab_size: int = 30523,
                   max_position_embeddings: int = 512, hidden_act: str = "gelu") -> QFormerConfig:
        """From LAVIS ``Blip2Base.init_Qformer(num_query_token, vision_width, cross_attention_freq)`` and
        the ``BertConfig`` fields it reads (bert-base-uncased defaults); ``qformer_text_input`` as in
        ``Blip2VicunaInstruct`` (False: the text embeddings and text FFN were deleted)."""
        return cls(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                   num_attention_heads=num_attention_heads,
                   intermediate_size=intermediate_size, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
                   cross_attention_frequency=cross_attention_freq, encoder_hidden_size=vision_width,
                   text_embeddings=qformer_text_input, text_ffn=qformer_text_input, vocab_size=vocab_size,
                   max_position_embeddings=max_position_embeddings)


class QFormerMultiHeadAttention(nn.Module):
    """Separate query/key/value Linears; key/value read ``encoder_hidden_size`` when cross-attending."""

    config: QFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array | None) -> jax.Array:
        d, h = self.config.hidden_size, self.config.num_attention_heads
        proj = lambda name: layers.dense(d, ("embed", "heads"), name=name, dtype=self.dtype)  # noqa: E731
        q, k, v = (layers.split_heads(proj(n)(t), h) for n, t in (("query", x), ("key", kv), ("value", kv)))
        return layers.merge_heads(layers.attention(q, k, v, mask=mask))


class QFormerSelfOutput(nn.Module):
    """BERT post-LN residual: ``LN(dense(x) + residual)``; ``dense`` maps ``in_features`` -> hidden."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    axes: tuple[str, str] = ("heads", "embed")

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        x = layers.dense(self.config.hidden_size, self.axes, name="dense", dtype=self.dtype)(x)
        return layers.layer_norm(self.config.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(x + residual)


class QFormerAttention(nn.Module):
    config: QFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array | None) -> jax.Array:
        out = QFormerMultiHeadAttention(self.config, self.dtype, name="attention")(x, kv, mask)
        return QFormerSelfOutput(self.config, self.dtype, name="output")(out, x)


class QFormerIntermediate(nn.Module):
    config: QFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.dense(self.config.intermediate_size, ("embed", "mlp"), name="dense", dtype=self.dtype)(x)
        return layers.activation(self.config.hidden_act)(x)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, image: jax.Array, num_query: int, self_mask: jax.Array | None,
                 image_mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        a = QFormerAttention(cfg, self.dtype, name="attention")(h, h, self_mask)
        q, t = a[:, :num_query], a[:, num_query:]
        if cfg.has_cross_attention(self.index):
            q = QFormerAttention(cfg, self.dtype, name="crossattention")(q, image, image_mask)
        q = self.feed_forward(q, "_query")
        if cfg.text_ffn:  # also on zero text tokens, so init creates the text FFN of BLIP-2 text-input configs
            return jnp.concatenate([q, self.feed_forward(t, "")], axis=1)
        if t.shape[1]:
            raise ValueError("text tokens given to a Q-Former without the text FFN (text_ffn=False)")
        return q

    def feed_forward(self, x: jax.Array, suffix: str) -> jax.Array:
        """``intermediate{suffix}`` + ``output{suffix}``: one post-LN FFN (query or text tokens)."""
        hid = QFormerIntermediate(self.config, self.dtype, name=f"intermediate{suffix}")(x)
        return QFormerSelfOutput(self.config, self.dtype, ("mlp", "embed"), name=f"output{suffix}")(hid, x)


class QFormerEmbeddings(nn.Module):
    """InstructBLIP: ``LN(cat(queries, word_emb(ids) + pos_emb(arange(T))))``."""

    config: QFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query_embeds: jax.Array, input_ids: jax.Array | None) -> jax.Array:
        cfg = self.config
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="word_embeddings",
                        embedding_init=layers.param_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embeddings",
                       embedding_init=layers.param_init(nn.initializers.normal(0.02), ("length", "embed")))
        x = query_embeds.astype(self.dtype)
        if input_ids is not None:
            t = input_ids.shape[1]
            if t > cfg.max_position_embeddings:
                raise ValueError(f"instruction length {t} exceeds max_position_embeddings "
                                 f"{cfg.max_position_embeddings}")
            text = word(input_ids) + pos(jnp.arange(t))[None]
            x = jnp.concatenate([x, text.astype(x.dtype)], axis=1)
        return layers.layer_norm(cfg.layer_norm_eps, name="layernorm", dtype=self.dtype)(x)


class QFormerEncoder(nn.Module):
    config: QFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, image, num_query, self_mask, image_mask):
        block = layers.remat_block(QFormerLayer, self.config.remat, static_argnums=(3,))   # num_query: an int
        for i in range(self.config.num_hidden_layers):
            h = block(self.config, i, self.dtype, name=f"layer_{i}")(h, image, num_query, self_mask, image_mask)
        return h


class QFormer(nn.Module):
    """𝓠(q, X_global[, instruction]) -> ``last_hidden_state [B, Q (+T), hidden]``.

    ``query_embeds``: the query tokens q, ``[B, Q, hidden]``. ``encoder_hidden_states``: X_global,
    ``[B, S, encoder_hidden_size]``. ``input_ids``/``attention_mask`` (InstructBLIP only): instruction
    tokens ``[B, T]`` and their padding mask ``[B, T]`` (1 = real token); queries are never masked,
    padded text tokens are hidden from every token (as HF's ``cat(ones(Q), qformer_attention_mask)``).
    ``encoder_attention_mask`` ``[B, S]`` optionally hides image tokens (HF passes all ones).
    """

    config: QFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query_embeds: jax.Array, encoder_hidden_states: jax.Array,
                 input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 encoder_attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        b, num_query = query_embeds.shape[:2]
        if cfg.text_embeddings:
            h = QFormerEmbeddings(cfg, self.dtype, name="embeddings")(query_embeds, input_ids)
        else:
            if input_ids is not None:
                raise ValueError("input_ids given to a Q-Former without text embeddings (BLIP-2 layout)")
            norm = layers.layer_norm(cfg.layer_norm_eps, name="layernorm", dtype=self.dtype)
            h = norm(query_embeds.astype(self.dtype))
        if attention_mask is not None and input_ids is None:
            raise ValueError("attention_mask masks instruction tokens; it needs input_ids")
        self_mask = None
        if attention_mask is not None:
            keys = jnp.concatenate([jnp.ones((b, num_query), bool), attention_mask.astype(bool)], axis=1)
            self_mask = keys[:, None, None, :]
        image_mask = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)[:, None, None, :]
        image = encoder_hidden_states.astype(self.dtype)
        return QFormerEncoder(cfg, self.dtype, name="encoder")(h, image, num_query, self_mask, image_mask)

    def dummy_inputs(self) -> dict[str, Any]:
        cfg = self.config
        out = {"query_embeds": jnp.zeros((1, 1, cfg.hidden_size), jnp.float32),
               "encoder_hidden_states": jnp.zeros((1, 1, cfg.encoder_hidden_size), jnp.float32)}
        if cfg.text_embeddings:
            out["input_ids"] = jnp.zeros((1, 1), jnp.int32)
        return out
