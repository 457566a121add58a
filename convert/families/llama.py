"""``hf-llama``: transformers ``LlamaForCausalLM`` directories (Vicuna, LLaMA-1/2) -> ``llama``.

Canonical names are the HF names themselves; the generic rule only transposes Linear kernels and
maps RMSNorm ``weight`` -> ``scale``, Embedding ``weight`` -> ``embedding`` (rotate_half RoPE, so no
q/k permutation). Shards are read tensor by tensor (calico_jax.checkpoints.torch_files), never two copies of the model.

``--verify``: logits and final-norm hidden states of a random left-padded batch, then a greedy
generation of 32 tokens compared with transformers' ``generate(do_sample=False)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError, hf_config
from calico_jax.inference.generate import generate
from calico_jax.models.llama import LlamaConfig
from convert.families import Family
from convert.mapping import Plan, Skip, apply_rules, canonical_name
from convert.verify import Comparison, compare

GREEDY_TOKENS = 32


def llama_config(ckpt: Checkpoint, config_arg: str | None) -> LlamaConfig:
    cfg = hf_config(ckpt, config_arg, "a transformers LlamaConfig")
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{ckpt.path}: config model_type is {model_type!r}, expected 'llama'")
    return LlamaConfig.from_hf_config(cfg)


def rules(config: LlamaConfig) -> list:
    return [
        (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", Skip("RoPE inv_freq buffers (recomputed)")),
        (r"lm_head\.weight", Skip("lm_head tied to embed_tokens") if config.tie_word_embeddings else r"\g<0>"),
        (r"model\..+", r"\g<0>"),
    ]


def plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    config = llama_config(ckpt, config_arg)
    tensors, unexpected, skipped = apply_rules(ckpt.keys(), rules(config))
    return Plan("llama", config, tensors, unexpected, skipped)


def hf_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Our (LoRA-free) params -> HF ``LlamaForCausalLM`` state dict (numpy, torch layout)."""
    import jax
    out = {}
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(p.key for p in path)
        value = np.asarray(value, np.float32)
        out[canonical_name(keys)] = np.ascontiguousarray(value.T if keys[-1] == "kernel" else value)
    return out


def torch_llama(config: LlamaConfig, state_dict: dict[str, np.ndarray]):
    """The HF reference module (eager attention, fp32) loaded with ``state_dict``."""
    import torch
    import transformers
    hf = transformers.LlamaConfig(**config.hf_dict())
    hf._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf).eval().float()
    result = model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()},
                                   strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - allowed:
        raise CheckpointError(f"torch reference: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def random_batch(config: LlamaConfig, batch: int = 2, length: int = 12, seed: int = 0):
    """Random ids with the second row left-padded by 3 (padding id = pad_token_id)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if batch > 1:
        mask[1, :3] = 0
        ids[1, :3] = config.pad_token_id
    return ids, mask


def compare_logits(module, params, model, ids: np.ndarray, mask: np.ndarray, name: str = "") -> list[Comparison]:
    """Logits and final-norm hidden states at the attended positions, JAX vs torch."""
    import jax.numpy as jnp
    import torch
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos), output_hidden_states=True)
    out = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    keep = mask.astype(bool)
    return [compare(f"{name}logits", np.asarray(out.logits)[keep], ref.logits.numpy()[keep]),
            compare(f"{name}hidden_states", np.asarray(out.hidden_states)[keep], ref.hidden_states[-1].numpy()[keep])]


def compare_greedy(module, params, model, ids: np.ndarray, mask: np.ndarray, n: int = GREEDY_TOKENS):
    """Greedy tokens vs ``transformers.generate(do_sample=False)`` (no EOS stop on either side)."""
    import torch

    model.generation_config.eos_token_id = None
    ref = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, pad_token_id=module.config.pad_token_id)
    ref = ref[:, ids.shape[1]:].numpy()
    ours = np.asarray(generate(module, params, ids, mask, max_new_tokens=n, stop_token_ids=()).tokens)
    # First position where any row differs counts as the end of the matching prefix.
    same = (ours == ref).all(0) if ours.shape == ref.shape else np.zeros(n, bool)
    k = int(np.argmin(same)) if not same.all() else n
    print(f"verify: greedy_match={k}/{n}")
    bad = n - k
    return Comparison("greedy_tokens", float(bad), 0.0 if bad == 0 else float("inf"), ours.shape)


def verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list[Comparison]:
    module = plan.module()
    state = {canonical: tensor.load(ckpt) for canonical, tensor in plan.tensors.items()}
    model = torch_llama(plan.config, state)
    ids, mask = random_batch(plan.config)
    return compare_logits(module, params, model, ids, mask) + [compare_greedy(module, params, model, ids, mask)]


HF_LLAMA = Family("hf-llama", plan, verify)
