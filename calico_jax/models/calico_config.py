"""The CALICO model config: the whole model in one typed, JSON-round-tripping section.

:class:`CalicoConfig` is ``ExperimentConfig.model`` (so every field is a ``--config.model.<path>`` override), it is
stored in every training workdir, checkpoint and exported model, and :class:`~calico_jax.models.calico.Calico`
reads nothing else: architecture (the towers' own configs), ablation switches (``image_path``, ``cem``, ``cam``,
``seg``), the pre-processing its inputs need (``preprocess``) and each tower's remat policy. The training recipe --
the loss and the trainable patterns -- is not part of it: it is ``ExperimentConfig.recipe``
(:class:`calico_jax.train.config.RecipeConfig`); a config written before that move still loads
(:meth:`CalicoConfig.from_dict` drops its ``loss`` and ``trainable``). ``docs/paper_map.md`` lists what each switch
decides and where its default comes from.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from calico_jax.core.config import Config, ConfigError
from calico_jax.core.preprocess import Preprocess
from calico_jax.models import image_paths, layers, scan
from calico_jax.models.blip2 import Blip2VisionConfig
from calico_jax.models.cam import CamConfig
from calico_jax.models.cem import CemConfig
from calico_jax.models.clip import ClipVisionConfig
from calico_jax.models.dinov2 import PRESETS as DINOV2_PRESETS
from calico_jax.models.dinov2 import Dinov2Config
from calico_jax.models.eva_vit import EvaVitConfig
from calico_jax.models.llama import LlamaConfig
from calico_jax.models.lora import LoraConfig
from calico_jax.models.qformer import QFormerConfig
from calico_jax.models.sam import SamConfig
from calico_jax.models.sam.config import (
    ImageEncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    TwoWayTransformerConfig,
)
from calico_jax.models.seg_routing import SegConfig

REMAT_TOWERS = ("vision", "dinov2", "qformer", "llm", "sam")
SCAN_TOWERS = ("vision", "dinov2", "llm")   # towers with a scan_layers switch (models/scan.py)
# Training-recipe fields a model config written before they moved to ExperimentConfig.recipe still holds.
LEGACY_FIELDS = ("loss", "trainable")


@dataclasses.dataclass(frozen=True)
class CalicoConfig(Config):
    """Defaults: InstructBLIP-Vicuna-7B vision, DINOv2 ViT-B/14 with 4 registers (the first author's
    ``dinov2_vitb14_reg``), Vicuna-7B (GLaMM vocabulary 32007,
    LoRA r=8 α=16 on q/v), SAM ViT-H, CAMs at {11, 22}. ``image_path="clip_mlp"``: the GLaMM/LLaVA image
    path instead (``clip`` patch tokens -> ``mm_projector`` Linear-GELU-Linear; no Q-Former, no CAMs).
    ``image_path="linear"``: the paper's "Q-Former replaced by a linear projection" ablation (all EVA
    tokens X_global -> ``linear_projection``; no CAMs, which re-query the Q-Former)."""

    vision: Blip2VisionConfig = Blip2VisionConfig()
    dinov2: Dinov2Config = Dinov2Config.from_original(**DINOV2_PRESETS["dinov2_vitb14_reg"])
    llm: LlamaConfig = LlamaConfig(vocab_size=32007, lora=LoraConfig())
    sam: SamConfig = SamConfig()
    cem: CemConfig = CemConfig()
    cam: CamConfig = CamConfig()
    seg: SegConfig = SegConfig()
    preprocess: Preprocess = Preprocess()                 # input sizes + normalisation (stored with the weights)
    image_token_index: int = -200
    image_path: str = "qformer"                           # image_paths: "qformer" (S_I = 32) | "clip_mlp" | "linear"
    clip: ClipVisionConfig = ClipVisionConfig()           # used by image_path="clip_mlp" only
    vocab_from_tokenizer: bool = False                    # training: llm.vocab_size := len(tokenizer) (from scratch)
    qformer_text_input: bool = False                      # InstructBLIP: the Q-Former of Eq. 2 also reads the prompt
    qformer_max_tokens: int = 128                         # its instruction length T_q (LAVIS max_txt_len)

    def __post_init__(self):
        for tower, policy in self.remat_policies().items():
            if policy not in layers.REMAT_POLICIES:
                raise ConfigError(f"CalicoConfig: unknown remat policy {policy!r} for the {tower} tower; "
                                  f"known: {sorted(layers.REMAT_POLICIES)}")
        image_paths.check_config(self)   # the image-path part's rules (name, CAMs, Q-Former text, input size)
        if self.vision.text_hidden_size != self.llm.hidden_size:
            raise ConfigError(f"CalicoConfig: vision.text_hidden_size {self.vision.text_hidden_size} != "
                              f"llm.hidden_size {self.llm.hidden_size}")
        bad = [i for i in self.cam.layers if i >= self.llm.num_hidden_layers]
        if bad:
            raise ConfigError(f"CalicoConfig: CAM layers {bad} outside 0..{self.llm.num_hidden_layers - 1}")
        if self.preprocess.sam_size != self.sam.image_encoder.img_size:
            raise ConfigError(f"CalicoConfig: preprocess.sam_size {self.preprocess.sam_size} != "
                              f"sam.image_encoder.img_size {self.sam.image_encoder.img_size}")
        if self.cem.enabled and self.cem.use_dinov2 and not self.preprocess.dinov2_size:
            raise ConfigError("CalicoConfig: the CEM reads DINOv2 features but preprocess.dinov2_size is 0")
        if self.cem.enabled and self.vision.vision.hidden_size % self.cem.num_heads:
            raise ConfigError(f"CalicoConfig: cem.num_heads {self.cem.num_heads} does not divide the EVA width "
                              f"{self.vision.vision.hidden_size}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> CalicoConfig:
        """:meth:`Config.from_dict`, dropping :data:`LEGACY_FIELDS`: ``loss`` and ``trainable`` were model fields
        before the training recipe moved to ``ExperimentConfig.recipe``, and the model configs written then
        (converted and exported checkpoints, a workdir's ``config.json`` and checkpoint ``meta``) carry them. The
        model never read them; a workdir's trainable patterns are also in its checkpoint ``meta["model"]
        ["trainable"]``, which restoring reads, and ``ExperimentConfig.from_dict`` moves both into ``recipe``."""
        return super().from_dict({k: v for k, v in data.items() if k not in LEGACY_FIELDS}, where)

    @classmethod
    def tiny(cls, **changes: Any) -> CalicoConfig:
        """A small consistent config for tests and demos (EVA 28 px -> 5 tokens, 4 queries, DINOv2 with a
        register at 42 px -> 11 tokens, a 4-layer LLaMA with LoRA and CAMs at {1, 3}, SAM at 32 px)."""
        eva = EvaVitConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4)
        qformer = QFormerConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                encoder_hidden_size=32, text_embeddings=True, text_ffn=True, vocab_size=50,
                                max_position_embeddings=16)
        llm = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                          lora=LoraConfig(r=4, alpha=8.0, dropout=0.0))
        sam = SamConfig(
            image_encoder=ImageEncoderConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                             mlp_ratio=2.0, out_chans=16, window_size=2, global_attn_indexes=(1,)),
            prompt_encoder=PromptEncoderConfig(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(32, 32),
                                               mask_in_chans=4),
            mask_decoder=MaskDecoderConfig(transformer_dim=16, iou_head_hidden_dim=16,
                                           transformer=TwoWayTransformerConfig(
                                               depth=2, embedding_dim=16, num_heads=2, mlp_dim=32)))
        base = cls(vision=Blip2VisionConfig(vision=eva, qformer=qformer, num_query_tokens=4, text_hidden_size=48),
                   dinov2=Dinov2Config(image_size=28, patch_size=14, hidden_size=24, num_hidden_layers=2,
                                       num_attention_heads=4, use_swiglu_ffn=False, num_register_tokens=1),
                   llm=llm, sam=sam, cem=CemConfig(num_heads=4), cam=CamConfig(layers=(1, 3)),
                   seg=SegConfig(token_id=60, identifier_ids=((61, 62), (61, 63), (61, 5, 59)), max_seg=4),
                   preprocess=Preprocess(blip_size=28, dinov2_size=42, dinov2_crop=42, sam_size=32, mask_size=40),
                   vocab_from_tokenizer=True, qformer_max_tokens=16)   # T_q <= the Q-Former's 16 positions
        return base.replace(**changes)

    def remat_policies(self) -> dict[str, str]:
        """Rematerialisation policy per tower (each tower config's ``remat`` field): ``vision`` = EVA blocks
        (CLIP blocks with ``image_path="clip_mlp"``), ``dinov2``, ``qformer``, ``llm`` = decoder layers, ``sam``
        = image-encoder blocks. Only towers the backward pass goes through (the LLM for LoRA, the Q-Former for
        the CAMs) save memory; the frozen encoders see no gradient."""
        return {"vision": self.vision.vision.remat, "clip": self.clip.remat, "dinov2": self.dinov2.remat,
                "qformer": self.vision.qformer.remat, "llm": self.llm.remat, "sam": self.sam.image_encoder.remat}

    def with_remat(self, **policies: str) -> CalicoConfig:
        """A copy with the named towers' policies set (``vision`` sets EVA and CLIP); see :meth:`remat_policies`."""
        unknown = sorted(set(policies) - set(REMAT_TOWERS))
        if unknown:
            raise ConfigError(f"with_remat: unknown tower(s) {unknown}; known: {list(REMAT_TOWERS)}")
        cfg, v = self, self.vision
        if "vision" in policies:
            v = v.replace(vision=v.vision.replace(remat=policies["vision"]))
            cfg = cfg.replace(clip=cfg.clip.replace(remat=policies["vision"]))
        if "qformer" in policies:
            v = v.replace(qformer=v.qformer.replace(remat=policies["qformer"]))
        cfg = cfg.replace(vision=v)
        if "dinov2" in policies:
            cfg = cfg.replace(dinov2=cfg.dinov2.replace(remat=policies["dinov2"]))
        if "llm" in policies:
            cfg = cfg.replace(llm=cfg.llm.replace(remat=policies["llm"]))
        if "sam" in policies:
            cfg = cfg.replace(sam=cfg.sam.replace(image_encoder=cfg.sam.image_encoder.replace(remat=policies["sam"])))
        return cfg

    def with_scan(self, on: bool = True, towers: tuple[str, ...] = SCAN_TOWERS) -> CalicoConfig:
        """A copy with ``scan_layers`` set to ``on`` for the named towers (``vision`` = EVA, ``dinov2``, ``llm``)."""
        unknown = sorted(set(towers) - set(SCAN_TOWERS))
        if unknown:
            raise ConfigError(f"with_scan: unknown tower(s) {unknown}; known: {list(SCAN_TOWERS)}")
        cfg = self
        if "vision" in towers:
            cfg = cfg.replace(vision=cfg.vision.replace(vision=cfg.vision.vision.replace(scan_layers=on)))
        if "dinov2" in towers:
            cfg = cfg.replace(dinov2=cfg.dinov2.replace(scan_layers=on))
        if "llm" in towers:
            cfg = cfg.replace(llm=cfg.llm.replace(scan_layers=on))
        return cfg

    @property
    def decoder(self) -> LlamaConfig:
        """The LLM config the model runs: ``llm``, with the CAM layers added to its ``scan_splits`` when it is
        scanned (a CAM runs between two scanned segments)."""
        if not self.llm.scan_layers:
            return self.llm
        return self.llm.replace(scan_splits=tuple(sorted(set(self.llm.scan_splits) | set(self.cam.layers))))

    def scan_stacks(self) -> list[scan.Stack]:
        """Every scanned layer stack of the params tree (:func:`calico_jax.models.scan.stack_layers`)."""
        return (self.decoder.scan_stacks(("llm",)) + self.vision.vision.scan_stacks(("vision_model",))
                + self.dinov2.scan_stacks(("dinov2",)))

    def for_tokenizer(self, vocab_size: int, seg_token_id: int) -> CalicoConfig:
        """The model config a training run uses with this tokenizer: its [SEG] id (routing is host-side, so no
        identifier ids) and, for a model whose vocabulary is smaller (a tiny model trained from scratch), its
        vocabulary size when ``vocab_from_tokenizer``. A tokenizer larger than the LLM's table is an error."""
        llm = self.llm
        if self.vocab_from_tokenizer:
            llm = llm.replace(vocab_size=vocab_size)
        elif vocab_size > llm.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens, the LLM's table {llm.vocab_size}")
        return self.replace(llm=llm, seg=self.seg.replace(identifier_ids=(), token_id=seg_token_id))

    @property
    def mask_size(self) -> tuple[int, int]:
        """Static (H_pad, W_pad) of the training masks (``preprocess.mask_size`` squared)."""
        return self.preprocess.mask_size, self.preprocess.mask_size

    @property
    def num_image_tokens(self) -> int:
        """S_I: visual tokens per image in the LLM sequence."""
        return image_paths.for_config(self).num_tokens(self)
