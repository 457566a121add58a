"""``calico``: a CALICO checkpoint (PyTorch) -> ``calico``.

The official CALICO code is not public; the released weights (``PLAN-Lab/CALICO``) are a merged Hugging Face
checkpoint. The family matches keys against a pattern table: a list of ``(regex, target)`` pairs, the first
full match wins (``re`` replacement syntax in targets). A leading ``base_model.model.`` (PEFT wrapper) is
removed and ``.base_layer.`` dropped before matching.

1. ``patterns`` from ``--config`` (tried first: they override everything below);
2. the **author layout** (:mod:`calico_jax.checkpoints.author_layout`, the names of the first author's public
CALICO-style
   LISA code): ``model.Qformer.bert.*``, ``model.query_tokens``, ``model.visual_encoder.*`` + ``model.ln_vision.*``
   (LAVIS EVA), ``model.mm_projector.*`` (f_image), ``model.dino_model.*`` (torch-hub DINOv2),
   ``model.extraction_layer.*`` (𝓐 as ``nn.MultiheadAttention``), ``model.adaptive_layers.{i}.*`` /
   ``model.reintegration_layers.{i}.*`` (the i-th CAM's f_adaptation / f_reintegration),
   ``model.grounding_encoder.*`` (SAM), ``model.text_hidden_fcs.*``, the LLaMA ``model.*`` / ``lm_head``;
3. older guessed names (HF BLIP-2 names under ``[model.][blip2.|instructblip.]``, HF DINOv2 under
   ``dinov2.``, ``cem.*``, ``cams.<i>.*`` / ``cam_<layer>.*``, ``new_query_tokens``) and PEFT LoRA factors
   (``lora_A``/``lora_B``[``.default``]``.weight``);
4. GLaMM names (the ``glamm`` family's rules); CLIP tower, LLaVA ``mm_projector.0/2``, ``region_encoder`` skipped.

Sources: SRC is a file or a directory (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, or
``.bin`` shards with mixed bf16/fp32 tensors, read with ``torch.load(weights_only=True)``). A PEFT adapter
directory ``SRC/adapter/`` (``adapter_model.safetensors``, as ``python -m calico_jax.export --format torch``
writes) supplies the LoRA factors. A checkpoint without LoRA factors has them merged: ``llm.lora`` is set to
none (noted). Towers the merged file may omit (EVA ViT + ``ln_vision``, DINOv2, ...) come from ``--parts DIR
...``: directories converted with ``python -m convert`` (``lavis-blip2`` / ``hf-blip2``, ``dinov2`` /
``hf-dinov2``); each fills only what the checkpoint lacks, and a message says which tower came from where.

The config: ``config.json``'s ``calico_jax`` entry when SRC has one (our export writes it), else the paper
defaults; then ``--config`` (a JSON file ``{"config": {CalicoConfig fields, merged in}, "patterns": [[regex,
target], ...]}``). ``llm.vocab_size`` is read from the embedding tensor; the DINOv2 preset from
``model.dino_model`` shapes when ``--config`` does not set ``dinov2``. Before any tensor is read, the shape of
each author module is checked against the config (:mod:`convert.families.calico_checks`: is
``extraction_layer`` an ``nn.MultiheadAttention(D_C, kdim=vdim=D_S)``, ``adaptive_layers`` a ``ModuleList``
of one ``nn.Linear(D, D_I)`` per CAM, ...) and every mismatch is reported together.

Targets are our canonical names (``llm.model.layers.0.self_attn.q_proj.weight``, ``cem.q_proj.weight``,
``cam_11.f_adaptation.bias``, ...) with optional modifiers: ``<cam:N>`` -> ``cam_{cam.layers[N]}``;
``@T`` transposes a 2-D tensor; ``@chunk(i,n)`` takes the i-th of n equal slices along axis 0; several
targets for one key are joined by ``|``; the target ``skip`` drops the key.

``--verify``: the LLM (LoRA merged into the torch weights) vs transformers, SAM vs segment-anything and
the [SEG] projection (the ``glamm`` checks). BLIP-2, DINOv2, CEM and CAMs are copied as they are
(transposes and splits only); ``tests/test_convert_calico_e2e.py`` checks them against a PyTorch assembly.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from calico_jax.checkpoints import author_layout
from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError, load_json_arg, open_checkpoint
from calico_jax.core.config import ConfigError
from calico_jax.models.calico import CalicoConfig
from convert.assemble import merge
from convert.families import Family, calico_checks, glamm, sam
from convert.families.blip2 import split_qkv_bias
from convert.families.dinov2 import HF_RULES as DINOV2_RULES
from convert.mapping import Plan, Skip, Tensor

P = r"(?:model\.)?"
BLIP2 = P + r"(?:blip2\.|instructblip\.)?"
CEM = P + r"(?:cem|correspondence_extraction)\.(?:attn\.|attention\.)?"
CAM = P + r"(?:cams|cam_modules|correspondence_adaptation)\.(\d+)\."
LINEAR = r"(f_adaptation|f_reintegration)\.(weight|bias)"
LORA = [
    (r"model\.(layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.lora_A(?:\.default)?\.weight", r"llm.model.\1.lora_a@T"),
    (r"model\.(layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.lora_B(?:\.default)?\.weight", r"llm.model.\1.lora_b@T"),
]
AUTHOR_SKIPS = [
    (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "skip"),
    (r"model\.Qformer\.bert\.embeddings\.position_ids", "skip"),
    (r"model\.Qformer\.cls\..+", "skip"),
]
GUESSED_PATTERNS: list[tuple[str, str]] = [
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
    *[(P + r"(?:dinov2|dino)\." + pattern, target if isinstance(target, Skip) else "dinov2." + target)
      for pattern, target in DINOV2_RULES],
]
_CHUNK = re.compile(r"@chunk\((\d+),(\d+)\)$")
TEXT_OFF = Skip("Q-Former instruction embeddings (qformer_text_input is off: the Q-Former reads no text)")


def author_patterns(config: CalicoConfig | None = None) -> list[tuple[str, Any]]:
    """The author layout (:mod:`calico_jax.checkpoints.author_layout`) as ``(regex, target)`` pairs for this config."""
    out: list[tuple[str, Any]] = list(AUTHOR_SKIPS)
    for rule in author_layout.RULES:
        target: Any = rule.forward_target()
        if config is not None and target.startswith("qformer.embeddings."):
            if "layernorm" in target and not config.vision.qformer.text_embeddings:   # BLIP-2 Q-Former layout
                target = target.replace("qformer.embeddings.layernorm", "qformer.layernorm")
            elif "layernorm" not in target and not config.qformer_text_input:
                target = TEXT_OFF
        out.append((rule.author_regex.pattern, target))
    return out


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
        x = f(np.asarray(x))
    return np.ascontiguousarray(x)


def _user_patterns(arg: dict) -> list:
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
    return user


def rules(arg: dict, config: CalicoConfig, sam_prefix: str) -> list:
    """Every rule in the order they are tried (user, author layout, LoRA, guessed names, GLaMM)."""
    # The LLaMA catch-all ``model\..+`` would claim every unknown ``model.*`` key: name the LLM's parts.
    llm = [(r"model\.(?:embed_tokens|norm|layers\.\d+)\..+", t) if p == r"model\..+" else (p, t)
           for p, t in glamm.parts_rules(config.llm.replace(lora=None), sam_prefix)]
    return [*_user_patterns(arg), *LORA, *author_patterns(config), *GUESSED_PATTERNS, *llm]


def _config(ckpt: Checkpoint, keys: dict[str, str], arg: dict) -> tuple[CalicoConfig, list[str]]:
    base = CalicoConfig().to_dict()
    notes = []
    stored = (ckpt.config or {}).get("calico_jax")
    if isinstance(stored, dict):
        base = merge(base, stored)
        notes.append("config: config.json's calico_jax entry")
    overrides = dict(arg.get("config", {}))
    if glamm.EMBED in keys and "vocab_size" not in overrides.get("llm", {}):
        overrides["llm"] = {**overrides.get("llm", {}), "vocab_size": ckpt.shape(keys[glamm.EMBED])[0]}
    if "dinov2" not in overrides and not isinstance(stored, dict):
        preset = calico_checks.dinov2_preset(ckpt, keys)
        if preset is not None:
            overrides["dinov2"] = preset[1]
            notes.append(f"DINOv2 preset {preset[0]} inferred from the model.dino_model shapes")
    try:
        return CalicoConfig.from_dict(merge(base, overrides)), notes
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: CALICO config: {e}") from None


def _adapter(ckpt: Checkpoint) -> Checkpoint | None:
    """``SRC/adapter/`` (a PEFT LoRA adapter directory) as a second checkpoint, if present."""
    d = Path(ckpt.path) / author_layout.ADAPTER_DIR
    return open_checkpoint(d) if d.is_dir() and Path(ckpt.path).is_dir() else None


def _strip(key: str) -> str:
    return key.removeprefix(author_layout.PEFT_PREFIX).replace(".base_layer.", ".")


def _match(sources: dict[str, str], compiled: list, cam_layers, path) -> tuple[dict, list, dict]:
    tensors: dict[str, tuple[str, Any]] = {}
    unmatched: list[str] = []
    skipped: dict[str, int] = {}
    for key, source in sources.items():
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
            name, combine = _transform(one, cam_layers, source)
            if name in tensors:
                raise CheckpointError(f"{path}: {source} and {tensors[name][0]} both map to {name}")
            tensors[name] = (source, combine)
    return tensors, unmatched, skipped


def _cam_queries_from_q(config: CalicoConfig, tensors: dict[str, Tensor]) -> list[str]:
    """The author code has one q (``query_tokens``, trained) for 𝓘 and the CAMs: a config whose CAMs have their
    own copy (``cam.queries`` shared / per_cam) starts that copy from it -- the same model until trained."""
    names = {"shared": ["cam_query_tokens"], "per_cam": [f"cam_query_tokens_{i}" for i in config.cam.layers]}
    missing = [n for n in names.get(config.cam.queries, []) if n not in tensors] if config.cam.layers else []
    if not missing or "query_tokens" not in tensors:
        return []
    for n in missing:
        tensors[n] = tensors["query_tokens"]
    return [f"{', '.join(missing)}: not in the checkpoint, copied from query_tokens (cam.queries="
            f"{config.cam.queries!r}; the author code uses query_tokens itself, i.e. cam.queries='base')"]


def plan(ckpt: Checkpoint, config_arg: str | None, parts: list[str] | None = None) -> Plan:
    arg = load_json_arg(config_arg, {}, 'CALICO conversion settings ({"config": ..., "patterns": ...})') \
        if config_arg else {}
    unknown = sorted(set(arg) - {"config", "patterns"})
    if unknown:
        raise CheckpointError(f"--config: unknown key(s) {unknown}; expected 'config' and/or 'patterns'")
    keys = {_strip(k): k for k in ckpt.keys()}      # key as matched -> source key (PEFT wrapper removed)
    adapter = _adapter(ckpt)
    adapter_keys = {_strip(k): k for k in adapter.keys()} if adapter is not None else {}
    config, notes = _config(ckpt, keys, arg)
    has_lora = any(".lora_A" in k for k in [*keys, *adapter_keys])
    if not has_lora and config.llm.lora is not None:
        config = config.replace(llm=config.llm.replace(lora=None))
        notes.append("no LoRA factors in the checkpoint (merged into the LLaMA weights): llm.lora = none")
    problems = calico_checks.module_problems(ckpt, keys, config)   # from shapes alone, before any matching
    if problems:
        raise CheckpointError(f"{ckpt.path}: {len(problems)} module(s) do not match the CALICO config:\n    "
                              + "\n    ".join(problems))
    sam_prefix = sam.find_prefix(list(keys), ckpt.path)
    compiled = [(re.compile(p), t) for p, t in rules(arg, config, sam_prefix)]
    matched, unmatched, skipped = _match(keys, compiled, config.cam.layers, ckpt.path)
    tensors = {name: Tensor((source,), combine) for name, (source, combine) in matched.items()}
    if adapter is not None:
        lora, extra, _ = _match(adapter_keys, [(re.compile(p), t) for p, t in LORA], config.cam.layers, adapter.path)
        unmatched += [f"{k} (in {adapter.path})" for k in extra]
        for name, (source, combine) in lora.items():
            tensors[name] = Tensor((), lambda s=source, c=combine: c(adapter.get(s)))
        notes.append(f"LoRA factors: {len(lora)} tensor(s) from {adapter.path}")
    if unmatched:
        shown = "\n    ".join(sorted(unmatched)[:80])
        more = f"\n    ... and {len(unmatched) - 80} more" if len(unmatched) > 80 else ""
        raise CheckpointError(
            f"{ckpt.path}: {len(unmatched)} key(s) match no pattern:\n    {shown}{more}\n  add [regex, target] "
            'pairs under "patterns" in a --config JSON file (see convert/families/calico.py)')
    config, filled, part_notes = calico_checks.fill_from_parts(config, tensors, parts or [])
    tensors.update(filled)
    notes += part_notes + _cam_queries_from_q(config, tensors)
    missing = calico_checks.missing_towers(config, tensors, bool(parts))
    if missing:
        raise CheckpointError(f"{ckpt.path}: {len(missing)} tower(s) missing:\n    " + "\n    ".join(missing))
    notes += split_qkv_bias(tensors, ckpt)
    notes.append(f"SAM under {sam_prefix!r}; CAM layers {list(config.cam.layers)}; vocab {config.llm.vocab_size}")
    files = tokenizer_files(Path(ckpt.path))
    if files:
        notes.append(f"tokenizer: {len(files)} entr{'y' if len(files) == 1 else 'ies'} copied to tokenizer/")
    return Plan("calico", config, tensors, [], skipped, notes, files=files)


def tokenizer_files(src: Path) -> list[Path]:
    """The tokenizer that travels with a CALICO checkpoint: ``SRC/tokenizer/`` (what ``calico_jax.export --format
    torch`` writes; its sub-directories, e.g. the Q-Former's, included) or the files next to the weights."""
    root = src if src.is_dir() else src.parent
    if (root / "tokenizer").is_dir():
        return sorted((root / "tokenizer").iterdir())
    return [root / n for n in glamm.TOKENIZER_FILES if (root / n).is_file()]


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


CALICO = Family("calico", plan, verify)
