"""CALICO's vision module: 𝓒 (EVA ViT-g) -> 𝓠 (Q-Former with query tokens q) -> f_image (Linear).

For each image, X_global = 𝓒(image) (all ``1 + N`` tokens after ``post_layernorm``); the Q-Former
reads it with the learned query tokens q (and, for InstructBLIP, the instruction text); the query
outputs go through ``language_projection`` (f_image) to the LLM width: ``num_query_tokens`` (32)
visual tokens per image. This is HF's ``Blip2ForConditionalGeneration.get_image_features`` /
``InstructBlipForConditionalGeneration.get_image_features`` without the language model.

Parameter names mirror the HF full model: ``vision_model/...``, ``qformer/...``, ``query_tokens``,
``language_projection``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError, hf_get
from calico_jax.models import layers
from calico_jax.models.eva_vit import EvaVit, EvaVitConfig
from calico_jax.models.qformer import QFormer, QFormerConfig

# config.json model_type of the HF full models this module mirrors.
HF_MODEL_TYPES = {"blip-2": "blip_2_qformer", "instructblip": "instructblip_qformer"}


@dataclasses.dataclass(frozen=True)
class Blip2VisionConfig(Config):
    """Defaults: InstructBLIP Vicuna-7B (EVA ViT-g, Q-Former with instruction input, 32 queries, 4096)."""

    vision: EvaVitConfig = EvaVitConfig()
    qformer: QFormerConfig = QFormerConfig(text_embeddings=True, text_ffn=True)
    num_query_tokens: int = 32
    text_hidden_size: int = 4096   # LLM width: language_projection's output

    def __post_init__(self):
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ConfigError(f"Blip2VisionConfig: qformer.encoder_hidden_size {self.qformer.encoder_hidden_size} "
                              f"!= vision.hidden_size {self.vision.hidden_size}")

    def scan_stacks(self) -> list:
        """The EVA block stack when it is scanned (:func:`calico_jax.models.scan.stack_layers`)."""
        return self.vision.scan_stacks(("vision_model",))

    @classmethod
    def from_hf_config(cls, cfg: Any) -> Blip2VisionConfig:
        """From a ``Blip2Config`` / ``InstructBlipConfig`` (object or config.json dict)."""
        model_type = hf_get(cfg, "model_type", None)
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(f"config.json model_type {model_type!r} is not a BLIP-2 family model; expected "
                              f"one of {sorted(HF_MODEL_TYPES)} (Blip2ForConditionalGeneration / "
                              "InstructBlipForConditionalGeneration)")
        vision = EvaVitConfig.from_hf_config(hf_get(cfg, "vision_config", {}))
        qcfg = hf_get(cfg, "qformer_config", {})
        qcfg = dict(qcfg) if isinstance(qcfg, dict) else qcfg.to_dict()
        qcfg.setdefault("model_type", HF_MODEL_TYPES[model_type])
        if qcfg["model_type"] != HF_MODEL_TYPES[model_type]:
            raise ConfigError(f"config.json: qformer_config.model_type {qcfg['model_type']!r} does not belong "
                              f"to a {model_type!r} model (expected {HF_MODEL_TYPES[model_type]!r})")
        # Blip2Config.__post_init__ ties the cross-attention width to the vision width.
        qformer = QFormerConfig.from_hf_config(qcfg).replace(encoder_hidden_size=vision.hidden_size)
        text = hf_get(cfg, "text_config", None)
        if text is None:
            raise ConfigError("config.json has no text_config (needed for the language_projection width)")
        return cls(vision=vision, qformer=qformer, num_query_tokens=hf_get(cfg, "num_query_tokens", 32),
                   text_hidden_size=hf_get(text, "hidden_size"))


# q ~ N(0, 0.02) as HF initialises ``query_tokens``; [1, Q, D_q] with the query axis named "length".
QUERY_TOKENS_INIT = layers.param_init(nn.initializers.normal(0.02), (None, "length", "embed"))


def query_tokens_shape(cfg: Blip2VisionConfig) -> tuple[int, int, int]:
    return 1, cfg.num_query_tokens, cfg.qformer.hidden_size


def vision_parts(cfg: Blip2VisionConfig, dtype: Any) -> tuple[EvaVit, QFormer, nn.Dense]:
    """𝓒, 𝓠 and f_image for a parent's ``setup`` to assign as ``vision_model``, ``qformer`` and
    ``language_projection`` (HF's names; :class:`Blip2Vision` and CALICO share them)."""
    # The Q-Former always runs in float32, as HF keeps it (`_keep_in_fp32_modules`): it is small
    # and its post-LN stack with eps 1e-12 is sensitive to low precision.
    qformer = QFormer(cfg.qformer, jnp.float32)
    # kernel [D_q, D_llm]: only the LLM-width side is named (the Q-Former side is small).
    projection = layers.dense(cfg.text_hidden_size, (None, "embed"), name=None, dtype=dtype)
    return EvaVit(cfg.vision, dtype), qformer, projection


def image_features(vision_model: EvaVit, qformer: QFormer, query_tokens: jax.Array, language_projection: nn.Dense,
                   pixel_values: jax.Array, *, dtype: Any, input_ids: jax.Array | None = None,
                   attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """The BLIP-2 image path on bound parts (see :func:`vision_parts`): X_global = 𝓒(image),
    𝓠(q, X_global [, instruction]) -> the Q query outputs -> f_image. Returns :class:`Blip2Vision`'s dict."""
    vis = vision_model(pixel_values)
    x_global = vis["last_hidden_state"]
    q = jnp.broadcast_to(query_tokens, (x_global.shape[0], *query_tokens.shape[1:]))
    h = qformer(q, x_global, input_ids=input_ids, attention_mask=attention_mask)
    query_output = h[:, :query_tokens.shape[1]].astype(dtype)
    return {"vision": x_global, "pooler_output": vis["pooler_output"], "query_output": query_output,
            "image_tokens": language_projection(query_output)}


class Blip2Vision(nn.Module):
    """Images (NHWC) [+ instruction] -> ``{"vision": X_global [B, 1+N, D_vis], "pooler_output",
    "query_output": [B, Q, D_q], "image_tokens": f_image(query_output) [B, Q, D_llm]}``.

    ``input_ids`` / ``attention_mask`` are the Q-Former instruction tokens and padding mask
    ``[B, T]`` (InstructBLIP; omit for BLIP-2).
    """

    config: Blip2VisionConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.vision_model, self.qformer, self.language_projection = vision_parts(self.config, self.dtype)
        self.query_tokens = self.param("query_tokens", QUERY_TOKENS_INIT, query_tokens_shape(self.config))

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        return image_features(self.vision_model, self.qformer, self.query_tokens, self.language_projection,
                              pixel_values, dtype=self.dtype, input_ids=input_ids, attention_mask=attention_mask)

    def dummy_inputs(self) -> dict[str, Any]:
        v = self.config.vision
        out = {"pixel_values": jnp.zeros((1, v.patch_size, v.patch_size, v.num_channels), jnp.float32)}
        if self.config.qformer.text_embeddings:
            out["input_ids"] = jnp.zeros((1, 1), jnp.int32)
        return out
