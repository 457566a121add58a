"""``python -m convert calico`` on the first author's layout: .bin shards with mixed bf16/fp32, PEFT-wrapped
LLaMA names and one q (no CAM copy), a merged-LoRA checkpoint, and module-shape mismatches reported together."""
from __future__ import annotations

import json

import flax.linen
import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import calico_jax  # noqa: E402
from calico_jax.checkpoints import converted as pretrained  # noqa: E402
from calico_jax.checkpoints import torch_export  # noqa: E402
from calico_jax.models.calico import Calico, CalicoConfig  # noqa: E402
from calico_jax.models.cam import CamConfig  # noqa: E402
from calico_jax.models.cem import CemConfig  # noqa: E402
from tests.helpers import nothing_at, run_convert  # noqa: E402


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}/").items()}
    return {prefix[:-1]: np.asarray(tree)}


@pytest.fixture(scope="module")
def model():
    cfg = CalicoConfig.tiny(cem=CemConfig(num_heads=4), cam=CamConfig(layers=(1, 3)))
    shapes = flax.linen.unbox(pretrained.abstract_params(Calico(cfg)))
    g = np.random.default_rng(4)
    params = jax.tree.map(lambda v: g.normal(0, 0.2, v.shape).astype(np.float32), shapes)
    return cfg, params


def _settings(tmp_path, cfg) -> str:
    (tmp_path / "settings.json").write_text(json.dumps({"config": cfg.to_dict()}))
    return str(tmp_path / "settings.json")


def test_bin_shards_mixed_dtypes_peft_names(model, tmp_path):
    """Two pytorch_model-*.bin shards + index; the LLaMA in PEFT's in-memory names (base_layer, lora_*.default);
    the LLM and SAM stored bf16, the rest fp32: converted values equal the stored ones."""
    cfg, params = model
    state = torch_export.author_state(cfg, params, full=True)
    del state["model.cam_query_tokens"]   # the author layout has one q: the CAMs' copy starts from query_tokens
    state.update(torch_export.adapter_state(params))
    bf16 = lambda k: k.startswith(("model.layers", "model.grounding_encoder", "base_model"))  # noqa: E731
    tensors = {}
    for k, v in state.items():
        if k.startswith("base_model."):   # adapter_state's names -> PEFT in-memory names
            k = k.replace(".weight", ".default.weight")
        elif k.startswith("model.layers.") and (".q_proj." in k or ".v_proj." in k):
            k = "base_model.model." + k.replace(".weight", ".base_layer.weight")
        t = torch.from_numpy(np.ascontiguousarray(v))
        tensors[k] = t.to(torch.bfloat16) if bf16(k) else t
    src = tmp_path / "src"
    src.mkdir()
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, ks in shards.items():
        torch.save({k: tensors[k] for k in ks}, src / fname)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    rc, stdout, err = run_convert("calico", "--src", src, "--out", tmp_path / "out",
                                  "--config", _settings(tmp_path, cfg))
    assert rc == 0, err
    assert "cam_query_tokens: not in the checkpoint, copied from query_tokens" in stdout
    _, loaded, loaded_cfg = calico_jax.load(tmp_path / "out")
    assert loaded_cfg == cfg
    got = flat(loaded)
    np.testing.assert_array_equal(got["cam_query_tokens"], params["query_tokens"])
    assert np.any(params["cam_query_tokens"] != params["query_tokens"])
    for k, v in flat(params).items():
        if k == "cam_query_tokens":
            continue
        stored_bf16 = k.startswith(("sam/", "llm/model/layers_"))   # the keys bf16() selected above
        want = v.astype(ml_dtypes.bfloat16).astype(np.float32) if stored_bf16 else v
        np.testing.assert_array_equal(got[k], want, err_msg=k)


def test_merged_lora_and_shape_problems_together(model, tmp_path):
    cfg, params = model
    src = tmp_path / "pt"
    torch_export.save(src, cfg, params, full=True)
    meta = json.loads((src / "config.json").read_text())
    del meta["calico_jax"]
    (src / "config.json").write_text(json.dumps(meta))
    (src / "adapter" / "adapter_model.safetensors").unlink()   # merged LoRA: no factors anywhere
    (src / "adapter" / "adapter_config.json").unlink()
    (src / "adapter").rmdir()
    rc, stdout, err = run_convert("calico", "--src", src, "--out", tmp_path / "merged",
                                  "--config", _settings(tmp_path, cfg))
    assert rc == 0, err
    assert "llm.lora = none" in stdout
    _, loaded, loaded_cfg = calico_jax.load(tmp_path / "merged")
    assert loaded_cfg.llm.lora is None and loaded_cfg.replace(llm=cfg.llm) == cfg
    np.testing.assert_array_equal(np.asarray(loaded["llm"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]),
                                  params["llm"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    # Four author modules that do not fit the config: all four named in one message, nothing written.
    from safetensors.numpy import load_file, save_file
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (shard,) = set(index["weight_map"].values())
    state = load_file(src / shard)
    for leaf in ("weight", "bias"):   # a third CAM linear
        state[f"model.adaptive_layers.2.{leaf}"] = state[f"model.adaptive_layers.0.{leaf}"]
        index["weight_map"][f"model.adaptive_layers.2.{leaf}"] = shard
    state["model.mm_projector.weight"] = np.zeros((48, 32), np.float32)          # EVA width, not Q-Former's
    state["model.reintegration_layers.1.weight"] = np.zeros((48, 12), np.float32)
    state["model.dino_model.register_tokens"] = np.zeros((1, 4, 24), np.float32)
    save_file(state, src / shard)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, _, err = run_convert("calico", "--src", src, "--out", tmp_path / "bad", "--config", _settings(tmp_path, cfg))
    assert rc == 2 and nothing_at(tmp_path / "bad")
    assert "4 module(s) do not match the CALICO config" in err, err
    for what in ("adaptive_layers: 3 module(s) (indices [0, 1, 2]), the config has 2 CAM layer(s) [1, 3]",
                 "mm_projector.weight (48, 32)", "reintegration_layers.1: nn.Linear weight (48, 12)",
                 "dino_model: 4 register tokens, the config has dinov2.num_register_tokens=1"):
        assert what in err, (what, err)


def test_extraction_layer_not_mha(model, tmp_path):
    cfg, params = model
    state = torch_export.author_state(cfg, params, full=True)
    state["model.extraction_layer.norm.weight"] = np.ones(32, np.float32)   # e.g. a block with a LayerNorm
    from safetensors.numpy import save_file
    save_file(state, tmp_path / "calico.safetensors")
    rc, _, err = run_convert("calico", "--src", tmp_path / "calico.safetensors", "--out", tmp_path / "out",
                             "--config", _settings(tmp_path, cfg))
    assert rc == 2 and "extraction_layer: keys ['norm.weight'] are not nn.MultiheadAttention's" in err, err



def test_dinov2_preset_from_shapes(tmp_path):
    """model.dino_model width, depth and registers name the torch-hub preset (headers only)."""
    from safetensors.numpy import save_file

    from calico_jax.checkpoints.torch_files import open_checkpoint
    from convert.families.calico_checks import dinov2_preset
    state = {"model.dino_model.cls_token": np.zeros((1, 1, 768), np.float32),
             "model.dino_model.register_tokens": np.zeros((1, 4, 768), np.float32),
             **{f"model.dino_model.blocks.{i}.norm1.weight": np.zeros(768, np.float32) for i in range(12)}}
    save_file(state, tmp_path / "x.safetensors")
    ckpt = open_checkpoint(tmp_path / "x.safetensors")
    name, cfg = dinov2_preset(ckpt, {k: k for k in ckpt.keys()})
    assert name == "dinov2_vitb14_reg" and cfg == CalicoConfig().dinov2.to_dict()   # the 7B default
    del state["model.dino_model.register_tokens"]
    save_file(state, tmp_path / "y.safetensors")
    ckpt = open_checkpoint(tmp_path / "y.safetensors")
    assert dinov2_preset(ckpt, {k: k for k in ckpt.keys()})[0] == "dinov2_vitb14"
