"""SAM configs: image encoder 𝓖, prompt encoder and mask decoder 𝓓 (TwoWayTransformer inside).

Field names follow the segment-anything constructor arguments (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder``, ``TwoWayTransformer``); the extra fields carry what the original hard-codes but
HF ``SamModel`` makes configurable (LayerNorm epsilons, activations, an explicit MLP width).
Defaults are SAM ViT-H as built by ``segment_anything/build_sam.py`` (the GLaMM / LISA encoder).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from calico_jax.core.config import Config, ConfigError, hf_get


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig(Config):
    """``ImageEncoderViT`` arguments (ViTDet-style backbone with windowed + global attention)."""

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    mlp_dim: int | None = None        # HF vision_config.mlp_dim; None: int(embed_dim * mlp_ratio)
    norm_eps: float = 1e-6            # block norm1/norm2 (build_sam passes LayerNorm(eps=1e-6))
    neck_norm_eps: float = 1e-6       # LayerNorm2d in the neck
    act: str = "gelu"                 # exact erf GELU
    remat: str = "none"               # block rematerialisation policy (calico_jax.models.layers.REMAT_POLICIES)
    # How attention adds the decomposed relative positions: "blocked" never materialises the
    # [B*heads, T, T] bias (logits built tile by tile, each <= attention_block_bytes of float32; 2.5-4x
    # faster on CPU, see bench/results/sam_opt.md); "dense" adds the full bias like segment-anything.
    rel_pos_attention: str = "blocked"
    attention_block_bytes: int = 2**21

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else int(self.embed_dim * self.mlp_ratio)

    def block_window(self, i: int) -> int:
        """Window size of block ``i`` (0 = global attention)."""
        return 0 if i in self.global_attn_indexes else self.window_size


@dataclasses.dataclass(frozen=True)
class PromptEncoderConfig(Config):
    """``PromptEncoder`` arguments."""

    embed_dim: int = 256
    image_embedding_size: tuple[int, int] = (64, 64)
    input_image_size: tuple[int, int] = (1024, 1024)
    mask_in_chans: int = 16
    mask_norm_eps: float = 1e-6       # LayerNorm2d in mask_downscaling
    act: str = "gelu"


@dataclasses.dataclass(frozen=True)
class TwoWayTransformerConfig(Config):
    """``TwoWayTransformer`` arguments."""

    depth: int = 2
    embedding_dim: int = 256
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    act: str = "relu"
    norm_eps: float = 1e-5            # norm1..4: plain nn.LayerNorm in the original; HF: layer_norm_eps
    final_norm_eps: float = 1e-5      # norm_final_attn (nn.LayerNorm default in both)


@dataclasses.dataclass(frozen=True)
class MaskDecoderConfig(Config):
    """``MaskDecoder`` arguments plus its transformer."""

    transformer_dim: int = 256
    transformer: TwoWayTransformerConfig = TwoWayTransformerConfig()
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    upscale_norm_eps: float = 1e-6    # LayerNorm2d in output_upscaling

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1


# Constructor defaults of the original classes, for keys a --config JSON leaves out.
_ORIGINAL_DEFAULTS = {
    "image_encoder": dict(img_size=1024, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                          mlp_ratio=4.0, out_chans=256, qkv_bias=True, use_abs_pos=True, use_rel_pos=False,
                          window_size=0, global_attn_indexes=()),
    "mask_decoder": dict(num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256),
    "transformer": dict(attention_downsample_rate=2),
}
# Constructor arguments that only affect initialisation.
_INIT_ONLY = {"image_encoder": ("rel_pos_zero_init",)}


def _sub(cls: type[Config], data: Any, what: str) -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError(f"SAM config: {what!r} must be an object of constructor arguments")
    kwargs = dict(_ORIGINAL_DEFAULTS.get(what, {}))
    kwargs.update({k: v for k, v in data.items() if k not in _INIT_ONLY.get(what, ())})
    return cls.from_dict(kwargs, where=f"SAM config {what}")


def _preset(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: list[int]) -> dict[str, Any]:
    return {
        "image_encoder": dict(depth=depth, embed_dim=embed_dim, img_size=1024, mlp_ratio=4, num_heads=num_heads,
                              patch_size=16, qkv_bias=True, use_rel_pos=True,
                              global_attn_indexes=global_attn_indexes, window_size=14, out_chans=256),
        "prompt_encoder": dict(embed_dim=256, image_embedding_size=[64, 64], input_image_size=[1024, 1024],
                               mask_in_chans=16),
        "mask_decoder": dict(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                             iou_head_hidden_dim=256,
                             transformer=dict(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)),
    }


# segment_anything/build_sam.py
PRESETS: dict[str, dict[str, Any]] = {
    "vit_b": _preset(768, 12, 12, [2, 5, 8, 11]),
    "vit_l": _preset(1024, 24, 16, [5, 11, 17, 23]),
    "vit_h": _preset(1280, 32, 16, [7, 15, 23, 31]),
}


@dataclasses.dataclass(frozen=True)
class SamConfig(Config):
    """Segment Anything: image encoder 𝓖, prompt encoder and mask decoder 𝓓."""

    image_encoder: ImageEncoderConfig = ImageEncoderConfig()
    prompt_encoder: PromptEncoderConfig = PromptEncoderConfig()
    mask_decoder: MaskDecoderConfig = MaskDecoderConfig()

    def __post_init__(self):
        ie, pe, md = self.image_encoder, self.prompt_encoder, self.mask_decoder
        dims = {"image_encoder.out_chans": ie.out_chans, "prompt_encoder.embed_dim": pe.embed_dim,
                "mask_decoder.transformer_dim": md.transformer_dim,
                "mask_decoder.transformer.embedding_dim": md.transformer.embedding_dim}
        if len(set(dims.values())) != 1:
            raise ConfigError(f"SAM config: these widths must be equal: {dims}")
        if tuple(pe.image_embedding_size) != (ie.grid, ie.grid):
            raise ConfigError(f"SAM config: prompt_encoder.image_embedding_size {tuple(pe.image_embedding_size)} "
                              f"!= image-encoder grid {(ie.grid, ie.grid)} (img_size // patch_size)")
        if ie.embed_dim % ie.num_heads:
            raise ConfigError(f"SAM config: image_encoder.num_heads {ie.num_heads} must divide "
                              f"embed_dim {ie.embed_dim}")
        t = md.transformer
        if (t.embedding_dim // t.attention_downsample_rate) % t.num_heads:
            raise ConfigError(f"SAM config: transformer.num_heads {t.num_heads} must divide "
                              f"embedding_dim // attention_downsample_rate")
        if ie.rel_pos_attention not in ("blocked", "dense"):
            raise ConfigError(f"SAM config: image_encoder.rel_pos_attention {ie.rel_pos_attention!r} "
                              f"must be 'blocked' or 'dense'")
        bad = [i for i in ie.global_attn_indexes if not 0 <= i < ie.depth]
        if bad:
            raise ConfigError(f"SAM config: global_attn_indexes {bad} outside 0..{ie.depth - 1}")

    @classmethod
    def from_original(cls, data: Mapping[str, Any]) -> SamConfig:
        """From ``{"image_encoder": {ImageEncoderViT kwargs}, "prompt_encoder": {PromptEncoder kwargs},
        "mask_decoder": {MaskDecoder kwargs, "transformer": {TwoWayTransformer kwargs}}}``.

        Missing keys take the original constructors' defaults, except the block LayerNorm eps which
        JSON cannot express as ``norm_layer``: 1e-6 as in every ``build_sam_*`` (override: ``norm_eps``).
        """
        if not isinstance(data, Mapping):
            raise ConfigError("SAM config: expected a JSON object")
        unknown = sorted(set(data) - {"image_encoder", "prompt_encoder", "mask_decoder"})
        missing = sorted({"image_encoder", "prompt_encoder", "mask_decoder"} - set(data))
        if unknown or missing:
            raise ConfigError(f"SAM config: expected keys image_encoder, prompt_encoder, mask_decoder "
                              f"(unknown {unknown}, missing {missing})")
        md = dict(data["mask_decoder"]) if isinstance(data["mask_decoder"], Mapping) else data["mask_decoder"]
        if isinstance(md, dict):
            if "transformer" not in md:
                raise ConfigError("SAM config: mask_decoder.transformer (TwoWayTransformer kwargs) is missing")
            if not isinstance(md["transformer"], Mapping):
                raise ConfigError("SAM config: mask_decoder.transformer must be an object of TwoWayTransformer kwargs")
            md["transformer"] = {**_ORIGINAL_DEFAULTS["transformer"], **md["transformer"]}
        return cls(image_encoder=_sub(ImageEncoderConfig, data["image_encoder"], "image_encoder"),
                   prompt_encoder=_sub(PromptEncoderConfig, data["prompt_encoder"], "prompt_encoder"),
                   mask_decoder=_sub(MaskDecoderConfig, md, "mask_decoder"))

    @classmethod
    def preset(cls, name: str) -> SamConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown SAM preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_original(PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: Any) -> SamConfig:
        """From a transformers ``SamConfig`` (object or config.json dict).

        HF numerics differ from the original in two places, reproduced here: the TwoWay block norms
        use ``mask_decoder_config.layer_norm_eps`` (original: 1e-5) and mask_downscaling uses
        ``prompt_encoder_config.layer_norm_eps``. HF's neck, upscaling LN and ``norm_final_attn`` keep
        their fixed eps (1e-6, 1e-6, 1e-5), as in the original.
        """
        v = hf_get(cfg, "vision_config", None) or {}
        p = hf_get(cfg, "prompt_encoder_config", None) or {}
        m = hf_get(cfg, "mask_decoder_config", None) or {}
        img, patch = hf_get(v, "image_size", 1024), hf_get(v, "patch_size", 16)
        p_img, p_patch = hf_get(p, "image_size", 1024), hf_get(p, "patch_size", 16)
        if not all(isinstance(x, int) for x in (img, patch, p_img, p_patch)):
            raise ConfigError("HF SamConfig: only square integer image_size / patch_size are supported")
        hidden = hf_get(v, "hidden_size", 768)
        p_hidden = hf_get(p, "hidden_size", 256)
        if hf_get(v, "num_pos_feats", 128) * 2 != p_hidden:
            raise ConfigError(f"HF SamConfig: vision_config.num_pos_feats ({hf_get(v, 'num_pos_feats', 128)}) "
                              f"must be prompt_encoder_config.hidden_size // 2 ({p_hidden // 2})")
        mlp_ratio = hf_get(v, "mlp_ratio", 4.0)
        image_encoder = ImageEncoderConfig(
            img_size=img, patch_size=patch, in_chans=hf_get(v, "num_channels", 3), embed_dim=hidden,
            depth=hf_get(v, "num_hidden_layers", 12), num_heads=hf_get(v, "num_attention_heads", 12),
            mlp_ratio=float(mlp_ratio), out_chans=hf_get(v, "output_channels", 256),
            qkv_bias=hf_get(v, "qkv_bias", True), use_abs_pos=hf_get(v, "use_abs_pos", True),
            use_rel_pos=hf_get(v, "use_rel_pos", True), window_size=hf_get(v, "window_size", 14),
            global_attn_indexes=tuple(hf_get(v, "global_attn_indexes", (2, 5, 8, 11))),
            mlp_dim=hf_get(v, "mlp_dim", None) or int(hidden * mlp_ratio),
            norm_eps=float(hf_get(v, "layer_norm_eps", 1e-6)), neck_norm_eps=1e-6,
            act=hf_get(v, "hidden_act", "gelu"))
        emb = p_img // p_patch
        prompt_encoder = PromptEncoderConfig(
            embed_dim=p_hidden, image_embedding_size=(emb, emb), input_image_size=(p_img, p_img),
            mask_in_chans=hf_get(p, "mask_input_channels", 16),
            mask_norm_eps=float(hf_get(p, "layer_norm_eps", 1e-6)), act=hf_get(p, "hidden_act", "gelu"))
        if hf_get(p, "num_point_embeddings", 4) != 4:
            raise ConfigError("HF SamConfig: prompt_encoder_config.num_point_embeddings must be 4")
        m_hidden = hf_get(m, "hidden_size", 256)
        mask_decoder = MaskDecoderConfig(
            transformer_dim=m_hidden,
            transformer=TwoWayTransformerConfig(
                depth=hf_get(m, "num_hidden_layers", 2), embedding_dim=m_hidden,
                num_heads=hf_get(m, "num_attention_heads", 8), mlp_dim=hf_get(m, "mlp_dim", 2048),
                attention_downsample_rate=hf_get(m, "attention_downsample_rate", 2),
                act=hf_get(m, "hidden_act", "relu"), norm_eps=float(hf_get(m, "layer_norm_eps", 1e-6)),
                final_norm_eps=1e-5),
            num_multimask_outputs=hf_get(m, "num_multimask_outputs", 3),
            iou_head_depth=hf_get(m, "iou_head_depth", 3),
            iou_head_hidden_dim=hf_get(m, "iou_head_hidden_dim", 256), upscale_norm_eps=1e-6)
        return cls(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
