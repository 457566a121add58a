"""The parts of a GLaMM / LISA checkpoint that CALICO reuses, as one model: ``glamm_parts``.

GLaMM (and LISA) = LLaVA-LLaMA + SAM + ``text_hidden_fcs`` (the [SEG] projection f_segmentation).
CALICO replaces LLaVA's CLIP tower / ``mm_projector`` (and GLaMM's ``region_encoder``) by the
BLIP-2 front end, so ``python -m convert glamm`` keeps only

* ``llm``: the LLaMA/Vicuna decoder with its added tokens (HF ``LlamaForCausalLM`` names),
* ``sam``: the grounding encoder (segment-anything names),
* ``text_hidden_fcs_0_0`` / ``text_hidden_fcs_0_2``: GLaMM's ``text_hidden_fcs.0.0`` / ``.0.2``
  (Linear D -> D, ReLU, Linear D -> C), or only ``_0_0`` (Linear D -> C) for ``seg_projection="linear"``.

The names are exactly those of the same parts of :class:`calico_jax.models.calico.Calico`, so
``python -m convert calico-assemble`` copies the subtrees unchanged. The forward is GLaMM's
grounding path without images in the LLM: ids -> LLM -> hidden state -> f_segmentation -> SAM prompt.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError
from calico_jax.models import layers
from calico_jax.models.llama import LlamaConfig, LlamaForCausalLM
from calico_jax.models.sam import Sam, SamConfig


@dataclasses.dataclass(frozen=True)
class GlammPartsConfig(Config):
    llm: LlamaConfig = LlamaConfig(vocab_size=32007)
    sam: SamConfig = SamConfig()
    seg_projection: str = "mlp"          # "mlp" (Linear-ReLU-Linear, GLaMM/LISA) | "linear"
    seg_token_id: int | None = None      # [SEG] id from the copied tokenizer files, when found

    def __post_init__(self):
        if self.seg_projection not in ("mlp", "linear"):
            raise ConfigError("GlammPartsConfig: seg_projection must be 'mlp' or 'linear', "
                              f"got {self.seg_projection!r}")


def seg_projection(llm_width: int, prompt_width: int, kind: str, dtype: Any) -> dict[str, nn.Module]:
    """f_segmentation's linears keyed by their ``nn.Sequential`` index (ReLU at 1, Dropout(0) at 3).

    Assigned in ``setup`` as ``self.text_hidden_fcs_0`` (GlammParts and Calico alike), flax names them
    ``text_hidden_fcs_0_0`` / ``text_hidden_fcs_0_2``: GLaMM's ``text_hidden_fcs.0.0`` / ``.0.2``."""
    if kind == "mlp":
        return {"0": layers.dense(llm_width, ("embed", "mlp"), name=None, dtype=dtype),
                "2": layers.dense(prompt_width, ("mlp", None), name=None, dtype=dtype)}
    return {"0": layers.dense(prompt_width, ("embed", None), name=None, dtype=dtype)}


def apply_seg_projection(fcs: dict[str, nn.Module], hidden: jax.Array, dtype: Any) -> jax.Array:
    """f_segmentation through :func:`seg_projection`'s linears: hidden [..., D] -> prompt [..., C]."""
    x = fcs["0"](hidden.astype(dtype))
    return fcs["2"](jax.nn.relu(x)) if "2" in fcs else x


class GlammParts(nn.Module):
    config: GlammPartsConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.llm = LlamaForCausalLM(cfg.llm, self.dtype)
        self.sam = Sam(cfg.sam, self.dtype)
        self.text_hidden_fcs_0 = seg_projection(cfg.llm.hidden_size, cfg.sam.prompt_encoder.embed_dim,
                                                cfg.seg_projection, self.dtype)

    def project_seg(self, hidden: jax.Array) -> jax.Array:
        """f_segmentation: hidden [..., D] -> SAM prompt embedding [..., C]."""
        return apply_seg_projection(self.text_hidden_fcs_0, hidden, self.dtype)

    def __call__(self, input_ids, attention_mask, pixel_values, points=None, labels=None, boxes=None,
                 masks=None) -> dict[str, jax.Array]:
        """The last token's final hidden state is the [SEG] prompt for each image's mask."""
        out = self.llm(input_ids, attention_mask)
        seg = self.project_seg(out.hidden_states[:, -1:])                                   # [B, 1, C]
        sam = self.sam(pixel_values, points=points, labels=labels, boxes=boxes, masks=masks, text_embeds=seg)
        return {"logits": out.logits, "seg_embeddings": seg, **sam}

    def dummy_inputs(self) -> dict[str, Any]:
        ids = jnp.asarray([[self.config.llm.bos_token_id, 3]], jnp.int32)
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
                **{k: v for k, v in Sam(self.config.sam, parent=None).dummy_inputs().items() if k != "text_embeds"}}
