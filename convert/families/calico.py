"""``calico``: an official CALICO checkpoint (PyTorch) -> ``calico``.

The official key layout is not public, so the family matches keys against a pattern table: a list
of ``(regex, target)`` pairs, the first full match wins (``re`` replacement syntax in targets). A
leading ``base_model.model.`` (PEFT wrapper) is removed and ``.base_layer.`` dropped before matching.

1. ``patterns`` from ``--config`` (tried first: they override everything below);
2. :data:`DEFAULT_PATTERNS`, the guessed names of the CALICO-only parts (``model.`` optional, the
   module name alternatives in the regexes): BLIP-2 front end (``[blip2.|instructblip.]vision_model.*``,
   ``qformer.*``, ``query_tokens``, ``language_projection.*``, HF names; a fused ``qkv.bias`` is split),
   DINOv2 (``dinov2.*``, HF names), the CEM (``cem.*``: our ``q_proj/k_proj/v_proj/out_proj``, or
   ``nn.MultiheadAttention``'s ``q_proj_weight``/``in_proj_weight``/``in_proj_bias``/``out_proj``),
   the CAMs (``cams.<i>.*`` = the i-th of ``cam.layers``, or ``cam_<layer>.*``; ``f_adaptation`` /
   ``f_reintegration``), their queries (``cam_query_tokens`` / Cheetah's ``new_query_tokens``) and
   PEFT LoRA factors (``lora_A``/``lora_B``[``.default``]``.weight``);
3. GLaMM names (the ``glamm`` family's rules): LLM ``model.*`` / ``lm_head``, SAM under
   ``model.grounding_encoder.`` / ``model.visual_model.``, ``model.text_hidden_fcs.*``; CLIP tower,
   ``mm_projector``, ``region_encoder`` skipped.

Targets are our canonical names (``llm.model.layers.0.self_attn.q_proj.weight``, ``cem.q_proj.weight``,
``cam_11.f_adaptation.bias``, ...) with optional modifiers: ``<cam:N>`` -> ``cam_{cam.layers[N]}``;
``@T`` transposes a 2-D tensor; ``@chunk(i,n)`` takes the i-th of n equal slices along axis 0; several
targets for one key are joined by ``|``; the target ``skip`` drops the key.

``--config`` (a JSON file): ``{"config": {CalicoConfig fields, merged into the paper defaults},
"patterns": [[regex, target], ...]}``. ``llm.vocab_size`` is read from the embedding tensor. Keys that
no pattern matches are listed and the conversion stops.

``--verify``: the LLM (LoRA merged into the torch weights) vs transformers, SAM vs segment-anything and
the [SEG] projection (the ``glamm`` checks). BLIP-2, DINOv2, CEM and CAMs are not verified here (no
official PyTorch CALICO to run): their tensors are copied as they are (transposes only).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from calico_jax.config import ConfigError
from calico_jax.models.calico import CalicoConfig
from convert.assemble import merge
from convert.families import Family, glamm, sam
from convert.families.blip2 import split_qkv_bias
from convert.families.dinov2 import _HF_RULES as DINOV2_RULES
from convert.io import Checkpoint, CheckpointError, load_json_arg
from convert.mapping import Plan, Skip, Tensor

P = r"(?:model\.)?"
BLIP2 = P + r"(?:blip2\.|instructblip\.)?"
CEM = P + r"(?:cem|correspondence_extraction)\.(?:attn\.|attention\.)?"
CAM = P + r"(?:cams|cam_modules|correspondence_adaptation)\.(\d+)\."
LINEAR = r"(f_adaptation|f_reintegration)\.(weight|bias)"
DEFAULT_PATTERNS: list[tuple[str, str]] = [
    (BLIP2 + r"qformer\.embeddings\.(?:word_embeddings|position_embeddings)\..+|.*position_ids", "skip"),
    (BLIP2 + r"((?:vision_model|qformer)\..+)", r"\1"),
    (BLIP2 + r"(query_tokens|language_projection\.(?:weight|bias))", r"\1"),
    (CEM + r"(q_proj|k_proj|v_proj|out_proj|norm_q|norm_kv)\.(weight|bias)", r"cem.\1.\2"),
    (CEM + r"([qkv])_proj_weight", r"cem.\1_proj.weight"),
    (CEM + r"in_proj_weight", "cem.q_proj.weight@chunk(0,3)|cem.k_proj.weight@chunk(1,3)|cem.v_proj.weight@chunk(2,3)"),
    (CEM + r"in_proj_bias", "cem.q_proj.bias@chunk(0,3)|cem.k_proj.bias@chunk(1,3)|cem.v_proj.bias@chunk(2,3)"),
    (CAM + LINEAR, r"<cam:\1>.\2.\3"),
    (P + r"(cam_\d+)\." + LINEAR, r"\1.\2.\3"),
    (P + r"(?:cam_query_tokens|new_query_tokens)", "cam_query_tokens"),
    (P + r"(cam_query_tokens_\d+)", r"\1"),
    (r"model\.(layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.lora_A(?:\.default)?\.weight", r"llm.model.\1.lora_a@T"),
    (r"model\.(layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.lora_B(?:\.default)?\.weight", r"llm.model.\1.lora_b@T"),
    *[(P + r"(?:dinov2|dino)\." + pattern, target if isinstance(target, Skip) else "dinov2." + target)
      for pattern, target in DINOV2_RULES],
]
_CHUNK = re.compile(r"@chunk\((\d+),(\d+)\)$")


def _transform(target: str, cam_layers: tuple[int, ...], key: str) -> tuple[str, Any]:
    """``target[@T][@chunk(i,n)]`` -> (canonical name, combine function or None)."""
    steps = []
    m = _CHUNK.search(target)
    if m:
        i, n = int(m[1]), int(m[2])
        target = target[:m.start()]
        steps.append(lambda x, i=i, n=n: np.split(x, n, axis=0)[i])
    if target.endswith("@T"):
        target = target[:-2]
        steps.insert(0, np.transpose)

    def cam(m: re.Match) -> str:
        i = int(m[1])
        if i >= len(cam_layers):
            raise CheckpointError(f"{key}: CAM index {i}, but the config has {len(cam_layers)} CAM layer(s) "
                                  f"{list(cam_layers)} (set config.cam.layers)")
        return f"cam_{cam_layers[i]}"

    target = re.sub(r"<cam:(\d+)>", cam, target)
    if not steps:
        return target, None
    return target, lambda x, steps=tuple(steps): _apply(steps, x)


def _apply(steps, x):
    for f in steps:
        x = f(x)
    return np.ascontiguousarray(x)


def _rules(arg: dict, config: CalicoConfig, sam_prefix: str) -> list:
    user = arg.get("patterns", [])
    if isinstance(user, dict):
        user = list(user.items())
    if not all(isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in user):
        raise CheckpointError('--config "patterns": expected [[regex, target], ...] or {regex: target}')
    for pattern, _ in user:
        try:
            re.compile(pattern)
        except re.error as e:
            raise CheckpointError(f"--config pattern {pattern!r}: {e}") from None
    # The LLaMA catch-all ``model\..+`` would claim every unknown ``model.*`` key: name the LLM's parts.
    llm = [(r"model\.(?:embed_tokens|norm|layers\.\d+)\..+", t) if p == r"model\..+" else (p, t)
           for p, t in glamm.parts_rules(config.llm.replace(lora=None), sam_prefix)]
    return [*user, *DEFAULT_PATTERNS, *llm]


def _config(ckpt: Checkpoint, keys: list[str], arg: dict) -> CalicoConfig:
    overrides = dict(arg.get("config", {}))
    if glamm.EMBED in keys and "vocab_size" not in overrides.get("llm", {}):
        overrides["llm"] = {**overrides.get("llm", {}), "vocab_size": ckpt.shape(keys[glamm.EMBED])[0]}
    try:
        return CalicoConfig.from_dict(merge(CalicoConfig().to_dict(), overrides))
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: CALICO config: {e}") from None


def plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    arg = load_json_arg(config_arg, {}, 'CALICO conversion settings ({"config": ..., "patterns": ...})') \
        if config_arg else {}
    unknown = sorted(set(arg) - {"config", "patterns"})
    if unknown:
        raise CheckpointError(f"--config: unknown key(s) {unknown}; expected 'config' and/or 'patterns'")
    # key as matched -> source key (PEFT wrapper removed)
    keys = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): k for k in ckpt.keys()}
    config = _config(ckpt, keys, arg)
    sam_prefix = sam._find_prefix(list(keys), ckpt.path)
    compiled = [(re.compile(p), t) for p, t in _rules(arg, config, sam_prefix)]
    tensors: dict[str, Tensor] = {}
    unmatched: list[str] = []
    skipped: dict[str, int] = {}
    for key, source in keys.items():
        hit = next(((p.fullmatch(key), t) for p, t in compiled if p.fullmatch(key)), None)
        if hit is None:
            unmatched.append(source)
            continue
        m, target = hit
        if isinstance(target, Skip) or target == "skip":
            reason = target.reason if isinstance(target, Skip) else "pattern table: skip"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        for one in m.expand(target).split("|"):
            name, combine = _transform(one, config.cam.layers, source)
            if name in tensors:
                raise CheckpointError(f"{ckpt.path}: {source} and {', '.join(tensors[name].sources)} both map "
                                      f"to {name}")
            tensors[name] = Tensor((source,), combine)
    if unmatched:
        shown = "\n    ".join(sorted(unmatched)[:80])
        more = f"\n    ... and {len(unmatched) - 80} more" if len(unmatched) > 80 else ""
        raise CheckpointError(
            f"{ckpt.path}: {len(unmatched)} key(s) match no pattern:\n    {shown}{more}\n  add [regex, target] "
            'pairs under "patterns" in a --config JSON file (see convert/families/calico.py)')
    notes = split_qkv_bias(tensors, ckpt)
    notes.append(f"SAM under {sam_prefix!r}; CAM layers {list(config.cam.layers)}; vocab {config.llm.vocab_size}")
    return Plan("calico", config, tensors, [], skipped, notes)


def verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list:
    cfg = plan.config
    llm = glamm.sub_state(ckpt, plan, "llm.")
    if cfg.llm.lora is not None:   # the torch reference gets W + s·(A B)ᵀ
        for name in [k for k in llm if k.endswith(".lora_a")]:
            base = name[:-len("lora_a")]
            a, b = (np.asarray(llm.pop(base + leaf), np.float32) for leaf in ("lora_a", "lora_b"))
            llm[base + "weight"] = np.asarray(llm[base + "weight"], np.float32) + cfg.llm.lora.scaling * (a @ b).T
    return glamm.verify_parts(ckpt, plan, params, cfg.llm, cfg.sam, llm,
                              glamm.sub_state(ckpt, plan, "text_hidden_fcs.0."))


CALICO = Family("calico", 'official CALICO checkpoint (layout guessed: GLaMM names + a pattern table; --config '
                '{"config": {...}, "patterns": [[regex, target], ...]})', plan, verify)
