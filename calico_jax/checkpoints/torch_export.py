"""CALICO params -> PyTorch files in the first author's naming (``python -m calico_jax.export --format torch``).

``DIR`` gets:

* ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` (the HF sharded layout): the trainable
  modules in the author's names (:mod:`calico_jax.checkpoints.author_layout`): CEM ``model.extraction_layer.*``
  (``nn.MultiheadAttention``), CAMs ``model.adaptive_layers.{i}`` / ``model.reintegration_layers.{i}``, query
  tokens (``model.query_tokens``; ``model.cam_query_tokens`` with ``cam.queries="shared"``), the SAM mask decoder
  ``model.grounding_encoder.mask_decoder.*`` and ``model.text_hidden_fcs.*``. ``full=True`` adds the frozen
  towers (EVA + ``ln_vision``, Q-Former, ``mm_projector``, DINOv2, SAM encoders, the LLaMA base weights);
* ``adapter/``: a PEFT LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``) with the LoRA
  factors, for ``PeftModel.from_pretrained(LlamaForCausalLM, DIR/adapter)``;
* ``config.json``: the LLaMA fields (``model_type`` llama) plus ``calico_jax`` (our model config), which
  ``python -m convert calico --src DIR`` reads back; ``tokenizer/`` when one is given.

Tensors keep their dtype (bf16 stays bf16). Written atomically (nothing is left on error).
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from calico_jax.checkpoints import author_layout
from calico_jax.core import fs
from calico_jax.models import scan
from calico_jax.models.lora import lora_state_dict, peft_adapter_config

TRAINABLE_TOPS = r"cem|cam_\d+|query_tokens|cam_query_tokens(_\d+)?|text_hidden_fcs_\d+_\d+"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
           np.dtype(np.float64): "F64", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
SHARD_BYTES = 5 * 2**30


def _exported(path: tuple[str, ...], full: bool) -> bool:
    if path[-1] in ("lora_a", "lora_b"):
        return False                                   # the adapter directory holds them
    return full or re.fullmatch(TRAINABLE_TOPS, path[0]) is not None or path[:2] == ("sam", "mask_decoder")


def author_state(config: Any, params: Any, full: bool = False) -> dict[str, np.ndarray]:
    """The author-named tensors (torch layout) of ``params`` (per-layer or, for a scanned ``config``, stacked);
    ValueError naming any leaf without an author name."""
    params = scan.unstack_layers(params, config)   # the author names one tensor per layer
    canonical = {}
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(p.key for p in path)
        if _exported(keys, full):
            canonical[author_layout.canonical_from_flax(keys)] = author_layout.to_torch_layout(keys[-1],
                                                                                                np.asarray(value))
    out, unnamed = author_layout.to_author(canonical, config.cam.layers)
    if unnamed:
        raise ValueError(f"{len(unnamed)} parameter(s) have no name in the author layout (e.g. cam.queries="
                         f"'per_cam', cem.layer_norm): {unnamed[:8]}")
    return out


def adapter_state(params: Any) -> dict[str, np.ndarray]:
    """PEFT adapter tensors of the LLM's LoRA factors (``base_model.model.model.layers.N...lora_A.weight``)."""
    return lora_state_dict(params["llm"], prefix=author_layout.PEFT_PREFIX)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file (any of :data:`_DTYPES`, incl. bf16 via ml_dtypes), header padded to 8 bytes."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be written to safetensors")
        data = a.tobytes()
        header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def write_sharded(directory: Path, tensors: dict[str, np.ndarray], shard_bytes: int = SHARD_BYTES) -> list[str]:
    """``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``; returns the shard names."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        write_safetensors(directory / fname, shard)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def config_json(config: Any) -> dict[str, Any]:
    """config.json: the LLaMA fields a GLaMM/LLaVA-style loader reads, plus our model config."""
    c = config.llm
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings, "out_dim": config.sam.prompt_encoder.embed_dim,
            "calico_jax": config.to_dict()}


def save(out: str | Path, config: Any, params: Any, *, full: bool = False, tokenizer_dir: Path | None = None,
         overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Writes ``out`` (see the module docstring) atomically. Scanned layer stacks are written per layer."""
    params = scan.unstack_layers(params, config)
    state = author_state(config, params, full)
    with fs.atomic_directory(out, overwrite=overwrite) as tmp:
        write_sharded(tmp, state, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config_json(config), indent=2))
        if config.llm.lora is not None:
            (tmp / author_layout.ADAPTER_DIR).mkdir()
            write_safetensors(tmp / author_layout.ADAPTER_DIR / "adapter_model.safetensors", adapter_state(params))
            (tmp / author_layout.ADAPTER_DIR / "adapter_config.json").write_text(
                json.dumps(peft_adapter_config(config.llm.lora), indent=2))
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    return Path(out)
