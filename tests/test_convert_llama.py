"""hf-llama and peft-lora converters end to end through the CLI: --verify (logits + 32 greedy tokens vs
transformers generate; LoRA vs peft and merge_and_unload), reload, sharded/.bin inputs, PEFT key
variants, LoRA export back to PEFT names, and the error paths."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

import calico_jax  # noqa: E402
from calico_jax.models.lora import lora_state_dict  # noqa: E402
from convert.families.llama import random_batch  # noqa: E402
from tests.helpers import nothing_at, rel_err, run_convert  # noqa: E402
from tests.test_llama import HF_CONFIGS, hf_llama, torch_forward  # noqa: E402


def check_reload(out, model):
    module, params, cfg = calico_jax.load(out)
    ids, mask = random_batch(cfg, batch=2, length=8, seed=9)
    logits, _ = torch_forward(model, ids, mask)
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)).logits)
    keep = mask.astype(bool)
    assert rel_err(ours[keep], logits[keep]) <= 1e-5
    return module, params, cfg


@pytest.mark.parametrize("name", ["mha_untied", "gqa_odd_heads_tied_theta"])
def test_hf_llama_cli_verify(name, tmp_path):
    model = hf_llama(**HF_CONFIGS[name])
    model.save_pretrained(tmp_path / "hf")
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "float32")   # same numerics as "highest", another name
    try:
        rc, out, err = run_convert("hf-llama", "--src", tmp_path / "hf", "--out", tmp_path / "out", "--verify")
        assert jax.config.jax_default_matmul_precision == "float32"   # --verify scopes its own precision
    finally:
        jax.config.update("jax_default_matmul_precision", before)
    assert rc == 0, err
    assert "verify: greedy_match=32/32" in out
    assert out.strip().splitlines()[-2].startswith("verify: max_rel_err=") and "PASS" in out.splitlines()[-2]
    check_reload(tmp_path / "out", model)


def test_hf_llama_sharded_and_bin(tmp_path):
    model = hf_llama(**HF_CONFIGS["gqa_linear_rope_bias"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    rc, _, err = run_convert("hf-llama", "--src", tmp_path / "sharded", "--out", tmp_path / "a")
    assert rc == 0, err
    check_reload(tmp_path / "a", model)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    rc, _, err = run_convert("hf-llama", "--src", tmp_path / "pytorch_model.bin", "--config",
                             tmp_path / "sharded" / "config.json", "--out", tmp_path / "b")
    assert rc == 0, err
    check_reload(tmp_path / "b", model)


def test_hf_llama_bad_inputs(tmp_path):
    model = hf_llama()
    src = tmp_path / "hf"
    model.save_pretrained(src)
    sd = load_file(src / "model.safetensors")
    cases = {
        "renamed": ({("model.layers.0.mlp.gate_projX.weight" if k == "model.layers.0.mlp.gate_proj.weight" else k): v
                     for k, v in sd.items()}, "model.layers.0.mlp.gate_projX.weight"),
        "shape": ({k: (v[:, :-1].contiguous() if k == "model.layers.1.self_attn.o_proj.weight" else v)
                   for k, v in sd.items()}, "model.layers.1.self_attn.o_proj.weight (32, 31)"),
    }
    for case, (state, needle) in cases.items():
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        save_file(state, d / "model.safetensors")
        rc, _, err = run_convert("hf-llama", "--src", d, "--out", tmp_path / f"out_{case}")
        assert rc == 2 and needle in err and "Traceback" not in err, err
        assert nothing_at(tmp_path / f"out_{case}")
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    rc, _, err = run_convert("hf-llama", "--src", d, "--out", tmp_path / "out_t")
    assert rc == 2 and "truncated" in err and "model.safetensors" in err
    assert nothing_at(tmp_path / "out_t")
    rc, _, err = run_convert("hf-llama", "--src", src, "--out", tmp_path / "o", "--base", tmp_path)
    assert rc == 2 and "--base is not used by hf-llama" in err


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    model = hf_llama(**HF_CONFIGS["gqa_linear_rope_bias"])
    model.save_pretrained(tmp / "hf")
    rc, _, err = run_convert("hf-llama", "--src", tmp / "hf", "--out", tmp / "base")
    assert rc == 0, err
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp / "adapter")
    return tmp, pm.eval()


def test_peft_lora_cli_verify_and_export(lora_setup, tmp_path):
    tmp, pm = lora_setup
    rc, out, err = run_convert("peft-lora", "--src", tmp / "adapter", "--base", tmp / "base", "--out",
                               tmp_path / "out", "--verify")
    assert rc == 0, err
    assert "merged_logits" in out and out.strip().splitlines()[-2].endswith("PASS")
    module, params, cfg = calico_jax.load(tmp_path / "out")
    assert cfg.lora.r == 4 and cfg.lora.scaling == 2.0 and cfg.lora.target_modules == ("q_proj", "v_proj", "down_proj")
    # Export back to PEFT naming reproduces the adapter file exactly.
    exported = lora_state_dict(params)
    saved = load_file(tmp / "adapter" / "adapter_model.safetensors")
    assert set(exported) == set(saved)
    for k, v in saved.items():
        np.testing.assert_array_equal(exported[k], v.numpy())
    # Our LoRA forward equals peft's (independent of the CLI's own verify).
    ids, mask = random_batch(cfg, batch=2, length=8, seed=2)
    ref = pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             position_ids=torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)).logits)
    keep = mask.astype(bool)
    assert rel_err(ours[keep], ref[keep]) <= 1e-5


def test_peft_lora_key_variants(lora_setup, tmp_path):
    tmp, pm = lora_setup
    saved = load_file(tmp / "adapter" / "adapter_model.safetensors")
    cfg = (tmp / "adapter" / "adapter_config.json").read_text()
    # In-memory names with ".default" and no prefix; and an old-peft full state dict (base weights included).
    default = {k.replace("base_model.model.", "").replace(".weight", ".default.weight"): v for k, v in saved.items()}
    full = {k: v.contiguous() for k, v in pm.state_dict().items() if "rotary" not in k}
    full = {k.replace(".base_layer.", "."): v for k, v in full.items()}
    for name, state in (("default", default), ("full", full)):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(cfg)
        torch.save(state, d / "adapter_model.bin")
        rc, out, err = run_convert("peft-lora", "--src", d, "--base", tmp / "base", "--out", tmp_path / f"o_{name}",
                                   "--verify")
        assert rc == 0, err
        assert out.strip().splitlines()[-2].endswith("PASS")
    assert "base tensor(s) taken from the adapter file" in out


def test_peft_lora_errors(lora_setup, tmp_path):
    tmp, _ = lora_setup
    rc, _, err = run_convert("peft-lora", "--src", tmp / "adapter", "--out", tmp_path / "o")
    assert rc == 2 and "--base" in err and nothing_at(tmp_path / "o")
    saved = load_file(tmp / "adapter" / "adapter_model.safetensors")
    bad_key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text((tmp / "adapter" / "adapter_config.json").read_text())
    bad = {k: (v[:3].contiguous() if k == bad_key else v) for k, v in saved.items()}
    save_file(bad, d / "adapter_model.safetensors")
    rc, _, err = run_convert("peft-lora", "--src", d, "--base", tmp / "base", "--out", tmp_path / "o2")
    assert rc == 2 and bad_key in err and "(3, 32)" in err and nothing_at(tmp_path / "o2")
    cfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    rc, _, err = run_convert("peft-lora", "--src", d, "--base", tmp / "base", "--out", tmp_path / "o3")
    assert rc == 2 and "use_dora" in err
