"""DINOv2 converters: ``hf-dinov2`` (HF save_pretrained directories) and ``dinov2`` (facebookresearch).

Canonical keys are HF's on-disk (legacy) ``Dinov2Model`` names (what ``save_pretrained`` writes); the module
tree of :mod:`calico_jax.models.dinov2` mirrors them.

* ``hf-dinov2``: the legacy names pass through unchanged; transformers 5.x *in-memory* names, if a
  file has them, are mapped back (``attention.{q,k,v,o}_proj``, SwiGLU ``gate_proj`` + ``up_proj``
  concatenated into ``weights_in``, ``down_proj`` -> ``weights_out``). A ``dinov2.`` prefix
  (``Dinov2ForImageClassification``) is stripped and its ``classifier`` skipped. The config comes
  from config.json (or ``--config`` = an HF config.json), with HF's interpolation semantics.
* ``dinov2``: original state dicts (``blocks.N.attn.qkv`` split in row thirds q|k|v,
  ``ls{1,2}.gamma``, ``mlp.w12/w3``; ``block_chunks > 0`` naming ``blocks.C.N.`` too) with
  ``--config`` = a JSON of ``DinoVisionTransformer`` constructor arguments or a torch-hub preset
  name; the original interpolation semantics (offset, antialias).

``--verify`` runs ``transformers`` on both resolutions: the native one and a non-native, non-square
one (one side down, one side up). ``hf-dinov2``: ``from_pretrained(SRC)``. ``dinov2``: the HF model
built from an HF config derived from the constructor arguments, loaded (``from_pretrained`` of a
temporary directory) with the state dict after the public original -> HF renaming of
``convert_dinov2_to_hf.py``; since HF's ``Dinov2Model`` interpolates the position table differently
from the original (``size=(h, w)`` vs the original's ``scale_factor`` with a 0.1 offset, no
antialias: up to 1.9e-2 apart at 224 px for a 518-trained table; the ``*_reg`` models agree), its
``embeddings.interpolate_pos_encoding`` is replaced by a few lines of torch that call
``F.interpolate`` exactly as ``DinoVisionTransformer.interpolate_pos_encoding`` does.
"""
from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError, hf_config, load_json_arg
from calico_jax.models.dinov2 import PRESETS, Dinov2Config
from convert.families import Family
from convert.mapping import Plan, Skip, Tensor, apply_rules
from convert.verify import compare, rng

MODEL = "dinov2"

_LAYER = r"encoder\.layer\.(\d+)\."
HF_RULES = [
    (r"embeddings\.(cls_token|mask_token|position_embeddings|register_tokens)", r"embeddings.\1"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (_LAYER + r"(norm1|norm2)\.(weight|bias)", r"encoder.layer.\1.\2.\3"),
    (_LAYER + r"attention\.attention\.(query|key|value)\.(weight|bias)", r"encoder.layer.\1.attention.attention.\2.\3"),
    (_LAYER + r"attention\.output\.dense\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (_LAYER + r"layer_scale([12])\.lambda1", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (_LAYER + r"mlp\.(fc1|fc2|weights_in|weights_out)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    # transformers 5.x in-memory names
    (_LAYER + r"attention\.q_proj\.(weight|bias)", r"encoder.layer.\1.attention.attention.query.\2"),
    (_LAYER + r"attention\.k_proj\.(weight|bias)", r"encoder.layer.\1.attention.attention.key.\2"),
    (_LAYER + r"attention\.v_proj\.(weight|bias)", r"encoder.layer.\1.attention.attention.value.\2"),
    (_LAYER + r"attention\.o_proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (_LAYER + r"mlp\.down_proj\.(weight|bias)", r"encoder.layer.\1.mlp.weights_out.\2"),
    (r"layernorm\.(weight|bias)", r"layernorm.\1"),
    (r"classifier\..*", Skip("Dinov2ForImageClassification head (not part of the backbone)")),
]
SWIGLU_SPLIT = re.compile(_LAYER + r"mlp\.(gate_proj|up_proj)\.(weight|bias)")

_BLOCK = r"blocks\.(?:\d+\.)?(\d+)\."  # blocks.N. or, with block_chunks > 0, blocks.C.N.
ORIGINAL_RULES = [
    (r"(cls_token|mask_token|register_tokens)", r"embeddings.\1"),
    (r"pos_embed", r"embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (_BLOCK + r"(norm1|norm2)\.(weight|bias)", r"encoder.layer.\1.\2.\3"),
    (_BLOCK + r"attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (_BLOCK + r"ls([12])\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (_BLOCK + r"mlp\.w12\.(weight|bias)", r"encoder.layer.\1.mlp.weights_in.\2"),
    (_BLOCK + r"mlp\.w3\.(weight|bias)", r"encoder.layer.\1.mlp.weights_out.\2"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
]
QKV = re.compile(_BLOCK + r"attn\.qkv\.(weight|bias)")


# ---------------------------------------------------------------------------------------------- plan

def _third(i: int):
    def take(qkv: np.ndarray) -> np.ndarray:
        n = qkv.shape[0] // 3
        return qkv[i * n:(i + 1) * n]
    return take


def _concat0(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=0)


def _hf_plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    hf_cfg = hf_config(ckpt, config_arg, "the HF Dinov2Config / Dinov2WithRegistersConfig")
    config = Dinov2Config.from_hf_config(hf_cfg)
    keys = [k.removeprefix("dinov2.") for k in ckpt.keys()]
    src = dict(zip(keys, ckpt.keys(), strict=True))
    plain = [k for k in keys if not SWIGLU_SPLIT.fullmatch(k)]
    tensors, unexpected, skipped = apply_rules(plain, HF_RULES)
    tensors = {c: Tensor(tuple(src[s] for s in t.sources)) for c, t in tensors.items()}
    unexpected = [src[k] for k in unexpected]
    # 5.x SwiGLU gate_proj (first half, silu'd) + up_proj -> fused weights_in.
    halves: dict[tuple[str, str], dict[str, str]] = {}
    for k in keys:
        m = SWIGLU_SPLIT.fullmatch(k)
        if m:
            halves.setdefault((m[1], m[3]), {})[m[2]] = src[k]
    for (layer, leaf), parts in halves.items():
        if set(parts) != {"gate_proj", "up_proj"}:
            unexpected.extend(f"{p} (its {'up_proj' if 'gate_proj' in parts else 'gate_proj'} half is missing)"
                              for p in parts.values())
            continue
        tensors[f"encoder.layer.{layer}.mlp.weights_in.{leaf}"] = Tensor(
            (parts["gate_proj"], parts["up_proj"]), _concat0)
    notes = [f"{'Dinov2WithRegistersModel' if config.num_register_tokens else 'Dinov2Model'}: "
             f"{config.num_hidden_layers} layers, width {config.hidden_size}, "
             f"{'SwiGLU' if config.use_swiglu_ffn else 'MLP'} FFN, {config.num_register_tokens} registers; "
             f"interpolation='hf' (antialias={config.interpolate_antialias})"]
    return Plan(MODEL, config, tensors, unexpected, skipped, notes)


def _original_config(ckpt: Checkpoint, config_arg: str | None) -> tuple[Dinov2Config, dict[str, Any]]:
    if config_arg is None:
        raise CheckpointError(
            f"{ckpt.path}: the dinov2 family needs --config: a JSON file of DinoVisionTransformer constructor "
            f"arguments (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, init_values, ffn_layer, "
            f"num_register_tokens, interpolate_antialias, interpolate_offset, ...) or a preset "
            f"({', '.join(sorted(PRESETS))})")
    args = load_json_arg(config_arg, PRESETS, "DinoVisionTransformer constructor arguments")
    return Dinov2Config.from_original(**args), args


def _check_shapes(ckpt: Checkpoint, config: Dinov2Config) -> None:
    """Architecture inferred from the tensor shapes must agree with --config (one message for all)."""
    inferred: dict[str, Any] = {}
    if "cls_token" in ckpt:
        inferred["embed_dim"] = ckpt.shape("cls_token")[-1]
    depth = {int(m[1]) for k in ckpt.keys() if (m := re.match(_BLOCK, k))}
    if depth:
        inferred["depth"] = max(depth) + 1
    if "patch_embed.proj.weight" in ckpt and len(ckpt.shape("patch_embed.proj.weight")) == 4:
        inferred["patch_size"] = ckpt.shape("patch_embed.proj.weight")[-1]
    if "pos_embed" in ckpt:
        n = ckpt.shape("pos_embed")[1] - 1
        if math.isqrt(n) ** 2 == n and "patch_size" in inferred:
            inferred["img_size // patch_size"] = math.isqrt(n)
    inferred["num_register_tokens"] = ckpt.shape("register_tokens")[1] if "register_tokens" in ckpt else 0
    keys = ckpt.keys()
    inferred["ffn_layer"] = "swiglu" if any(".mlp.w12." in k for k in keys) else "mlp"
    inferred["init_values (layer-scale)"] = any(re.search(r"\.ls[12]\.gamma$", k) for k in keys)
    want = {"embed_dim": config.hidden_size, "depth": config.num_hidden_layers, "patch_size": config.patch_size,
            "img_size // patch_size": config.grid, "num_register_tokens": config.num_register_tokens,
            "ffn_layer": "swiglu" if config.use_swiglu_ffn else "mlp",
            "init_values (layer-scale)": config.use_layer_scale}
    bad = [f"{name}: checkpoint has {inferred[name]!r}, --config gives {want[name]!r}"
           for name in want if name in inferred and inferred[name] != want[name]]
    if bad:
        raise CheckpointError(f"{ckpt.path}: checkpoint does not match --config:\n    " + "\n    ".join(bad))


def _original_plan(ckpt: Checkpoint, config_arg: str | None) -> Plan:
    config, _ = _original_config(ckpt, config_arg)
    _check_shapes(ckpt, config)
    keys = ckpt.keys()
    tensors, unexpected, skipped = apply_rules([k for k in keys if not QKV.fullmatch(k)], ORIGINAL_RULES)
    for k in keys:
        m = QKV.fullmatch(k)
        if m:  # rows are q | k | v (reshape(B, N, 3, heads, head_dim) in Attention.forward)
            for i, name in enumerate(("query", "key", "value")):
                tensors[f"encoder.layer.{m[1]}.attention.attention.{name}.{m[2]}"] = Tensor((k,), _third(i))
    notes = [f"DinoVisionTransformer: {config.num_hidden_layers} blocks, width {config.hidden_size}, "
             f"{'SwiGLU' if config.use_swiglu_ffn else 'MLP'} FFN, {config.num_register_tokens} registers; "
             f"interpolation='original' (offset={config.interpolate_offset}, "
             f"antialias={config.interpolate_antialias})"]
    return Plan(MODEL, config, tensors, unexpected, skipped, notes)


# -------------------------------------------------------------------------------------------- verify

def _resolutions(config: Dinov2Config) -> list[tuple[str, int, int]]:
    """Native, and a non-square grid one side smaller (antialias matters) and one side larger."""
    g, p = config.grid, config.patch_size
    return [("native", g * p, g * p), ("non-native", (max(1, g // 2) + 1) * p, (g + 1) * p)]


def _run_both(plan: Plan, params: Any, model: Any) -> list:
    import jax.numpy as jnp
    import torch

    module = plan.module()
    results = []
    for label, h, w in _resolutions(plan.config):
        x = rng(h * 1000 + w).standard_normal((2, plan.config.num_channels, h, w)).astype(np.float32)
        ref = model(pixel_values=torch.from_numpy(x))
        ours = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
        size = f"{h}x{w}"
        results.append(compare(f"last_hidden_state@{size} ({label})", ours["last_hidden_state"],
                               ref.last_hidden_state))
        results.append(compare(f"pooler_output@{size} ({label})", ours["pooler_output"], ref.pooler_output))
    return results


def _hf_verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list:
    import torch
    import transformers

    cls = transformers.Dinov2WithRegistersModel if plan.config.num_register_tokens else transformers.Dinov2Model
    if ckpt.path.is_dir():
        model = cls.from_pretrained(ckpt.path, attn_implementation="eager", dtype=torch.float32)
    else:  # a lone weights file: build from the config and load through transformers' own renaming
        with tempfile.TemporaryDirectory() as tmp:
            hf_config = _hf_config_of(plan.config)
            hf_config.save_pretrained(tmp)
            _save_state_dict({k: torch.from_numpy(np.array(ckpt.get(k), np.float32)) for k in ckpt.keys()}, tmp)
            model = cls.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32)
    return _run_both(plan, params, model.eval().float())


def _hf_config_of(config: Dinov2Config):
    import transformers

    if not float(config.mlp_ratio).is_integer():  # HF's config field is an int
        raise CheckpointError(f"--verify: transformers' Dinov2Config cannot express mlp_ratio={config.mlp_ratio}")
    kw = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
              num_attention_heads=config.num_attention_heads, mlp_ratio=int(config.mlp_ratio),
              hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps, image_size=config.image_size,
              patch_size=config.patch_size, num_channels=config.num_channels, qkv_bias=config.qkv_bias,
              layerscale_value=config.layerscale_value, use_swiglu_ffn=config.use_swiglu_ffn)
    if config.num_register_tokens:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=config.num_register_tokens, **kw)
    return transformers.Dinov2Config(**kw)


def _save_state_dict(state: dict, directory: str) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(directory) / "model.safetensors"))


def original_to_hf(state: dict, config: Dinov2Config) -> dict:
    """The public renaming (transformers ``convert_dinov2_to_hf.py``): original -> HF on-disk names.

    HF blocks always have layer-scale and proj/FFN biases: absent ones (``init_values=None``,
    ``proj_bias``/``ffn_bias=False``) become their identity values (ones / zeros).
    """
    import torch

    d, out = config.hidden_size, {}
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(?:\d+\.)?(\d+)\.(.*)", key)
        if m is None:
            top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
                   "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
                   "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                   "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                   "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
            out[top[key]] = value
            continue
        prefix, rest = f"encoder.layer.{m[1]}.", m[2]
        if rest.startswith("attn.qkv."):
            leaf = rest.rsplit(".", 1)[1]
            for i, name in enumerate(("query", "key", "value")):
                out[f"{prefix}attention.attention.{name}.{leaf}"] = value[i * d:(i + 1) * d]
            continue
        for a, b in (("attn.proj", "attention.output.dense"), ("ls1.gamma", "layer_scale1.lambda1"),
                     ("ls2.gamma", "layer_scale2.lambda1"), ("mlp.w12", "mlp.weights_in"),
                     ("mlp.w3", "mlp.weights_out")):
            rest = rest.replace(a, b)
        out[prefix + rest] = value
    h = config.ffn_hidden_size
    ffn = ("weights_in", "weights_out", 2 * h) if config.use_swiglu_ffn else ("fc1", "fc2", h)
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for j in (1, 2):
            out.setdefault(f"{p}layer_scale{j}.lambda1", torch.ones(d))
        out.setdefault(f"{p}attention.output.dense.bias", torch.zeros(d))
        out.setdefault(f"{p}mlp.{ffn[0]}.bias", torch.zeros(ffn[2]))
        out.setdefault(f"{p}mlp.{ffn[1]}.bias", torch.zeros(d))
    return out


def patch_original_interpolation(model: Any, config: Dinov2Config) -> None:
    """Gives ``model.embeddings`` DinoVisionTransformer.interpolate_pos_encoding's semantics."""
    import torch
    import torch.nn.functional as F

    emb = model.embeddings

    def interpolate_pos_encoding(x, h, w):  # (embeddings incl. CLS, pixel height, pixel width)
        pos = emb.position_embeddings
        npatch, n = x.shape[1] - 1, pos.shape[1] - 1
        if npatch == n and h == w:
            return pos
        pos = pos.float()
        h0, w0, m = h // config.patch_size, w // config.patch_size, int(math.sqrt(n))
        kwargs: dict[str, Any] = {"size": (h0, w0)}
        if config.interpolate_offset:
            kwargs = {"scale_factor": (float(h0 + config.interpolate_offset) / m,
                                       float(w0 + config.interpolate_offset) / m)}
        patch = F.interpolate(pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=config.interpolate_antialias, **kwargs)
        assert patch.shape[-2:] == (h0, w0)
        patch = patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
        return torch.cat((pos[:, :1], patch), dim=1)

    emb.interpolate_pos_encoding = interpolate_pos_encoding


def original_reference(state: dict, config: Dinov2Config):
    """The HF model after the public renaming, with the original interpolation (see module doc)."""
    import torch
    import transformers

    cls = transformers.Dinov2WithRegistersModel if config.num_register_tokens else transformers.Dinov2Model
    with tempfile.TemporaryDirectory() as tmp:
        _hf_config_of(config).save_pretrained(tmp)
        _save_state_dict(original_to_hf(state, config), tmp)
        model = cls.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32).eval()
    patch_original_interpolation(model, config)
    return model


def _original_verify(ckpt: Checkpoint, plan: Plan, params: Any) -> list:
    import torch

    state = {k: torch.from_numpy(np.array(ckpt.get(k), np.float32)) for k in ckpt.keys()}
    return _run_both(plan, params, original_reference(state, plan.config))


HF_DINOV2 = Family("hf-dinov2", _hf_plan, _hf_verify)
DINOV2 = Family("dinov2", _original_plan, _original_verify)
