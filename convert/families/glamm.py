"""``glamm``: a GLaMM (or LISA) HF directory -> ``glamm_parts`` (LLM + SAM + [SEG] projection).

Source layout (GLaMM ``GLaMMForCausalLM`` / LISA ``LISAForCausalLM``, LoRA merged):

* ``model.embed_tokens|layers|norm.*``, ``lm_head.weight``: the LLaMA decoder; renamed by the
  ``hf-llama`` rules under ``llm.``. The vocabulary (32000 + GLaMM's added tokens) is read from
  ``model.embed_tokens.weight``, not from config.json;
* ``model.grounding_encoder.*`` (GLaMM) / ``model.visual_model.*`` (LISA): segment-anything SAM,
  renamed by the ``sam`` rules under ``sam.`` (architecture inferred from shapes, or ``--config``);
* ``model.text_hidden_fcs.0.0`` / ``.0.2``: the [SEG] projection (``text_hidden_fcs.0.*``);
* ``model.vision_tower.*`` (CLIP ViT-L/14-336), ``model.mm_projector.*``, ``model.region_encoder.*``:
  not used by CALICO, counted as skipped.

Tokenizer files next to the weights are copied to ``OUT/tokenizer/``; the id of ``[SEG]`` found in
them is stored as ``seg_token_id`` (calico-assemble uses it for ``seg.token_id``).

``--config`` (optional): a JSON object ``{"sam": <preset name or segment-anything constructor args>,
"llm": {<transformers LlamaConfig fields overriding config.json>}}``.

``--verify``: LLM logits + final hidden states vs transformers ``LlamaForCausalLM``, SAM embeddings /
masks / IoU for every prompt type (incl. the [SEG] ``text_embeds`` prompt) vs segment-anything
(the ``hf-llama`` and ``sam`` families' checks on the two sub-plans), and ``text_hidden_fcs`` vs
``torch.nn.Sequential``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError, load_json_arg
from calico_jax.core.config import ConfigError
from calico_jax.core.tokens import SEG_TOKEN
from calico_jax.models.glamm_parts import GlammParts, GlammPartsConfig
from calico_jax.models.llama import LlamaConfig, LlamaForCausalLM
from calico_jax.models.sam import PRESETS, Sam, SamConfig
from convert.families import Family, llama, sam
from convert.mapping import Plan, Skip, apply_rules
from convert.verify import Comparison, compare, rng

MODEL = "glamm_parts"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
EMBED = "model.embed_tokens.weight"
UNUSED = [
    (r"model\.vision_tower\..+", Skip("CLIP vision tower (CALICO uses the BLIP-2 vision front end)")),
    (r"model\.mm_projector\..+", Skip("LLaVA mm_projector (CALICO uses the Q-Former + language_projection)")),
    (r"model\.region_encoder\..+", Skip("GLaMM region_encoder (region inputs are not used by CALICO)")),
]


def parts_rules(llm_config: LlamaConfig, sam_prefix: str) -> list:
    """GLaMM/LISA source key -> glamm_parts canonical key: SAM and [SEG] projection first, the unused
    LLaVA parts skipped, then the hf-llama rules (their ``model\\..+`` catches the rest) under ``llm.``."""
    p = re.escape(sam_prefix)
    rules: list = [
        (p + r"((?:image_encoder|prompt_encoder|mask_decoder)\..+)", r"sam.\1"),
        (p + r"pixel_(?:mean|std)", Skip("SAM pixel_mean/pixel_std: fixed normalisation constants")),
        (r"model\.(text_hidden_fcs\..+)", r"\1"),
        *UNUSED,
    ]
    for pattern, target in llama.rules(llm_config):
        rules.append((pattern, target if isinstance(target, Skip) else "llm." + target))
    return rules


def _tokenizer(src: Path) -> tuple[list[Path], int | None]:
    """Tokenizer files in SRC and the id of [SEG] (added_tokens.json or tokenizer.json added_tokens)."""
    files = [src / n for n in TOKENIZER_FILES if src.is_dir() and (src / n).is_file()]
    seg = None
    for f in files:
        try:
            data = json.loads(f.read_text()) if f.suffix == ".json" else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: invalid JSON ({e})") from None
        if f.name == "added_tokens.json" and isinstance(data, dict) and SEG_TOKEN in data:
            seg = int(data[SEG_TOKEN])
        elif f.name == "tokenizer.json" and isinstance(data, dict) and seg is None:
            seg = next((int(t["id"]) for t in data.get("added_tokens", []) if t.get("content") == SEG_TOKEN), None)
    return files, seg


def _llm_config(ckpt: Checkpoint, overrides: dict) -> tuple[LlamaConfig, list[str]]:
    if ckpt.config is None and not overrides:
        raise CheckpointError(f"{ckpt.path}: no config.json next to the weights; pass --config with "
                              '{"llm": {<transformers LlamaConfig fields>}}')
    if EMBED not in ckpt:
        raise CheckpointError(f"{ckpt.path}: {EMBED} not found: not a GLaMM/LISA (LLaVA-LLaMA) checkpoint")
    cfg = {**(ckpt.config or {}), **overrides}
    vocab, width = ckpt.shape(EMBED)
    notes = []
    if cfg.get("vocab_size") not in (None, vocab):
        notes.append(f"vocab_size {vocab} taken from {EMBED} (config.json says {cfg['vocab_size']}: added tokens)")
    cfg["vocab_size"] = vocab
    try:
        return LlamaConfig.from_hf_config(cfg), notes
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: config.json is not a LLaMA config: {e}") from None


def plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    arg = load_json_arg(config_arg, {}, 'GLaMM parts ({"sam": ..., "llm": {...}})') if config_arg else {}
    unknown = sorted(set(arg) - {"sam", "llm"})
    if unknown:
        raise CheckpointError(f"--config: unknown key(s) {unknown}; expected 'sam' and/or 'llm'")
    llm_config, notes = _llm_config(ckpt, dict(arg.get("llm", {})))
    sam_prefix = sam.find_prefix(ckpt.keys(), ckpt.path)
    if "sam" in arg:
        sam_arg = arg["sam"]
    else:
        sam_arg = sam.infer_preset(ckpt, sam_prefix)
        notes.append(f"SAM preset {sam_arg} inferred from the image-encoder shapes")
    try:
        sam_config = SamConfig.from_original(PRESETS[sam_arg] if isinstance(sam_arg, str) and sam_arg in PRESETS
                                             else sam_arg)
        projection = "mlp" if any(k.startswith("model.text_hidden_fcs.0.2.") for k in ckpt.keys()) else "linear"
        files, seg_id = _tokenizer(Path(ckpt.path))
        config = GlammPartsConfig(llm=llm_config, sam=sam_config, seg_projection=projection, seg_token_id=seg_id)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    if not any(k.startswith("model.text_hidden_fcs.") for k in ckpt.keys()):
        raise CheckpointError(f"{ckpt.path}: no model.text_hidden_fcs.* keys: not a GLaMM/LISA checkpoint "
                              "(for a plain LLaMA use hf-llama, for SAM alone use sam)")
    tensors, unexpected, skipped = apply_rules(ckpt.keys(), parts_rules(llm_config, sam_prefix))
    notes.append(f"SAM read from under {sam_prefix!r}; [SEG] projection: {projection}; vocab {llm_config.vocab_size}")
    notes.append(f"tokenizer: {len(files)} file(s) copied to tokenizer/; [SEG] id "
                 + (str(seg_id) if seg_id is not None else "not found"))
    return Plan(MODEL, config, tensors, unexpected, skipped, notes, files=files)


# ---- --verify ---------------------------------------------------------------------------------------

def sub_state(ckpt: Checkpoint, plan: Plan, prefix: str) -> dict[str, np.ndarray]:
    """The canonical tensors under ``prefix`` (prefix removed): the sub-plan of one part."""
    return {k[len(prefix):]: t.load(ckpt) for k, t in plan.tensors.items() if k.startswith(prefix)}


def torch_projection(state: dict[str, np.ndarray]):
    import torch
    mods = [torch.nn.Linear(*state["0.weight"].shape[::-1])]
    if "2.weight" in state:
        mods += [torch.nn.ReLU(), torch.nn.Linear(*state["2.weight"].shape[::-1]), torch.nn.Dropout(0.0)]
    seq = torch.nn.Sequential(*mods).eval()
    seq.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
    return seq


def _prefixed(name: str, comparisons: list[Comparison]) -> list[Comparison]:
    return [dataclasses.replace(c, name=name + c.name) for c in comparisons]


def verify_parts(ckpt: Checkpoint, plan: Plan, params: Any, llm_config: LlamaConfig, sam_config: SamConfig,
                 llm_state: dict[str, np.ndarray], projection: dict[str, np.ndarray]) -> list[Comparison]:
    """LLM (``llm_state``: HF names, LoRA merged) vs transformers, SAM vs segment-anything, f_segmentation
    vs torch; ``params`` holds ``llm``, ``sam`` and ``text_hidden_fcs_0_*`` (shared with ``calico``)."""
    import jax.numpy as jnp
    import torch
    reference = llama.torch_llama(llm_config.replace(lora=None), llm_state)
    ids, mask = llama.random_batch(llm_config)
    out = _prefixed("llm: ", llama.compare_logits(LlamaForCausalLM(llm_config), params["llm"], reference, ids, mask))
    ref_sam = sam.build_original(sam_config)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sub_state(ckpt, plan, "sam.").items()}
    missing, unexpected = ref_sam.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"--verify: segment-anything Sam does not take the SAM tensors "
                              f"(missing {missing}, unexpected {unexpected})")
    out += _prefixed("sam: ", sam.compare_original(ref_sam, Sam(sam_config), params["sam"]))
    hidden = rng(5).normal(0, 1, (3, llm_config.hidden_size)).astype(np.float32)
    fcs = {k: params[k] for k in ("text_hidden_fcs_0_0", "text_hidden_fcs_0_2") if k in params}
    kind = "mlp" if "text_hidden_fcs_0_2" in fcs else "linear"
    parts = GlammParts(GlammPartsConfig(llm=llm_config, sam=sam_config, seg_projection=kind))
    ours = parts.apply({"params": fcs}, jnp.asarray(hidden), method="project_seg")
    with torch.no_grad():
        out.append(compare("text_hidden_fcs", ours, torch_projection(projection)(torch.from_numpy(hidden))))
    return out


def verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list[Comparison]:
    cfg = plan.config
    return verify_parts(ckpt, plan, params, cfg.llm, cfg.sam, sub_state(ckpt, plan, "llm."),
                        sub_state(ckpt, plan, "text_hidden_fcs.0."))


GLAMM = Family("glamm", plan, verify)
