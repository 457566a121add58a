"""``lavis-blip2``: a LAVIS BLIP-2 / InstructBLIP checkpoint (one .pth/.pt/.safetensors file, no
config.json) -> ``blip2_vision``.

LAVIS names (``lavis/models/eva_vit.py`` and ``blip2.py``): ``visual_encoder.*`` (EVA ViT, ``attn.q_bias`` /
``attn.v_bias``), ``ln_vision`` (eps 1e-5), ``Qformer.bert.*`` (``attention.self.*``,
``embeddings.LayerNorm``), ``query_tokens``, ``llm_proj`` | ``opt_proj`` | ``t5_proj``. Skipped with a
reason: ``llm_model.*`` / ``opt_model.*`` / ``t5_model.*`` (the LLM), ``Qformer.bert.embeddings.position_ids``
(a buffer), the stage-1 heads (``Qformer.cls``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``), and
``visual_encoder.blocks.N`` with N >= an explicitly given depth (LAVIS loads ``eva_vit_g.pth`` with
``strict=False``: BLIP-2 drops EVA-CLIP-g's 40th block). The ViT, Q-Former and projection must be in
the one file (LAVIS's ``*_trimmed.pth`` files hold no ViT: merge ``eva_vit_g.pth`` under
``visual_encoder.`` first).

``--config``: a preset name (:data:`PRESETS`) or a JSON file of the original constructor arguments::

    {"vision":  {"img_size": 224, "patch_size": 14, "embed_dim": 1408, "depth": 39, "num_heads": 16,
                 "mlp_ratio": 4.3637, "qkv_bias": true, "in_chans": 3,
                 "layer_norm_eps": 1e-6, "ln_vision_eps": 1e-5},
     "qformer": {"num_query_token": 32, "cross_attention_freq": 2, "qformer_text_input": true,
                 "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "layer_norm_eps": 1e-12, "vocab_size": 30523,
                 "max_position_embeddings": 512},
     "llm_hidden_size": 4096}

(``vision``: ``eva_vit.VisionTransformer`` / ``create_eva_vit_g`` arguments plus the two LayerNorm
eps; ``qformer``: ``Blip2Base.init_Qformer(num_query_token, vision_width, cross_attention_freq)``, the
``BertConfig`` fields it uses, and ``Blip2VicunaInstruct``'s ``qformer_text_input``;
``llm_hidden_size``: the projection's output width.) Every field may be left out when the tensor
shapes determine it -- all but the two head counts, which are then required; the eps default to
LAVIS's values. Without ``--config`` everything is inferred and the head counts are missing.

``--verify``: the HF model after the public LAVIS -> HF renaming (transformers'
``convert_{blip_2,instructblip}_original_to_pytorch.py``: prefix renames, ``attention.self`` ->
``attention.attention``, ``qkv.bias = cat(q_bias, 0, v_bias)``) loaded into an HF
``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration`` built from this plan's
config (stub language model), with ``post_layernorm.eps`` patched to ``ln_vision``'s 1e-5.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError, load_json_arg
from calico_jax.core.config import ConfigError
from calico_jax.models.blip2 import Blip2VisionConfig
from calico_jax.models.eva_vit import EvaVitConfig
from calico_jax.models.qformer import QFormerConfig
from convert.families import Family
from convert.families.blip2 import LLM_REASON, compare_image_features, random_inputs
from convert.mapping import Plan, Skip, apply_rules

_EVA_G = {"img_size": 224, "patch_size": 14, "embed_dim": 1408, "depth": 39, "num_heads": 16, "mlp_ratio": 4.3637}
_BERT_BASE = {"num_query_token": 32, "cross_attention_freq": 2, "hidden_size": 768, "num_hidden_layers": 12,
              "num_attention_heads": 12, "intermediate_size": 3072}


def _preset(text_input: bool, llm: int) -> dict[str, Any]:
    q = dict(_BERT_BASE, qformer_text_input=text_input)
    if text_input:
        q.update(vocab_size=30523, max_position_embeddings=512)
    return {"vision": dict(_EVA_G), "qformer": q, "llm_hidden_size": llm}


PRESETS: dict[str, dict[str, Any]] = {
    "instructblip-vicuna7b": _preset(True, 4096),
    "instructblip-vicuna13b": _preset(True, 5120),
    "instructblip-flant5xl": _preset(True, 2048),
    "blip2-vicuna7b": _preset(False, 4096),
    "blip2-opt-2.7b": _preset(False, 2560),
    "blip2-opt-6.7b": _preset(False, 4096),
    "blip2-flant5xl": _preset(False, 2048),
}
VISION_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "in_chans",
                 "layer_norm_eps", "ln_vision_eps")
QFORMER_FIELDS = ("num_query_token", "cross_attention_freq", "qformer_text_input", "hidden_size", "num_hidden_layers",
                  "num_attention_heads", "intermediate_size", "layer_norm_eps", "vocab_size", "max_position_embeddings")
PROJ = ("llm_proj", "opt_proj", "t5_proj")
VE, QB = "visual_encoder.", "Qformer.bert."


class _Shapes:
    """Reads architecture fields off tensor shapes, naming the key it needed when it is absent."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def __call__(self, key: str, field: str) -> tuple[int, ...]:
        if key not in self.ckpt:
            raise CheckpointError(f"{self.ckpt.path}: cannot infer {field}: tensor {key!r} is not in the checkpoint "
                                  "(give the field in --config, or check the key names)")
        return tuple(self.ckpt.shape(key))

    def indices(self, pattern: str) -> list[int]:
        rx = re.compile(pattern)
        return sorted({int(m.group(1)) for k in self.ckpt.keys() if (m := rx.fullmatch(k))})


def _contiguous(idx: list[int], what: str, ckpt: Checkpoint) -> int:
    if not idx or idx != list(range(len(idx))):
        raise CheckpointError(f"{ckpt.path}: cannot infer {what}: layer indices found are {idx or 'none'}")
    return len(idx)


def _cross_frequency(layers_with_cross: list[int], depth: int, ckpt: Checkpoint) -> int:
    """The smallest f with {i < depth : i % f == 0} == the layers that have cross-attention (any larger
    f giving the same set builds the same model)."""
    for f in range(1, depth + 1):
        if [i for i in range(depth) if i % f == 0] == layers_with_cross:
            return f
    raise CheckpointError(f"{ckpt.path}: Q-Former cross-attention layers {layers_with_cross} are not every "
                          f"n-th layer from 0 (of {depth}); cannot infer qformer.cross_attention_freq")


def _fields(raw: dict, known: tuple[str, ...], where: str) -> dict:
    if not isinstance(raw, dict):
        raise CheckpointError(f"--config: {where} must be an object of {', '.join(known)}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise CheckpointError(f"--config: unknown {where} field(s) {unknown}; known: {', '.join(known)}")
    return dict(raw)


def lavis_config(ckpt: Checkpoint, raw: dict) -> tuple[Blip2VisionConfig, list[str], int | None]:
    """The model config from ``--config`` plus tensor shapes; returns (config, notes, explicit depth)."""
    unknown = sorted(set(raw) - {"vision", "qformer", "llm_hidden_size"})
    if unknown:
        raise CheckpointError(f"--config: unknown top-level field(s) {unknown}; "
                              "known: vision, qformer, llm_hidden_size")
    v = _fields(raw.get("vision", {}), VISION_FIELDS, "vision")
    q = _fields(raw.get("qformer", {}), QFORMER_FIELDS, "qformer")
    shape, inferred = _Shapes(ckpt), []

    def infer(d: dict, field: str, where: str, fn):
        if field not in d:
            d[field] = fn()
            inferred.append(f"{where}.{field}={d[field]}")

    depth_given = v.get("depth")
    infer(v, "embed_dim", "vision", lambda: shape(VE + "cls_token", "vision.embed_dim")[-1])
    infer(v, "patch_size", "vision", lambda: shape(VE + "patch_embed.proj.weight", "vision.patch_size")[-1])
    infer(v, "in_chans", "vision", lambda: shape(VE + "patch_embed.proj.weight", "vision.in_chans")[1])
    n_pos = shape(VE + "pos_embed", "vision.img_size")[1] - 1 if "img_size" not in v else None
    if n_pos is not None and math.isqrt(n_pos) ** 2 != n_pos:
        raise CheckpointError(f"{ckpt.path}: {VE}pos_embed has {n_pos} patch positions, not a square grid")
    infer(v, "img_size", "vision", lambda: math.isqrt(n_pos) * v["patch_size"])
    infer(v, "depth", "vision", lambda: _contiguous(shape.indices(re.escape(VE) + r"blocks\.(\d+)\..+"),
                                                     "vision.depth", ckpt))
    mlp_rows = None  # an inferred width is used as is (int(embed_dim * rows / embed_dim) may round down)
    if "mlp_ratio" not in v:
        mlp_rows = shape(VE + "blocks.0.mlp.fc1.weight", "vision.mlp_ratio")[0]
        inferred.append(f"vision.mlp_ratio={mlp_rows}/{v['embed_dim']}")
    infer(v, "qkv_bias", "vision", lambda: VE + "blocks.0.attn.q_bias" in ckpt)
    infer(q, "hidden_size", "qformer", lambda: shape("query_tokens", "qformer.hidden_size")[-1])
    infer(q, "num_query_token", "qformer", lambda: shape("query_tokens", "qformer.num_query_token")[1])
    infer(q, "num_hidden_layers", "qformer", lambda: _contiguous(
        shape.indices(re.escape(QB) + r"encoder\.layer\.(\d+)\..+"), "qformer.num_hidden_layers", ckpt))
    infer(q, "intermediate_size", "qformer", lambda: shape(
        QB + "encoder.layer.0.intermediate_query.dense.weight", "qformer.intermediate_size")[0])
    infer(q, "cross_attention_freq", "qformer", lambda: _cross_frequency(
        shape.indices(re.escape(QB) + r"encoder\.layer\.(\d+)\.crossattention\..+"), q["num_hidden_layers"], ckpt))
    infer(q, "qformer_text_input", "qformer", lambda: QB + "embeddings.word_embeddings.weight" in ckpt)
    if q["qformer_text_input"]:
        infer(q, "vocab_size", "qformer", lambda: shape(QB + "embeddings.word_embeddings.weight",
                                                         "qformer.vocab_size")[0])
        infer(q, "max_position_embeddings", "qformer", lambda: shape(
            QB + "embeddings.position_embeddings.weight", "qformer.max_position_embeddings")[0])
    if "llm_hidden_size" not in raw:
        projs = [p for p in PROJ if f"{p}.weight" in ckpt]
        if len(projs) != 1:
            raise CheckpointError(f"{ckpt.path}: cannot infer llm_hidden_size: expected exactly one of "
                                  f"{', '.join(p + '.weight' for p in PROJ)}, found {projs or 'none'}")
        raw = dict(raw, llm_hidden_size=ckpt.shape(f"{projs[0]}.weight")[0])
        inferred.append(f"llm_hidden_size={raw['llm_hidden_size']}")
    for d, field, where in ((v, "num_heads", "vision"), (q, "num_attention_heads", "qformer")):
        if field not in d:
            raise CheckpointError(f"{ckpt.path}: {where}.{field} cannot be inferred from tensor shapes; give it in "
                                  f"--config (a JSON file or a preset: {', '.join(sorted(PRESETS))})")
    num_query = q.pop("num_query_token")
    try:
        vision = EvaVitConfig.from_lavis(**v)
        if mlp_rows is not None:
            vision = vision.replace(intermediate_size=mlp_rows)
        qformer = QFormerConfig.from_lavis(vision_width=vision.hidden_size, **q)
        config = Blip2VisionConfig(vision=vision, qformer=qformer, num_query_tokens=num_query,
                                   text_hidden_size=raw["llm_hidden_size"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"--config: {e}") from None
    notes = [f"inferred from tensor shapes: {', '.join(inferred)}"] if inferred else []
    return config, notes, depth_given


def lavis_rules(text_input: bool, extra_blocks: list[int]) -> list:
    """LAVIS key -> canonical (HF full-model) key."""
    layer = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
    rules = [(rf"visual_encoder\.blocks\.(?:{'|'.join(map(str, extra_blocks))})\..+",
              Skip("visual_encoder blocks beyond the configured depth (LAVIS loads the ViT with strict=False)"))
             ] if extra_blocks else []
    return rules + [
        (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
        (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
        (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
        (r"visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)",
         r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
        (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
        (r"visual_encoder\.blocks\.(\d+)\.attn\.([qv]_bias)", r"vision_model.encoder.layers.\1.self_attn.\2"),
        (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
         r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
        (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12]\.(?:weight|bias))", r"vision_model.encoder.layers.\1.mlp.\2"),
        (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
        (r"query_tokens", "query_tokens"),
        (r"(?:llm|opt|t5)_proj\.(weight|bias)", r"language_projection.\1"),
        (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)",
         r"qformer.embeddings.layernorm.\1" if text_input else r"qformer.layernorm.\1"),
        (r"Qformer\.bert\.embeddings\.((?:word|position)_embeddings\.weight)", r"qformer.embeddings.\1"),
        (r"Qformer\.bert\.embeddings\.position_ids", Skip("Q-Former position_ids buffer")),
        (layer + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
         r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
        (layer + r"((?:attention|crossattention)\.output|intermediate(?:_query)?|output(?:_query)?)\."
                 r"(dense|LayerNorm)\.(weight|bias)", r"qformer.encoder.layer.\1.\2.\3.\4"),
        (r"(?:llm|opt|t5)_model\..+", Skip(LLM_REASON.format(kind="LAVIS llm_model/opt_model/t5_model"))),
        (r"Qformer\.cls\..+|(?:vision_proj|text_proj|itm_head)\.(?:weight|bias)|temp",
         Skip("stage-1 pre-training heads (ITC/ITM/LM), unused by the generative model")),
    ]


def _plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    if ckpt.config is not None:
        raise CheckpointError(f"{ckpt.path}: has a config.json; for an HF save_pretrained directory use hf-blip2")
    raw = load_json_arg(config_arg, PRESETS, "LAVIS BLIP-2 constructor arguments") if config_arg else {}
    config, notes, depth_given = lavis_config(ckpt, raw)
    blocks = _Shapes(ckpt).indices(r"visual_encoder\.blocks\.(\d+)\..+")
    extra = [i for i in blocks if depth_given is not None and i >= depth_given]
    tensors, unexpected, skipped = apply_rules(ckpt.keys(), lavis_rules(config.qformer.text_embeddings, extra))
    kind = "InstructBLIP (Q-Former with instruction input)" if config.qformer.text_embeddings else "BLIP-2"
    notes.append(f"LAVIS {kind}; ln_vision eps {config.vision.post_layernorm_eps:g}; "
                 f"{config.num_query_tokens} query tokens -> {config.text_hidden_size}-wide LLM tokens")
    return Plan("blip2_vision", config, tensors, unexpected, skipped, notes)


# ---- --verify: the HF model after the public LAVIS -> HF renaming -----------------------------------

def lavis_to_hf(state: dict[str, np.ndarray], instruct: bool, depth: int) -> dict[str, np.ndarray]:
    """transformers' conversion scripts' renaming of a LAVIS state dict (vision + Q-Former + projection)."""
    renames = {"visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
               "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
               "ln_vision.weight": "vision_model.post_layernorm.weight",
               "ln_vision.bias": "vision_model.post_layernorm.bias",
               "Qformer.bert.embeddings.LayerNorm.weight":
                   ("qformer.embeddings.layernorm.weight" if instruct else "qformer.layernorm.weight"),
               "Qformer.bert.embeddings.LayerNorm.bias":
                   ("qformer.embeddings.layernorm.bias" if instruct else "qformer.layernorm.bias")}
    for wb in ("weight", "bias"):
        renames[f"visual_encoder.patch_embed.proj.{wb}"] = f"vision_model.embeddings.patch_embedding.{wb}"
        for i in range(depth):
            src, dst = f"visual_encoder.blocks.{i}.", f"vision_model.encoder.layers.{i}."
            for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                renames[f"{src}{a}.{wb}"] = f"{dst}{b}.{wb}"
    for i in range(depth):
        renames[f"visual_encoder.blocks.{i}.attn.qkv.weight"] = f"vision_model.encoder.layers.{i}.self_attn.qkv.weight"
    out = {}
    for key, value in state.items():
        if key in renames:
            out[renames[key]] = value
        elif key.startswith("Qformer.bert.") and not key.endswith("position_ids"):
            key = key.replace("Qformer.bert", "qformer")
            out[key.replace("self", "attention") if "attention.self" in key else key] = value
        elif key == "query_tokens" or key.split(".")[0] in PROJ:
            out[re.sub(r"^(llm|opt|t5)_proj", "language_projection", key)] = value
    for i in range(depth):
        q = state.get(f"visual_encoder.blocks.{i}.attn.q_bias")
        if q is not None:
            v = state[f"visual_encoder.blocks.{i}.attn.v_bias"]
            out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = np.concatenate([q, np.zeros_like(v), v])
    return out


def hf_model(config: Blip2VisionConfig):
    """An HF full model for ``config`` whose language model is a stub (get_image_features never runs it)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    v, q = config.vision, config.qformer
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias)
    qformer = dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
                   num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                   hidden_act=q.hidden_act, layer_norm_eps=q.layer_norm_eps,
                   cross_attention_frequency=q.cross_attention_frequency, vocab_size=q.vocab_size,
                   max_position_embeddings=q.max_position_embeddings)
    text = dict(model_type="llama", hidden_size=config.text_hidden_size, intermediate_size=1, num_hidden_layers=0,
                num_attention_heads=1, num_key_value_heads=1, vocab_size=8)
    if q.text_embeddings:
        cfg_cls, model_cls = InstructBlipConfig, InstructBlipForConditionalGeneration
    else:
        cfg_cls, model_cls = Blip2Config, Blip2ForConditionalGeneration
        qformer["use_qformer_text_input"] = q.text_ffn
    hf_config = cfg_cls(vision_config=vision, qformer_config=qformer, text_config=text,
                        num_query_tokens=config.num_query_tokens)
    hf_config._attn_implementation = "eager"
    model = model_cls(hf_config).eval()
    model.vision_model.post_layernorm.eps = v.post_layernorm_eps  # LAVIS ln_vision: plain nn.LayerNorm
    return model


def _verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list:
    import torch

    config = plan.config
    model = hf_model(config)
    state = {k: np.array(ckpt.get(k), np.float32) for k in ckpt.keys()
             if not re.match(r"(llm|opt|t5)_model\.", k)}
    hf_state = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in
                lavis_to_hf(state, config.qformer.text_embeddings, config.vision.num_hidden_layers).items()}
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.startswith("language_model.")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.path}: --verify: the renamed LAVIS state dict does not fit the HF model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return compare_image_features(model, config, params, random_inputs(config))


LAVIS_BLIP2 = Family("lavis-blip2", _plan, _verify)
