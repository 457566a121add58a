"""``peft-lora``: a PEFT LoRA adapter + a converted ``hf-llama`` base -> ``llama`` with LoRA leaves.

``python -m convert peft-lora --src ADAPTER_DIR --base BASE_OUT --out OUT [--verify]``

SRC holds ``adapter_config.json`` and ``adapter_model.safetensors|bin``. Accepted key forms:

* current PEFT files: ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` [r, in];
* in-memory names with the adapter name: ``...q_proj.lora_A.default.weight``;
* keys without the ``base_model.model.`` prefix;
* full training state dicts (old peft < 0.7 as pinned by LISA/GLaMM, or newer with ``base_layer``):
  non-LoRA LLaMA tensors found in SRC (``...q_proj.weight``, ``...q_proj.base_layer.weight``,
  ``model.embed_tokens.weight``, ``lm_head.weight``) replace the base's, since training updated them.

The output is the base model's params plus ``lora_a`` [in, r] / ``lora_b`` [r, out] leaves and the
LoRA settings in the config; ``calico_jax.models.lora.merge_lora`` folds them in.
``--verify`` compares our LoRA forward and our merged params with peft's model and
``merge_and_unload()`` on a random prompt.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from calico_jax.checkpoints import converted as pretrained
from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError
from calico_jax.models.llama import LlamaConfig, LlamaForCausalLM
from calico_jax.models.lora import LORA_LEAVES, TARGETABLE, LoraConfig, merge_lora
from convert.families import Family
from convert.families.llama import hf_state_dict, random_batch, torch_llama
from convert.mapping import Plan, Skip, Tensor, apply_rules, canonical_name
from convert.verify import Comparison, compare

PREFIX = r"(?:base_model\.model\.)?"
LORA_KEY = re.compile(PREFIX + r"(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+_proj))\.lora_([AB])(?:\.\w+)?\.weight")
RULES = [
    (LORA_KEY.pattern.replace("([AB])", "A"), r"\1.lora_a"),
    (LORA_KEY.pattern.replace("([AB])", "B"), r"\1.lora_b"),
    (PREFIX + r"(?:.+\.)?(?:original_module)\..+", Skip("PEFT original_module copies (the trained copy is used)")),
    (PREFIX + r"(model\..+?)(?:\.base_layer)?(?:\.modules_to_save(?:\.\w+)?)?\.(weight|bias)", r"\1.\2"),
    (PREFIX + r"(lm_head)(?:\.modules_to_save(?:\.\w+)?)?\.weight", r"\1.weight"),
    (PREFIX + r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", Skip("RoPE inv_freq buffers (recomputed)")),
]
UNSUPPORTED = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "rank_pattern": ({}, None),
               "alpha_pattern": ({}, None), "layers_to_transform": (None,), "layer_replication": (None,)}


def adapter_dir(ckpt: Checkpoint) -> Path:
    return ckpt.path if ckpt.path.is_dir() else ckpt.path.parent


def read_adapter_config(ckpt: Checkpoint, config_arg: str | None) -> dict[str, Any]:
    path = Path(config_arg) if config_arg else adapter_dir(ckpt) / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter_config.json not found (pass --config ADAPTER_CONFIG.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    for field, allowed in UNSUPPORTED.items():
        if cfg.get(field, allowed[0]) not in allowed:
            raise CheckpointError(f"{path}: {field}={cfg[field]!r} is not supported")
    return cfg


def target_modules(spec: Any, num_layers: int, where: str) -> tuple[str, ...]:
    """PEFT ``target_modules`` (names, a regex over module paths, or 'all-linear') -> our names."""
    if spec == "all-linear":
        return TARGETABLE
    if isinstance(spec, str):
        found = []
        for name in TARGETABLE:
            group = "self_attn" if name in TARGETABLE[:4] else "mlp"
            hits = {bool(re.fullmatch(spec, f"model.layers.{i}.{group}.{name}")) for i in range(num_layers)}
            if len(hits) > 1:
                raise CheckpointError(f"{where}: target_modules regex {spec!r} selects {name} in only some layers")
            if hits == {True}:
                found.append(name)
        return tuple(found)
    names = set(spec or ())
    unknown = sorted(n for n in names if n.rsplit(".", 1)[-1] not in TARGETABLE)
    if unknown:
        raise CheckpointError(f"{where}: target_modules {unknown} are not LLaMA linears {list(TARGETABLE)}")
    return tuple(n for n in TARGETABLE if n in {x.rsplit(".", 1)[-1] for x in names})


def _load_base(base: str):
    try:
        meta = pretrained.read_meta(base)
        if meta.get("model") != "llama":
            raise CheckpointError(f"--base {base}: a {meta.get('model')!r} checkpoint, expected 'llama' (hf-llama)")
        module, params, config = pretrained.load(base)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"--base {base}: {e}") from None
    if config.lora is not None:
        raise CheckpointError(f"--base {base}: already has LoRA leaves; pass the plain hf-llama conversion")
    return params, config


def plan(ckpt: Checkpoint, config_arg: str | None, base: str | None = None) -> Plan:
    if base is None:
        raise CheckpointError("peft-lora needs --base DIR: the base model converted with `python -m convert hf-llama`")
    where = str(adapter_dir(ckpt) / "adapter_config.json")
    acfg = read_adapter_config(ckpt, config_arg)
    base_params, base_cfg = _load_base(base)
    lora = LoraConfig(r=int(acfg["r"]), alpha=float(acfg.get("lora_alpha", 8)),
                      dropout=float(acfg.get("lora_dropout", 0.0)),
                      target_modules=target_modules(acfg.get("target_modules"), base_cfg.num_hidden_layers, where),
                      use_rslora=bool(acfg.get("use_rslora", False)))
    config = base_cfg.replace(lora=lora)
    tensors, unexpected, skipped = apply_rules(ckpt.keys(), RULES)
    mismatched = []
    for canonical, tensor in list(tensors.items()):
        if canonical.endswith(LORA_LEAVES):
            shape = tuple(ckpt.shape(tensor.sources[0]))
            want = _lora_shape(config, canonical)
            if want is not None and shape != want:
                mismatched.append(f"{tensor.sources[0]} {shape}: expected {want} (r={lora.r})")
            tensors[canonical] = Tensor(tensor.sources, np.transpose)  # torch [r,in]/[out,r] -> flax
    if mismatched:
        raise CheckpointError(f"{ckpt.path}: {len(mismatched)} LoRA shape mismatch(es):\n    "
                              + "\n    ".join(mismatched))
    replaced = 0
    import jax
    for path, value in jax.tree_util.tree_leaves_with_path(base_params):
        keys = tuple(p.key for p in path)
        name = canonical_name(keys)
        if name in tensors:
            replaced += 1
            continue
        value = np.asarray(value)
        tensors[name] = Tensor((), (lambda v=value.T if keys[-1] == "kernel" else value: v))
    notes = [f"LoRA r={lora.r} alpha={lora.alpha:g} (scaling {lora.scaling:g}) on {', '.join(lora.target_modules)}",
             f"base params from {base}"]
    if replaced:
        notes.append(f"{replaced} base tensor(s) taken from the adapter file instead of --base")
    return Plan("llama", config, tensors, unexpected, skipped, notes)


def _lora_shape(config: LlamaConfig, canonical: str) -> tuple[int, int] | None:
    name = canonical.split(".")[-2]
    c = config
    dims = {"q_proj": (c.hidden_size, c.num_attention_heads * c.head_dim),
            "k_proj": (c.hidden_size, c.num_key_value_heads * c.head_dim),
            "v_proj": (c.hidden_size, c.num_key_value_heads * c.head_dim),
            "o_proj": (c.num_attention_heads * c.head_dim, c.hidden_size),
            "gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
            "down_proj": (c.intermediate_size, c.hidden_size)}.get(name)
    if dims is None:
        return None
    return (c.lora.r, dims[0]) if canonical.endswith("lora_a") else (dims[1], c.lora.r)


def _peft_model(ckpt: Checkpoint, plan: Plan, torch_model):
    """peft's own reading of the adapter where the file uses standard names, else its LoraConfig +
    set_peft_model_state_dict on the normalised keys."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    keys = ckpt.keys()
    if all(re.fullmatch(r"base_model\.model\..+\.lora_[AB]\.weight", k) for k in keys) and \
            (adapter_dir(ckpt) / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(torch_model, str(adapter_dir(ckpt))).eval()
    lora = plan.config.lora
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), use_rslora=lora.use_rslora)
    model = get_peft_model(torch_model, peft_cfg)
    state = {}
    for k in keys:
        m = LORA_KEY.fullmatch(k)
        if m:
            state[f"base_model.model.{m.group(1)}.lora_{m.group(3)}.weight"] = torch.from_numpy(
                np.array(ckpt.get(k), np.float32))
    set_peft_model_state_dict(model, state)
    return model.eval()


def verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list[Comparison]:
    import jax.numpy as jnp
    import torch

    base_cfg = plan.config.replace(lora=None)
    merged = merge_lora(params, plan.config.lora)
    strip = lambda n: {k: strip(v) for k, v in n.items() if k not in LORA_LEAVES} if isinstance(n, dict) else n  # noqa: E731
    ref = _peft_model(ckpt, plan, torch_llama(base_cfg, hf_state_dict(strip(params))))
    ids, mask = random_batch(base_cfg)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    run_torch = lambda m: m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),  # noqa: E731
                            position_ids=torch.from_numpy(pos)).logits.numpy()
    ref_lora = run_torch(ref)
    ref_merged = run_torch(ref.merge_and_unload())
    keep = mask.astype(bool)
    ours = plan.module().apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)).logits
    ours_merged = LlamaForCausalLM(base_cfg).apply(
        {"params": merged}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)).logits
    return [compare("lora_logits (vs peft)", np.asarray(ours)[keep], ref_lora[keep]),
            compare("merged_logits (vs merge_and_unload)", np.asarray(ours_merged)[keep], ref_merged[keep])]


PEFT_LORA = Family("peft-lora", plan, verify)
