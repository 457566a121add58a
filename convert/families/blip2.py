"""``hf-blip2``: an HF ``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration``
``save_pretrained`` directory -> ``blip2_vision`` (vision model, Q-Former, query tokens, projection).

Which of the two is read from config.json ``model_type`` (``blip-2`` / ``instructblip``). Canonical
names are HF's own, so the rename table is the identity, except:

* ``vision_model.encoder.layers.N.self_attn.qkv.bias`` (``cat(q_bias, k_bias, v_bias)``) becomes
  ``self_attn.q_bias`` and ``self_attn.v_bias``: our K bias is a constant zero. HF converts it from
  LAVIS as zeros; a non-zero K third (HF keeps it trainable) is dropped with a note -- it cannot
  change the output, since ``q·b_k`` is the same for every key of a query row and softmax cancels it;
* ``language_model.*`` is skipped: the LLM is converted by the ``hf-llama`` family (issue 7).

``--verify`` loads the transformers model with ``from_pretrained(SRC)`` (language model included,
fp32: budget its memory) and compares, on random images at the native resolution (and, for
InstructBLIP, random instruction ids with one padded row), the vision ``last_hidden_state``, the
Q-Former query outputs and the ``language_projection`` output of ``get_image_features``.

The helpers here (:func:`hf_rules`, :func:`split_qkv_bias`, :func:`component_plan`,
:func:`compare_image_features`) are shared with ``lavis-blip2`` and the tests.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError
from calico_jax.core.config import ConfigError
from calico_jax.data.qformer_text import QFORMER_TOKENIZER_DIR
from calico_jax.models.blip2 import Blip2Vision, Blip2VisionConfig
from convert.families import Family
from convert.mapping import Plan, Skip, Tensor, apply_rules
from convert.verify import compare

LLM_REASON = ("language model ({kind}): not part of the vision front end; LLaMA/Vicuna language models "
              "are converted by the hf-llama family (issue 7)")
QKV_BIAS = r"(.*self_attn)\.qkv\.bias"


def hf_rules(llm_kind: str = "language_model") -> list:
    """Source key -> canonical key for an HF BLIP-2 / InstructBLIP full model."""
    return [
        (QKV_BIAS, r"\1.qkv.bias"),                    # split below
        (r"qformer\.embeddings\.position_ids", Skip("non-persistent position_ids buffer")),
        (r"(vision_model|qformer)\..+", r"\g<0>"),
        (r"query_tokens|language_projection\.(weight|bias)", r"\g<0>"),
        (r"language_model\..+", Skip(LLM_REASON.format(kind=llm_kind))),
    ]


def split_qkv_bias(tensors: dict[str, Tensor], ckpt: Checkpoint) -> list[str]:
    """Replaces each fused ``...self_attn.qkv.bias`` by ``q_bias`` / ``v_bias`` tensors (in place);
    returns notes for any checkpoint whose K third is not zero."""
    nonzero = []
    for key in [k for k in tensors if k.endswith("self_attn.qkv.bias")]:
        (source,) = tensors.pop(key).sources
        shape = tuple(ckpt.shape(source))
        if len(shape) != 1 or shape[0] % 3:
            raise CheckpointError(f"{ckpt.path}: {source} has shape {shape}; a fused q|k|v bias "
                                  "needs a length divisible by 3")
        d = shape[0] // 3
        prefix = key[:-len("qkv.bias")]
        tensors[prefix + "q_bias"] = Tensor((source,), lambda b, d=d: b[:d])
        tensors[prefix + "v_bias"] = Tensor((source,), lambda b, d=d: b[2 * d:])
        if np.any(np.asarray(ckpt.get(source)[d:2 * d], np.float32) != 0):
            nonzero.append(source)
    if nonzero:
        return [f"{len(nonzero)} qkv bias(es) have a non-zero K third (e.g. {nonzero[0]}); dropped: a K bias "
                "adds the same q·b_k to every logit of a query row, which softmax cancels"]
    return []


def component_plan(ckpt: Checkpoint, model: str, config: Any) -> Plan:
    """Plan for a bare HF component state dict (``Blip2VisionModel`` -> ``eva_vit``,
    ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` -> ``qformer``): identity names + qkv split."""
    rules = [(QKV_BIAS, r"\1.qkv.bias"), (r"(.*\.)?position_ids", Skip("position_ids buffer")), (r".+", r"\g<0>")]
    tensors, unexpected, skipped = apply_rules(ckpt.keys(), rules)
    notes = split_qkv_bias(tensors, ckpt)
    return Plan(model, config, tensors, unexpected, skipped, notes)


def _plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    cfg_path = ckpt.path / "config.json"
    if ckpt.config is None:
        raise CheckpointError(f"{ckpt.path}: hf-blip2 needs a save_pretrained directory with config.json "
                              "(for a LAVIS checkpoint use the lavis-blip2 family)")
    if config_arg is not None:
        raise CheckpointError("hf-blip2 reads the architecture from config.json; --config is not used")
    try:
        config = Blip2VisionConfig.from_hf_config(ckpt.config)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    text_type = (ckpt.config.get("text_config") or {}).get("model_type", "unknown")
    tensors, unexpected, skipped = apply_rules(ckpt.keys(), hf_rules(text_type))
    notes = split_qkv_bias(tensors, ckpt)
    kind = "InstructBLIP (Q-Former with instruction input)" if config.qformer.text_embeddings else "BLIP-2"
    notes.append(f"{ckpt.config['model_type']}: {kind}; {config.num_query_tokens} query tokens -> "
                 f"{config.text_hidden_size}-wide LLM tokens")
    notes.append("language_model.* is not converted here: run `python -m convert hf-llama` (issue 7) on the "
                 "language model")
    # InstructBlipProcessor.save_pretrained keeps the Q-Former's tokenizer in qformer_tokenizer/: it becomes
    # OUT/tokenizer/ (calico-assemble moves it to OUT/tokenizer/qformer_tokenizer/, for qformer_text_input).
    qtok = ckpt.path / QFORMER_TOKENIZER_DIR
    files = sorted(p for p in qtok.iterdir() if p.is_file()) if qtok.is_dir() else []
    if files:
        notes.append(f"Q-Former tokenizer: {len(files)} file(s) from {qtok} copied to tokenizer/")
    return Plan("blip2_vision", config, tensors, unexpected, skipped, notes, files=files)


# ---- --verify -------------------------------------------------------------------------------------

def random_inputs(config: Blip2VisionConfig, batch: int = 2, size: int | None = None, seed: int = 0) -> dict:
    """fp32 NCHW pixels and, for an instruction Q-Former, ids with the last row padded at the end."""
    r = np.random.default_rng(seed)
    size = size or config.vision.image_size
    out = {"pixel_values": r.standard_normal((batch, config.vision.num_channels, size, size)).astype(np.float32)}
    q = config.qformer
    if q.text_embeddings:
        t = min(7, q.max_position_embeddings)
        out["input_ids"] = r.integers(1, q.vocab_size, (batch, t)).astype(np.int64)
        mask = np.ones((batch, t), np.int64)
        mask[-1, max(1, t - 3):] = 0
        out["attention_mask"] = mask
    return out


def jax_image_features(config: Blip2VisionConfig, params: Any, inputs: dict) -> dict:
    import jax
    import jax.numpy as jnp

    kwargs = {k: jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask") if k in inputs}
    pixels = jnp.asarray(inputs["pixel_values"]).transpose(0, 2, 3, 1)
    # one jit: op-by-op dispatch would compile every primitive separately (slow on CPU)
    return jax.jit(Blip2Vision(config).apply)({"params": params}, pixels, **kwargs)


def torch_image_features(model: Any, config: Blip2VisionConfig, inputs: dict) -> dict:
    """HF ``get_image_features`` of a full BLIP-2 / InstructBLIP model on ``inputs``."""
    import torch

    pixels = torch.from_numpy(inputs["pixel_values"])
    if config.qformer.text_embeddings:
        out = model.get_image_features(pixel_values=pixels, qformer_input_ids=torch.from_numpy(inputs["input_ids"]),
                                       qformer_attention_mask=torch.from_numpy(inputs["attention_mask"]),
                                       interpolate_pos_encoding=True)
    else:
        out = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
    q = config.num_query_tokens
    return {"vision": out.last_hidden_state, "query_output": out.qformer_outputs.last_hidden_state[:, :q],
            "image_tokens": out.pooler_output}


def compare_image_features(model: Any, config: Blip2VisionConfig, params: Any, inputs: dict) -> list:
    ours = jax_image_features(config, params, inputs)
    ref = torch_image_features(model, config, inputs)
    names = {"vision": "vision_model.last_hidden_state", "query_output": "qformer.query_output",
             "image_tokens": "language_projection"}
    return [compare(label, ours[k], ref[k]) for k, label in names.items()]


def _verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list:
    import torch
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    cls = {"blip-2": Blip2ForConditionalGeneration,
           "instructblip": InstructBlipForConditionalGeneration}[ckpt.config["model_type"]]
    model = cls.from_pretrained(ckpt.path, dtype=torch.float32, attn_implementation="eager").eval()
    return compare_image_features(model, plan.config, params, random_inputs(plan.config))


HF_BLIP2 = Family("hf-blip2", _plan, _verify)

