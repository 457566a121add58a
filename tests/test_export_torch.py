"""``python -m calico_jax.export --format torch``: tiny CALICO params -> the first author's PyTorch naming
(safetensors shards + index) and a PEFT adapter; ``python -m convert calico`` reads them back bit for bit, and
the adapter loads with ``peft`` onto a ``LlamaForCausalLM`` whose logits equal our LoRA forward."""
from __future__ import annotations

import json

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import calico_jax  # noqa: E402
from calico_jax.checkpoints import torch_export  # noqa: E402
from calico_jax.inference.export import main as export_main  # noqa: E402
from calico_jax.models.calico import Calico, CalicoConfig  # noqa: E402
from calico_jax.models.cam import CamConfig  # noqa: E402
from calico_jax.models.cem import CemConfig  # noqa: E402
from calico_jax.models.llama import LlamaForCausalLM  # noqa: E402
from convert.families.llama import hf_state_dict, torch_llama  # noqa: E402
from tests.helpers import assert_bit_equal_reload, nothing_at, rel_err, run_convert  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CALICO with every leaf random (as after training: LoRA B, CEM out_proj and CAMs non-zero),
    saved as a calico_jax checkpoint; CAM layers out of order so the ModuleList index matters."""
    cfg = CalicoConfig.tiny(cem=CemConfig(num_heads=4, zero_init_output=False),
                            cam=CamConfig(layers=(3, 1), zero_init=False))
    shapes = flax.linen.unbox(calico_jax.checkpoints.converted.abstract_params(Calico(cfg)))   # no init: shapes only
    g = np.random.default_rng(0)
    params = jax.tree.map(lambda v: g.normal(0, 0.2, v.shape).astype(np.float32), shapes)
    root = tmp_path_factory.mktemp("trained")
    calico_jax.checkpoints.converted.save(root / "model", "calico", cfg, params)
    tok = root / "model" / "tokenizer"                  # an exported model's tokenizer, with the Q-Former's inside
    (tok / "qformer_tokenizer").mkdir(parents=True)
    (tok / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    (tok / "qformer_tokenizer" / "vocab.txt").write_text("[PAD]\n[CLS]\n")
    return root, cfg, params


def test_round_trip_bit_equal(trained, tmp_path):
    root, cfg, params = trained
    rc = export_main(["--format", "torch", "--ckpt", str(root / "model"), "--out", str(tmp_path / "pt"), "--full"])
    assert rc == 0
    index = json.loads((tmp_path / "pt" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert {"model.extraction_layer.q_proj_weight", "model.extraction_layer.in_proj_bias",
            "model.adaptive_layers.1.weight", "model.reintegration_layers.0.bias", "model.query_tokens",
            "model.Qformer.bert.encoder.layer.0.crossattention.self.key.weight", "model.ln_vision.weight",
            "model.visual_encoder.blocks.1.attn.qkv.weight", "model.dino_model.blocks.0.attn.qkv.weight",
            "model.mm_projector.weight", "model.grounding_encoder.mask_decoder.iou_token.weight",
            "model.text_hidden_fcs.0.2.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"} <= names
    assert not any("lora" in n for n in names)
    rc, stdout, err = run_convert("calico", "--src", tmp_path / "pt", "--out", tmp_path / "back")
    assert rc == 0, err
    assert "LoRA factors: 16 tensor(s)" in stdout
    assert_bit_equal_reload(tmp_path / "back", cfg, params)
    # the tokenizer makes the whole trip (predict needs it): export -> tokenizer/ -> convert -> tokenizer/
    for rel in ("tokenizer.model", "qformer_tokenizer/vocab.txt"):
        assert (tmp_path / "back" / "tokenizer" / rel).read_bytes() == (root / "model" / "tokenizer" / rel).read_bytes()


def test_trainable_only_and_parts(trained, tmp_path):
    """Without --full only the trainable modules are written; converting it needs the frozen towers from
    --parts, and every missing tower is named in one message."""
    root, cfg, params = trained
    torch_export.save(tmp_path / "pt", cfg, params)
    names = set(json.loads((tmp_path / "pt" / "model.safetensors.index.json").read_text())["weight_map"])
    tops = {n.split(".")[1] if n.startswith("model.") else n.split(".")[0] for n in names}
    assert tops == {"extraction_layer", "adaptive_layers", "reintegration_layers", "query_tokens", "cam_query_tokens",
                    "grounding_encoder", "text_hidden_fcs"}
    assert all(".mask_decoder." in n for n in names if "grounding_encoder" in n)
    rc, _, err = run_convert("calico", "--src", tmp_path / "pt", "--out", tmp_path / "back")
    assert rc == 2 and nothing_at(tmp_path / "back")
    for what in ("EVA ViT", "Q-Former", "DINOv2", "LLaMA", "--parts"):
        assert what in err, err


def test_parts_fill_the_frozen_towers(trained, tmp_path):
    """The trainable-only export + converted parts (BLIP-2 vision, DINOv2, SAM, LLaMA) -> the same params."""
    from calico_jax.checkpoints import converted as pretrained
    root, cfg, params = trained
    torch_export.save(tmp_path / "pt", cfg, params)
    blip2 = {k: params[k] for k in ("vision_model", "qformer", "query_tokens", "language_projection")}
    q = cfg.vision.qformer   # an InstructBLIP part has instruction embeddings: unused (qformer_text_input off)
    blip2["qformer"] = {**blip2["qformer"], "embeddings": {
        **blip2["qformer"]["embeddings"],
        "word_embeddings": {"embedding": np.ones((q.vocab_size, q.hidden_size), np.float32)},
        "position_embeddings": {"embedding": np.ones((q.max_position_embeddings, q.hidden_size), np.float32)}}}
    llm = jax.tree_util.tree_map(lambda v: v, params["llm"])
    for layer in llm["model"].values():
        if isinstance(layer, dict) and "self_attn" in layer:
            for proj in layer["self_attn"].values():
                proj.pop("lora_a", None), proj.pop("lora_b", None)
    parts = [("blip2_vision", cfg.vision, blip2), ("dinov2", cfg.dinov2, params["dinov2"]),
             ("sam", cfg.sam, params["sam"]), ("llama", cfg.llm.replace(lora=None), llm)]
    dirs = [pretrained.save(tmp_path / name, name, c, p) for name, c, p in parts]
    rc, stdout, err = run_convert("calico", "--src", tmp_path / "pt", "--out", tmp_path / "back", "--parts", *dirs)
    assert rc == 0, err
    n_dino = len(jax.tree.leaves(params["dinov2"]))
    assert f"DINOv2 (model.dino_model.*): {n_dino} tensor(s) from --parts {dirs[1]}" in stdout, stdout
    assert_bit_equal_reload(tmp_path / "back", cfg, params)


def test_peft_adapter_logits(trained, tmp_path):
    """DIR/adapter loads with peft onto the HF LLaMA of our base weights; logits == our LoRA forward."""
    root, cfg, params = trained
    torch_export.save(tmp_path / "pt", cfg, params)

    def strip(tree):
        return {k: strip(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")} if isinstance(tree, dict) \
            else tree
    base_state = hf_state_dict(strip(params["llm"]))
    hf = torch_llama(cfg.llm.replace(lora=None), base_state)
    model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "pt" / "adapter")).eval()
    ids = np.random.default_rng(2).integers(0, cfg.llm.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    with jax.default_matmul_precision("highest"):
        ours = LlamaForCausalLM(cfg.llm).apply({"params": params["llm"]}, jnp.asarray(ids, jnp.int32),
                                               jnp.asarray(mask)).logits
    assert rel_err(ours, ref) < 1e-5
    without = torch_llama(cfg.llm.replace(lora=None), base_state)   # the adapter changes the logits
    with torch.no_grad():
        no_lora = without(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    assert rel_err(no_lora, ref) > 1e-3
