"""Checks and fills for the ``calico`` family on the first author's layout (``calico_jax.checkpoints.author_layout``).

* :func:`module_problems`: each author module against the CALICO config, from the tensor shapes alone (no tensor
  is read): ``extraction_layer`` an ``nn.MultiheadAttention(D_C, kdim=vdim=D_S)``; ``adaptive_layers`` /
  ``reintegration_layers`` a ``ModuleList`` of one ``nn.Linear`` per CAM layer; ``query_tokens``, ``mm_projector``,
  the Q-Former, EVA and DINOv2 depths and widths. Every problem is returned, so the user sees them in one
  message; :func:`missing_towers` names the towers neither the checkpoint nor ``--parts`` provides.
* :func:`fill_from_parts`: tensors the checkpoint lacks, taken from converted part directories (``--parts``).
* :func:`dinov2_preset`: the torch-hub DINOv2 preset the ``model.dino_model`` shapes match.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from calico_jax.checkpoints import author_layout
from calico_jax.checkpoints import converted as pretrained
from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError
from calico_jax.models.dinov2 import PRESETS as DINOV2_PRESETS
from calico_jax.models.dinov2 import Dinov2Config
from convert.mapping import Tensor

DM, VE, QB = "model.dino_model.", "model.visual_encoder.", "model.Qformer.bert."
MHA_KEYS = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight",
            "out_proj.bias"}
TOWERS = {"vision_model": "EVA ViT + ln_vision (model.visual_encoder.*, model.ln_vision.*)",
          "qformer": "Q-Former (model.Qformer.bert.*)", "query_tokens": "query tokens (model.query_tokens)",
          "language_projection": "f_image (model.mm_projector.*)", "dinov2": "DINOv2 (model.dino_model.*)",
          "sam": "SAM (model.grounding_encoder.*)", "llm": "LLaMA (model.embed_tokens, model.layers.*, lm_head)"}
# A tower counts as present when a tensor of this canonical prefix is (the LoRA factors alone are not the LLM).
TOWER_KEYS = {"vision_model": "vision_model.encoder.", "qformer": "qformer.encoder.", "query_tokens": "query_tokens",
              "language_projection": "language_projection.", "dinov2": "dinov2.encoder.",
              "sam": "sam.image_encoder.", "llm": "llm.model.embed_tokens."}
PART_PREFIX = {"blip2_vision": (), "dinov2": ("dinov2",), "sam": ("sam",), "llama": ("llm",)}


def _indices(keys, prefix: str) -> dict[int, set[str]]:
    """``prefix{i}.rest`` keys -> {i: {rest, ...}}."""
    out: dict[int, set[str]] = {}
    rx = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    for k in keys:
        if m := rx.fullmatch(k):
            out.setdefault(int(m[1]), set()).add(m[2])
    return out


def dinov2_preset(ckpt: Checkpoint, keys: dict[str, str]) -> tuple[str, dict] | None:
    """(name, Dinov2Config dict) of the one torch-hub preset matching width, depth and registers, or None."""
    if DM + "cls_token" not in keys:
        return None
    width = ckpt.shape(keys[DM + "cls_token"])[-1]
    depth = len(_indices(keys, DM + "blocks."))
    regs = ckpt.shape(keys[DM + "register_tokens"])[1] if DM + "register_tokens" in keys else 0
    hits = [(n, a) for n, a in DINOV2_PRESETS.items()
            if (a["embed_dim"], a["depth"], a["num_register_tokens"]) == (width, depth, regs)]
    return (hits[0][0], Dinov2Config.from_original(**hits[0][1]).to_dict()) if len(hits) == 1 else None


def _linears(keys, shape, name: str, n_cams: int, want: tuple[int, int], cam_layers) -> list[str]:
    found = _indices(keys, f"model.{name}.")
    if not found:
        return []
    out = []
    if sorted(found) != list(range(n_cams)):
        out.append(f"{name}: {len(found)} module(s) (indices {sorted(found)}), the config has {n_cams} CAM layer(s) "
                   f"{list(cam_layers)} (set config.cam.layers)")
    for i, rest in sorted(found.items()):
        if rest != {"weight", "bias"}:
            out.append(f"{name}.{i}: keys {sorted(rest)}: not an nn.Linear (expected weight, bias)")
        elif tuple(shape(f"model.{name}.{i}.weight")) != want:
            out.append(f"{name}.{i}: nn.Linear weight {tuple(shape(f'model.{name}.{i}.weight'))}, the config needs "
                       f"{want} (out, in)")
    return out


def _mha(keys, shape, config) -> list[str]:
    rest = {k[len("model.extraction_layer."):] for k in keys if k.startswith("model.extraction_layer.")}
    if not rest:
        return []
    cem, e = config.cem, config.vision.vision.hidden_size
    kdim = config.dinov2.hidden_size if cem.use_dinov2 else e
    out = []
    if not cem.enabled:
        out.append("extraction_layer present, but the config has cem.enabled=false")
    if cem.layer_norm:
        out.append("extraction_layer (nn.MultiheadAttention) has no norms, but the config has cem.layer_norm=true")
    extra = sorted(rest - MHA_KEYS)
    if extra:
        out.append(f"extraction_layer: keys {extra} are not nn.MultiheadAttention's (expected {sorted(MHA_KEYS)})")
        return out
    got_e = shape("model.extraction_layer.out_proj.weight")[0] if "out_proj.weight" in rest else None
    if "in_proj_weight" in rest:
        got_k = shape("model.extraction_layer.in_proj_weight")[1]
    else:
        got_k = shape("model.extraction_layer.k_proj_weight")[1] if "k_proj_weight" in rest else None
    if (got_e, got_k) != (e, kdim):
        out.append(f"extraction_layer: nn.MultiheadAttention(embed_dim={got_e}, kdim=vdim={got_k}); the config needs "
                   f"embed_dim={e} (EVA width), kdim=vdim={kdim} ({'DINOv2' if cem.use_dinov2 else 'EVA'} width)")
    return out


def module_problems(ckpt: Checkpoint, keys: dict[str, str], config) -> list[str]:
    """Every mismatch between the author modules and the config (see the module docstring)."""
    def shape(k: str) -> tuple[int, ...]:
        return tuple(ckpt.shape(keys[k]))

    v, q = config.vision, config.vision.qformer
    d, di = config.llm.hidden_size, q.hidden_size
    out = _mha(keys, shape, config)
    n = len(config.cam.layers)
    out += _linears(keys, shape, "adaptive_layers", n, (di, d), config.cam.layers)
    out += _linears(keys, shape, "reintegration_layers", n, (d, di), config.cam.layers)
    if "model.query_tokens" in keys and shape("model.query_tokens") != (1, v.num_query_tokens, di):
        out.append(f"query_tokens {shape('model.query_tokens')}: the config needs (1, {v.num_query_tokens}, {di})")
    if "model.mm_projector.weight" in keys and shape("model.mm_projector.weight") != (d, di):
        out.append(f"mm_projector.weight {shape('model.mm_projector.weight')}: f_image is nn.Linear({di}, {d}) "
                   "(a LLaVA CLIP projector is not CALICO's f_image)")
    depth = len(_indices(keys, QB + "encoder.layer."))
    if depth and depth != q.num_hidden_layers:
        out.append(f"Qformer: {depth} layers, the config has vision.qformer.num_hidden_layers={q.num_hidden_layers}")
    if config.qformer_text_input and depth and QB + "embeddings.word_embeddings.weight" not in keys:
        out.append("qformer_text_input is on, but Qformer.bert.embeddings.word_embeddings is missing")
    for prefix, what, width, want_depth, cfg_name in (
            (VE, "visual_encoder", v.vision.hidden_size, v.vision.num_hidden_layers, "vision.vision"),
            (DM, "dino_model", config.dinov2.hidden_size, config.dinov2.num_hidden_layers, "dinov2")):
        if prefix + "cls_token" in keys:
            got = (shape(prefix + "cls_token")[-1], len(_indices(keys, prefix + "blocks.")))
            if got != (width, want_depth):
                out.append(f"{what}: width {got[0]}, {got[1]} blocks; the config ({cfg_name}) has width {width}, "
                           f"{want_depth} blocks")
    if DM + "cls_token" in keys:
        regs = shape(DM + "register_tokens")[1] if DM + "register_tokens" in keys else 0
        if regs != config.dinov2.num_register_tokens:
            out.append(f"dino_model: {regs} register tokens, the config has "
                       f"dinov2.num_register_tokens={config.dinov2.num_register_tokens}")
    return out


def missing_towers(config, tensors: dict[str, Tensor], has_parts: bool) -> list[str]:
    """The towers neither the checkpoint nor a ``--parts`` directory provides."""
    out = []
    need = ["vision_model", "qformer", "query_tokens", "language_projection", "sam", "llm"]
    if config.cem.enabled and config.cem.use_dinov2:
        need.append("dinov2")
    for top in need:
        if not any(k.startswith(TOWER_KEYS[top]) for k in tensors):
            hint = " (pass --parts DIR: a converted part that has it)" if not has_parts else \
                " (and no --parts directory has it)"
            out.append(f"no {TOWERS[top]} in the checkpoint{hint}")
    return out


def fill_from_parts(config, tensors: dict[str, Tensor], parts: list[str]) -> tuple[Any, dict[str, Tensor], list]:
    """Tensors of converted ``parts`` the checkpoint lacks (torch layout, as the mapping expects), the config
    with those towers' architecture taken from the parts, and one note per part and tower."""
    import jax

    filled: dict[str, Tensor] = {}
    notes = []
    for part in parts:
        try:
            meta = pretrained.read_meta(part)
            if meta["model"] not in PART_PREFIX:
                raise ValueError(f"a {meta['model']!r} checkpoint; --parts takes {sorted(PART_PREFIX)}")
            _, params, part_cfg = pretrained.load(part)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"--parts {part}: {e}") from None
        counts: dict[str, int] = {}
        for path, value in jax.tree_util.tree_leaves_with_path(params):
            keys = PART_PREFIX[meta["model"]] + tuple(p.key for p in path)
            name = author_layout.canonical_from_flax(keys)
            text = re.match(r"qformer\.embeddings\.(word|position)_embeddings", name)
            if name in tensors or name in filled or (text and not config.qformer_text_input):
                continue
            array = author_layout.to_torch_layout(keys[-1], np.asarray(value))
            filled[name] = Tensor((), lambda a=array: a)
            counts[keys[0]] = counts.get(keys[0], 0) + 1
        for top, n in sorted(counts.items()):
            notes.append(f"{TOWERS.get(top, top)}: {n} tensor(s) from --parts {part} (not in the checkpoint)")
        config = _part_config(config, meta["model"], part_cfg, counts)
        if not counts:
            notes.append(f"--parts {part}: nothing used (the checkpoint has all of its tensors)")
    return config, filled, notes


def _part_config(config, model: str, part_cfg, used: dict[str, int]):
    """The architecture of the towers taken from a part is the part's own."""
    if model == "blip2_vision":
        vision = config.vision
        if "vision_model" in used:
            vision = vision.replace(vision=part_cfg.vision)
        if "qformer" in used:
            vision = vision.replace(qformer=part_cfg.qformer.replace(encoder_hidden_size=vision.vision.hidden_size))
        return config.replace(vision=vision)
    if model == "dinov2" and "dinov2" in used:
        return config.replace(dinov2=part_cfg)
    if model == "sam" and "sam" in used:
        return config.replace(sam=part_cfg)
    return config
