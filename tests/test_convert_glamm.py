"""The ``glamm`` converter: a tiny GLaMM/LISA-like checkpoint (LLaMA under model.* + lm_head, SAM under
model.grounding_encoder.* / model.visual_model.*, text_hidden_fcs, and CLIP / mm_projector /
region_encoder keys that must be skipped) -> glamm_parts, through the CLI with --verify, reload, and
the error paths."""
from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

import calico_jax  # noqa: E402
from calico_jax.models.sam import SamConfig  # noqa: E402
from convert.families.llama import random_batch  # noqa: E402
from convert.families.sam import build_original  # noqa: E402
from tests.helpers import nothing_at, randomize, rel_err, run_convert  # noqa: E402
from tests.test_llama import hf_llama  # noqa: E402
from tests.test_sam import CONFIG_A, CONFIG_B, scale_up  # noqa: E402

PASS = re.compile(r"^verify: max_rel_err=\S+ \(tol 1e-05\) PASS$", re.M)
GLAMM_VOCAB = 64        # config.json's vocab before GLaMM adds its tokens; the tensors have more
CASES = {
    # GLaMM: MHA, 5 added tokens, SAM A, Linear-ReLU-Linear projection
    "glamm": dict(prefix="model.grounding_encoder.", sam=CONFIG_A, projection="mlp",
                  llm=dict(vocab_size=69, hidden_size=32)),
    # LISA: GQA with odd heads, other rope theta / eps, SAM B, a single Linear projection
    "lisa": dict(prefix="model.visual_model.", sam=CONFIG_B, projection="linear",
                 llm=dict(vocab_size=67, hidden_size=36, num_attention_heads=3, num_key_value_heads=1,
                          rope_theta=500.0, rms_norm_eps=1e-5)),
}
UNUSED_SHAPES = {
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": (8, 3, 14, 14),
    "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": (8,),
    "model.mm_projector.0.weight": (32, 8),
    "model.mm_projector.2.bias": (32,),
    "model.region_encoder.mlvl_fuse.0.weight": (4, 8),
}


def torch_sam(config_dict, seed=0):
    ref = build_original(SamConfig.from_original(config_dict))
    randomize(ref, seed=seed)
    with torch.no_grad():  # the real PE table is N(0, 1); std-0.1 noise would flatten the prompt PE
        ref.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.normal_(
            0, 1, generator=torch.Generator().manual_seed(seed))
        scale_up(ref.mask_decoder)
    return ref


def torch_projection(d, c, kind, seed=0):
    torch.manual_seed(seed)
    mods = [torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, c), torch.nn.Dropout(0.0)] \
        if kind == "mlp" else [torch.nn.Linear(d, c)]
    seq = torch.nn.Sequential(*mods).eval()
    randomize(seq, seed=seed, std=0.3)
    return seq


def glamm_checkpoint(path, case, seed=0):
    """Writes a GLaMM/LISA-like HF directory; returns the torch parts (llm, sam, projection)."""
    c = CASES[case]
    llm = hf_llama(seed=seed, **c["llm"])
    sam = torch_sam(c["sam"], seed=seed + 1)
    proj = torch_projection(c["llm"]["hidden_size"], c["sam"]["prompt_encoder"]["embed_dim"], c["projection"], seed)
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    state.update({c["prefix"] + k: v.contiguous() for k, v in sam.state_dict().items()})
    state.update({f"model.text_hidden_fcs.0.{k}": v.contiguous() for k, v in proj.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    state.update({k: torch.randn(s, generator=g) for k, s in UNUSED_SHAPES.items()})
    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors")
    hf = llm.config.to_dict()
    hf.update(model_type="llava", architectures=["GLaMMForCausalLM"], vocab_size=GLAMM_VOCAB,
              mm_vision_tower="openai/clip-vit-large-patch14-336", out_dim=c["sam"]["prompt_encoder"]["embed_dim"])
    (path / "config.json").write_text(json.dumps(hf))
    seg_id = c["llm"]["vocab_size"] - 2
    (path / "added_tokens.json").write_text(json.dumps({"[SEG]": seg_id, "<p>": seg_id - 1, "</p>": seg_id + 1}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (path / "sam_args.json").write_text(json.dumps({"sam": c["sam"]}))
    return llm, sam, proj


def convert_glamm(tmp_path, case, *extra):
    src = tmp_path / f"{case}_src"
    parts = glamm_checkpoint(src, case)
    out = tmp_path / f"{case}_out"
    rc, stdout, stderr = run_convert("glamm", "--src", src, "--out", out, "--config", src / "sam_args.json", *extra)
    return parts, src, out, rc, stdout, stderr


@pytest.mark.parametrize("case", list(CASES))
def test_cli_glamm_verify_and_load(case, tmp_path):
    (llm, sam, proj), src, out, rc, stdout, stderr = convert_glamm(tmp_path, case, "--verify")
    assert rc == 0, stderr
    assert PASS.search(stdout), stdout
    for name in ("llm: logits", "sam: text_embeds: low_res_masks", "sam: image_embeddings", "text_hidden_fcs"):
        assert f"  {name} " in stdout, name
    assert "skipped 3 key(s): CLIP vision tower" not in stdout   # 2 CLIP keys, counted as such
    assert "skipped 2 key(s): CLIP vision tower" in stdout
    assert "skipped 2 key(s): LLaVA mm_projector" in stdout
    assert "skipped 1 key(s): GLaMM region_encoder" in stdout
    vocab = CASES[case]["llm"]["vocab_size"]
    assert f"vocab_size {vocab} taken from model.embed_tokens.weight (config.json says {GLAMM_VOCAB}" in stdout
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["added_tokens.json", "tokenizer_config.json"]

    module, params, cfg = calico_jax.load(out)
    assert cfg.seg_token_id == vocab - 2 and cfg.llm.vocab_size == vocab
    assert cfg.seg_projection == CASES[case]["projection"]
    # reloaded LLM vs transformers
    ids, mask = random_batch(cfg.llm, batch=2, length=9, seed=4)
    with torch.no_grad():
        ref = llm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0)))
    ours = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                        method=lambda m, i, a: m.llm(i, a))
    keep = mask.astype(bool)
    assert rel_err(np.asarray(ours.logits)[keep], ref.logits.numpy()[keep]) <= 1e-5
    # reloaded [SEG] projection vs the torch Sequential, SAM image embeddings vs segment-anything
    h = np.random.default_rng(1).normal(size=(4, cfg.llm.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = proj(torch.from_numpy(h))
    assert rel_err(module.apply({"params": params}, jnp.asarray(h), method="project_seg"), want) <= 1e-5
    s = cfg.sam.image_encoder.img_size
    x = np.random.default_rng(2).normal(size=(1, 3, s, s)).astype(np.float32)
    emb = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                       method=lambda m, v: m.sam.image_embeddings(v))
    with torch.no_grad():
        assert rel_err(np.asarray(emb).transpose(0, 3, 1, 2), sam.image_encoder(torch.from_numpy(x))) <= 1e-5
    # the SAM subtree is the torch state dict, bit for bit
    np.testing.assert_array_equal(np.asarray(params["sam"]["mask_decoder"]["iou_token"]["embedding"]),
                                  sam.state_dict()["mask_decoder.iou_token.weight"].numpy())


def _rewrite(src, edit):
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, src / "model.safetensors")


def _bad(tmp_path, edit):
    src = tmp_path / "src"
    glamm_checkpoint(src, "glamm")
    if edit is not None:
        edit(src)
    out = tmp_path / "out"
    rc, _, err = run_convert("glamm", "--src", src, "--out", out, "--config", src / "sam_args.json")
    assert rc == 2, err
    assert nothing_at(out)
    return err


def test_renamed_key(tmp_path):
    err = _bad(tmp_path, lambda src: _rewrite(src, lambda s: s.__setitem__(
        "model.text_hidden_fcs.0.2.wieght", s.pop("model.text_hidden_fcs.0.2.weight"))))
    assert "model.text_hidden_fcs.0.2.wieght" in err and "1 missing" in err and "text_hidden_fcs_0_2/kernel" in err


def test_wrong_shape(tmp_path):
    key = "model.grounding_encoder.mask_decoder.iou_token.weight"
    err = _bad(tmp_path, lambda src: _rewrite(src, lambda s: s.__setitem__(key, torch.zeros(1, 31))))
    assert key in err and "(1, 31)" in err and "(1, 32)" in err


def test_truncated_file(tmp_path):
    def cut(src):
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:len(data) - 100])
    err = _bad(tmp_path, cut)
    assert "model.safetensors" in err and "truncated" in err


def test_no_sam_config_and_no_preset(tmp_path):
    src = tmp_path / "src"
    glamm_checkpoint(src, "glamm")
    rc, _, err = run_convert("glamm", "--src", src, "--out", tmp_path / "out")
    assert rc == 2 and "pass --config" in err and nothing_at(tmp_path / "out")


def test_not_glamm(tmp_path):
    def drop(src):
        _rewrite(src, lambda s: [s.pop(k) for k in list(s) if k.startswith("model.text_hidden_fcs.")])
    err = _bad(tmp_path, drop)
    assert "no model.text_hidden_fcs" in err
