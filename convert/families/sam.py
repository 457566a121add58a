"""SAM converters: ``sam`` (segment-anything state dicts, incl. GLaMM/LISA merged checkpoints) and
``hf-sam`` (HF ``SamModel`` save_pretrained directories).

Canonical keys are the original segment-anything names (``sam_vit_h_4b8939.pth``), which GLaMM and
LISA keep under ``model.grounding_encoder.`` / ``model.visual_model.``; the module tree of
:mod:`calico_jax.models.sam` mirrors them. ``hf-sam`` renames HF keys back (the inverse of
transformers' ``convert_sam_to_hf.py``) and takes HF's LayerNorm epsilons from its config.

``--verify`` compares image embeddings, low-res mask logits and IoU predictions for point, box,
point+box and mask prompts (and, for ``sam``, GLaMM's [SEG] ``text_embeds`` prompt) against
segment-anything's modules (``sam``) or ``SamModel.from_pretrained(SRC)`` (``hf-sam``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
import types
from typing import Any

import numpy as np

from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError, hf_config, load_json_arg
from calico_jax.core.config import ConfigError
from calico_jax.models.sam import PRESETS, Sam, SamConfig
from convert.families import Family
from convert.mapping import Plan, Skip, apply_rules
from convert.verify import Comparison, compare, rng

MODEL = "sam"
_PARTS = r"(?:image_encoder|prompt_encoder|mask_decoder)"
# Where SAM lives inside larger checkpoints (GLaMM: grounding_encoder, LISA: visual_model; PEFT wraps
# both in base_model.model.).
PREFIXES = ("", "model.grounding_encoder.", "model.visual_model.", "base_model.model.model.grounding_encoder.",
            "base_model.model.model.visual_model.", "grounding_encoder.", "visual_model.", "module.")


def segment_anything_modeling():
    """``segment_anything.modeling`` without running the package ``__init__`` (it imports torchvision,
    which does not import beside the CPU torch wheel)."""
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        raise ImportError("segment-anything is not installed (pip install 'calico-jax[test]')")
    pkg = types.ModuleType("segment_anything")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("segment_anything", pkg)
    return importlib.import_module("segment_anything.modeling")


# ----------------------------------------------------------------------------------------------- plans

def find_prefix(keys: list[str], src: Any) -> str:
    """The one prefix (of :data:`PREFIXES`) the SAM keys sit under; CheckpointError for none or several."""
    counts = {p: sum(1 for k in keys if re.match(re.escape(p) + _PARTS + r"\.", k)) for p in PREFIXES}
    found = [p for p, n in counts.items() if n]
    if not found:
        raise CheckpointError(f"{src}: no SAM keys found (image_encoder.*, prompt_encoder.*, mask_decoder.*, "
                              f"optionally under one of {[p for p in PREFIXES if p]})")
    if len(found) > 1:
        raise CheckpointError(f"{src}: SAM keys under several prefixes {found}; expected one SAM model")
    return found[0]


def infer_preset(ckpt: Checkpoint, prefix: str) -> str:
    """The SAM preset (vit_b / vit_l / vit_h) whose image encoder width and depth the checkpoint's tensors have."""
    key = prefix + "image_encoder.patch_embed.proj.weight"
    blocks = {int(m.group(1)) for k in ckpt.keys()
              if (m := re.match(re.escape(prefix) + r"image_encoder\.blocks\.(\d+)\.", k))}
    if key not in ckpt or not blocks:
        raise CheckpointError(f"{ckpt.path}: cannot infer the SAM architecture ({key} or image_encoder.blocks.* "
                              f"missing); pass --config (a preset {sorted(PRESETS)} or a JSON of constructor args)")
    embed_dim, depth = ckpt.shape(key)[0], max(blocks) + 1
    hits = [n for n, p in PRESETS.items()
            if (p["image_encoder"]["embed_dim"], p["image_encoder"]["depth"]) == (embed_dim, depth)]
    if len(hits) != 1:
        raise CheckpointError(f"{ckpt.path}: image encoder embed_dim={embed_dim}, depth={depth} matches no preset "
                              f"({', '.join(sorted(PRESETS))}); pass --config with a JSON of the constructor args")
    return hits[0]


def _original_plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    keys = ckpt.keys()
    prefix = find_prefix(keys, ckpt.path)
    notes = []
    if config_arg is None:
        config_arg = infer_preset(ckpt, prefix)
        notes.append(f"no --config: inferred preset {config_arg} from the image-encoder shapes")
    config = SamConfig.from_original(load_json_arg(config_arg, PRESETS, "SAM constructor arguments"))
    p = re.escape(prefix)
    rules: list = [
        (p + r"(" + _PARTS + r"\..+)", r"\1"),
        (p + r"pixel_(?:mean|std)", Skip("pixel_mean/pixel_std: fixed normalisation constants "
                                          "(calico_jax.models.sam.PIXEL_MEAN/PIXEL_STD)")),
    ]
    if prefix:
        notes.append(f"SAM weights read from under {prefix!r}")
        rules.append((r".+", Skip(f"not under {prefix!r}: the rest of a merged GLaMM/LISA checkpoint (LLM, "
                                  "projectors, ...), handled by other families")))
    tensors, unexpected, skipped = apply_rules(keys, rules)
    return Plan(MODEL, config, tensors, unexpected, skipped, notes)


def hf_rules(config: SamConfig) -> list:
    """The rename table of an HF ``SamModel`` state dict (``vision_encoder.*``, ...) to the original SAM names."""
    ve, md = r"vision_encoder\.", r"mask_decoder\."
    wb = r"(weight|bias)"
    proj = r"(?:q|k|v|out)_proj\.(?:weight|bias)"
    depth = config.mask_decoder.iou_head_depth
    hyper = r"mask_decoder.output_hypernetworks_mlps.\1."
    rules = [
        (r"shared_image_embedding\.positional_embedding",
         "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
        (r"prompt_encoder\.shared_embedding\.positional_embedding",
         Skip("tied copy of shared_image_embedding.positional_embedding")),
        (ve + r"patch_embed\.projection\." + wb, r"image_encoder.patch_embed.proj.\1"),
        (ve + r"pos_embed", "image_encoder.pos_embed"),
        (ve + r"layers\.(\d+)\.layer_norm([12])\." + wb, r"image_encoder.blocks.\1.norm\2.\3"),
        (ve + r"layers\.(\d+)\.(attn\.(?:qkv|proj)\.(?:weight|bias)|attn\.rel_pos_[hw]|mlp\.lin[12]\.(?:weight|bias))",
         r"image_encoder.blocks.\1.\2"),
        (ve + r"neck\.conv1\.weight", "image_encoder.neck.0.weight"),
        (ve + r"neck\.layer_norm1\." + wb, r"image_encoder.neck.1.\1"),
        (ve + r"neck\.conv2\.weight", "image_encoder.neck.2.weight"),
        (ve + r"neck\.layer_norm2\." + wb, r"image_encoder.neck.3.\1"),
        (r"prompt_encoder\.point_embed\.(\d+)\.weight", r"prompt_encoder.point_embeddings.\1.weight"),
        (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
        *[(r"prompt_encoder\.mask_embed\." + hf + r"\." + wb, rf"prompt_encoder.mask_downscaling.{i}.\1")
          for hf, i in (("conv1", 0), ("layer_norm1", 1), ("conv2", 3), ("layer_norm2", 4), ("conv3", 6))],
        (md + r"transformer\.layers\.(\d+)\.layer_norm([1-4])\." + wb, r"mask_decoder.transformer.layers.\1.norm\2.\3"),
        (md + r"transformer\.layers\.(\d+)\.((?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\."
         + proj + r"|mlp\.lin[12]\.(?:weight|bias))", r"mask_decoder.transformer.layers.\1.\2"),
        (md + r"transformer\.(final_attn_token_to_image\." + proj + ")", r"mask_decoder.transformer.\1"),
        (md + r"transformer\.layer_norm_final_attn\." + wb, r"mask_decoder.transformer.norm_final_attn.\1"),
        (md + r"(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
        (md + r"upscale_conv1\." + wb, r"mask_decoder.output_upscaling.0.\1"),
        (md + r"upscale_layer_norm\." + wb, r"mask_decoder.output_upscaling.1.\1"),
        (md + r"upscale_conv2\." + wb, r"mask_decoder.output_upscaling.3.\1"),
        # SamFeedForward(proj_in, layers.0..n-3, proj_out) == MLP(layers.0..n-1)
        (md + r"output_hypernetworks_mlps\.(\d+)\.proj_in\." + wb, hyper + r"layers.0.\2"),
        (md + r"output_hypernetworks_mlps\.(\d+)\.layers\.0\." + wb, hyper + r"layers.1.\2"),
        (md + r"output_hypernetworks_mlps\.(\d+)\.proj_out\." + wb, hyper + r"layers.2.\2"),
        (md + r"iou_prediction_head\.proj_in\." + wb, r"mask_decoder.iou_prediction_head.layers.0.\1"),
        *[(md + rf"iou_prediction_head\.layers\.{k}\." + wb, rf"mask_decoder.iou_prediction_head.layers.{k + 1}.\1")
          for k in range(depth - 2)],
        (md + r"iou_prediction_head\.proj_out\." + wb, rf"mask_decoder.iou_prediction_head.layers.{depth - 1}.\1"),
    ]
    return rules


def _hf_plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    cfg = hf_config(ckpt, config_arg, "an HF SamConfig")
    if cfg.get("model_type", "sam") != "sam":
        raise CheckpointError(f"{ckpt.path}: config.json model_type is {cfg.get('model_type')!r}, expected 'sam'")
    config = SamConfig.from_hf_config(cfg)
    rules = hf_rules(config)
    if "shared_image_embedding.positional_embedding" not in ckpt:  # a file holding only the tied copy
        rules[1] = (rules[1][0], rules[0][1])
    tensors, unexpected, skipped = apply_rules(ckpt.keys(), rules)
    notes = ["HF numerics: TwoWay norm eps = mask_decoder_config.layer_norm_eps "
             f"({config.mask_decoder.transformer.norm_eps:g}; original SAM: 1e-5)"]
    return Plan(MODEL, config, tensors, unexpected, skipped, notes)


# -------------------------------------------------------------------------------------- torch reference

def _torch_act(name: str):
    import torch.nn as nn
    acts = {"gelu": nn.GELU, "relu": nn.ReLU}
    if name not in acts:
        raise CheckpointError(f"--verify: activation {name!r} has no segment-anything counterpart")
    return acts[name]


def build_original(config: SamConfig):
    """segment-anything's ``Sam`` for ``config`` (random weights), with every LayerNorm eps set from it."""
    import torch.nn as nn
    try:
        sm = segment_anything_modeling()
    except ImportError as e:
        raise CheckpointError(f"--verify for sam: {e}") from None
    ie, pe, md = config.image_encoder, config.prompt_encoder, config.mask_decoder
    t = md.transformer
    if ie.hidden_dim != int(ie.embed_dim * ie.mlp_ratio):
        raise CheckpointError("--verify: segment-anything needs image_encoder.mlp_dim == embed_dim * mlp_ratio")
    encoder = sm.ImageEncoderViT(
        img_size=ie.img_size, patch_size=ie.patch_size, in_chans=ie.in_chans, embed_dim=ie.embed_dim,
        depth=ie.depth, num_heads=ie.num_heads, mlp_ratio=ie.mlp_ratio, out_chans=ie.out_chans,
        qkv_bias=ie.qkv_bias, norm_layer=functools.partial(nn.LayerNorm, eps=ie.norm_eps),
        act_layer=_torch_act(ie.act), use_abs_pos=ie.use_abs_pos, use_rel_pos=ie.use_rel_pos,
        window_size=ie.window_size, global_attn_indexes=tuple(ie.global_attn_indexes))
    encoder.neck[1].eps = encoder.neck[3].eps = ie.neck_norm_eps
    prompt = sm.PromptEncoder(embed_dim=pe.embed_dim, image_embedding_size=tuple(pe.image_embedding_size),
                              input_image_size=tuple(pe.input_image_size), mask_in_chans=pe.mask_in_chans,
                              activation=_torch_act(pe.act))
    prompt.mask_downscaling[1].eps = prompt.mask_downscaling[4].eps = pe.mask_norm_eps
    transformer = sm.TwoWayTransformer(depth=t.depth, embedding_dim=t.embedding_dim, num_heads=t.num_heads,
                                       mlp_dim=t.mlp_dim, activation=_torch_act(t.act),
                                       attention_downsample_rate=t.attention_downsample_rate)
    for layer in transformer.layers:
        for norm in (layer.norm1, layer.norm2, layer.norm3, layer.norm4):
            norm.eps = t.norm_eps
    transformer.norm_final_attn.eps = t.final_norm_eps
    decoder = sm.MaskDecoder(transformer_dim=md.transformer_dim, transformer=transformer,
                             num_multimask_outputs=md.num_multimask_outputs, iou_head_depth=md.iou_head_depth,
                             iou_head_hidden_dim=md.iou_head_hidden_dim)
    decoder.output_upscaling[1].eps = md.upscale_norm_eps
    return sm.Sam(encoder, prompt, decoder).eval()


def original_prompt(prompt_encoder, points=None, labels=None, boxes=None, masks=None, text_embeds=None):
    """segment-anything's ``PromptEncoder.forward`` extended as GLaMM/LISA's copy (``text_embeds``)."""
    import torch
    sparse, dense = prompt_encoder(points=None if points is None else (points, labels), boxes=boxes, masks=masks)
    if text_embeds is None:
        return sparse, dense
    if points is None and boxes is None and masks is None:  # GLaMM takes the batch from text_embeds
        bs = text_embeds.shape[0]
        sparse = sparse.expand(bs, -1, -1)
        dense = dense.expand(bs, -1, -1, -1)
    return torch.cat([sparse, text_embeds.to(sparse.dtype)], dim=1), dense


def _prompt_cases(config: SamConfig, seed: int, hf: bool) -> list[tuple[str, dict, bool]]:
    """(name, prompt arrays in torch layout, multimask_output) with random fp32 prompts."""
    g = rng(seed)
    size = config.prompt_encoder.input_image_size
    h, w = config.prompt_encoder.image_embedding_size
    n = 3
    pts = (g.uniform(0, 1, (n, 2, 2)) * [size[1], size[0]]).astype(np.float32)
    labels = np.array([[1, 0], [1, -1], [0, 1]], np.int64)
    xy0 = g.uniform(0, 0.5, (n, 2)) * [size[1], size[0]]
    boxes = np.concatenate([xy0, xy0 + g.uniform(0.1, 0.5, (n, 2)) * [size[1], size[0]]], 1).astype(np.float32)
    masks = g.normal(0, 2.0, (1 if hf else n, 1, 4 * h, 4 * w)).astype(np.float32)
    cases = [("points", dict(points=pts, labels=labels), True),
             ("box", dict(boxes=boxes), False),
             ("points+box", dict(points=pts[:, :1], labels=labels[:, :1], boxes=boxes), True),
             ("mask+points", dict(points=pts, labels=labels, masks=masks), False)]
    if not hf:
        text = g.normal(0, 1.0, (n, 1, config.prompt_encoder.embed_dim)).astype(np.float32)
        cases.append(("text_embeds", dict(text_embeds=text), False))
    return cases


@functools.lru_cache(maxsize=32)
def _jitted(config: SamConfig, multimask: bool | None):
    """Compiled encoder (``multimask=None``) or full pipeline from image embeddings; cached per config so
    repeated verifications of one architecture (CLI, then tests) compile once."""
    import jax
    module = Sam(config)
    if multimask is None:
        return jax.jit(lambda v, x: module.apply(v, x, method="image_embeddings"))
    return jax.jit(lambda v, emb, prompt: module.apply(v, image_embeddings=emb, multimask_output=multimask, **prompt))


def _jax_outputs(config: SamConfig, params: Any, pixels: np.ndarray, cases: list) -> tuple[np.ndarray, dict]:
    import jax.numpy as jnp
    variables = {"params": params}
    emb = _jitted(config, None)(variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    out = {}
    for name, prompt, multimask in cases:
        kw = {k: jnp.asarray(v.transpose(0, 2, 3, 1) if k == "masks" else v) for k, v in prompt.items()}
        res = _jitted(config, multimask)(variables, emb, kw)
        out[name] = (res["low_res_masks"], res["iou_predictions"])
    return np.asarray(emb).transpose(0, 3, 1, 2), out


def compare_original(reference: Any, module: Sam, params: Any, seed: int = 0) -> list[Comparison]:
    """Image embeddings and, per prompt type, low-res masks and IoU vs segment-anything's ``Sam``."""
    import torch
    config = module.config
    s = config.image_encoder.img_size
    pixels = rng(seed + 1).normal(0, 1, (1, config.image_encoder.in_chans, s, s)).astype(np.float32)
    cases = _prompt_cases(config, seed, hf=False)
    emb_jax, outs = _jax_outputs(config, params, pixels, cases)
    with torch.no_grad():
        emb = reference.image_encoder(torch.from_numpy(pixels))
        comparisons = [compare("image_embeddings", emb_jax, emb)]
        pe = reference.prompt_encoder.get_dense_pe()
        for name, prompt, multimask in cases:
            prompt_t = {k: torch.from_numpy(v) for k, v in prompt.items()}
            sparse, dense = original_prompt(reference.prompt_encoder, **prompt_t)
            masks, iou = reference.mask_decoder(emb, pe, sparse, dense, multimask_output=multimask)
            comparisons += [compare(f"{name}: low_res_masks", outs[name][0], masks),
                            compare(f"{name}: iou_predictions", outs[name][1], iou)]
    return comparisons


def compare_hf(reference: Any, module: Sam, params: Any, seed: int = 0) -> list[Comparison]:
    """The same comparisons against HF ``SamModel`` (prompts of one image as its point batch)."""
    import torch
    config = module.config
    s = config.image_encoder.img_size
    pixels = rng(seed + 1).normal(0, 1, (1, config.image_encoder.in_chans, s, s)).astype(np.float32)
    cases = _prompt_cases(config, seed, hf=True)
    emb_jax, outs = _jax_outputs(config, params, pixels, cases)
    with torch.no_grad():
        emb = reference.get_image_embeddings(torch.from_numpy(pixels))
        comparisons = [compare("image_embeddings", emb_jax, emb)]
        for name, prompt, multimask in cases:
            t = {k: torch.from_numpy(v) for k, v in prompt.items()}
            kw = {}
            if "points" in t:
                kw.update(input_points=t["points"][None], input_labels=t["labels"][None])
            if "boxes" in t:
                kw["input_boxes"] = t["boxes"][None]
            if "masks" in t:
                kw["input_masks"] = t["masks"]
            out = reference(image_embeddings=emb, multimask_output=multimask, **kw)
            comparisons += [compare(f"{name}: low_res_masks", outs[name][0], out.pred_masks[0]),
                            compare(f"{name}: iou_predictions", outs[name][1], out.iou_scores[0])]
    return comparisons


def _original_verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list[Comparison]:
    import torch
    reference = build_original(plan.config)
    state = {k: torch.from_numpy(np.array(t.load(ckpt), dtype=np.float32)) for k, t in plan.tensors.items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"--verify: segment-anything Sam does not take this state dict "
                              f"(missing {missing}, unexpected {unexpected})")
    return compare_original(reference, plan.module(), params)


def _hf_verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list[Comparison]:
    import torch
    from transformers import SamModel
    try:
        reference = SamModel.from_pretrained(str(ckpt.path), dtype=torch.float32, attn_implementation="eager").eval()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--verify: transformers cannot load {ckpt.path}: {e}") from None
    return compare_hf(reference, plan.module(), params)


def _checked(plan_fn):
    @functools.wraps(plan_fn)
    def wrapper(ckpt: Checkpoint, config_arg: str | None) -> Plan:
        try:
            return plan_fn(ckpt, config_arg)
        except ConfigError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    return wrapper


SAM = Family("sam", _checked(_original_plan), _original_verify)
HF_SAM = Family("hf-sam", _checked(_hf_plan), _hf_verify)
