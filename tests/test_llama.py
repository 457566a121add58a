"""Vicuna/LLaMA decoder (𝓜): parity with transformers LlamaForCausalLM (MHA/GQA, tied/untied,
rope_theta / linear RoPE scaling, odd head counts, biases, left padding), KV-cache decoding vs the
full forward, CAM hook points, LoRA merge, config parsing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calico_jax.checkpoints.converted import init_params  # noqa: E402
from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from calico_jax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from calico_jax.models.lora import LoraConfig, lora_mask, merge_lora  # noqa: E402
from calico_jax.models.scan import stack_layers  # noqa: E402
from convert.families.llama import HF_LLAMA, random_batch  # noqa: E402
from convert.mapping import build_params  # noqa: E402
from tests.helpers import randomize, rel_err  # noqa: E402

TOL = 1e-5
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-6)
HF_CONFIGS = {
    "mha_untied": dict(),
    "gqa_odd_heads_tied_theta": dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=1,
                                     tie_word_embeddings=True, rope_theta=500.0, rms_norm_eps=1e-5),
    "gqa_linear_rope_bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}, vocab_size=128,
                                 hidden_act="silu"),
}


def hf_llama(seed: int = 0, **overrides):
    """A tiny randomised transformers LlamaForCausalLM (eager attention)."""
    kw = {**BASE, **overrides}
    cfg = transformers.LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    randomize(model, seed=seed, std=0.3)
    return model


def convert(model, tmp_path):
    """Through the hf-llama family: save_pretrained -> plan -> build_params."""
    src = tmp_path / "hf"
    model.save_pretrained(src)
    ckpt = open_checkpoint(src)
    plan = HF_LLAMA.plan(ckpt, None)
    return plan.module(), build_params(ckpt, plan, progress=False)


def torch_forward(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos), output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


@pytest.mark.parametrize("name,scan_layers", [(n, False) for n in HF_CONFIGS] + [("gqa_linear_rope_bias", True)])
def test_parity_with_transformers(name, scan_layers, tmp_path):
    """``scan_layers``: the converted per-layer params stacked at load and run as one scanned segment."""
    model = hf_llama(**HF_CONFIGS[name])
    module, params = convert(model, tmp_path)
    if scan_layers:
        module = LlamaForCausalLM(module.config.replace(scan_layers=True))
        params = stack_layers(params, module.config)
        assert "scan_0_2" in params["model"] and "layers_0" not in params["model"]
    ids, mask = random_batch(module.config, batch=3, length=10, seed=1)  # row 1 left-padded
    logits, hidden = torch_forward(model, ids, mask)
    out = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    keep = mask.astype(bool)
    assert rel_err(np.asarray(out.logits)[keep], logits[keep]) <= TOL
    assert rel_err(np.asarray(out.hidden_states)[keep], hidden[keep]) <= TOL
    # A left-padded row equals the same tokens unpadded.
    solo = module.apply({"params": params}, jnp.asarray(ids[1:2, 3:], jnp.int32))
    np.testing.assert_allclose(np.asarray(solo.logits)[0], np.asarray(out.logits)[1, 3:], atol=1e-5)


@pytest.mark.parametrize("name", ["mha_untied", "gqa_linear_rope_bias"])
def test_rope_tables_match_transformers(name):
    """Both forms of the RoPE tables (computed per position; gathered from a table of ``rows``) against HF's
    rotary embedding, at random positions; and the model's forward evaluates cos/sin once, not per layer."""
    from calico_jax.models.llama_attention import rope_tables
    hf_cfg = transformers.LlamaConfig(**{**BASE, **HF_CONFIGS[name]})
    cfg = LlamaConfig.from_hf_config(hf_cfg)
    pos = np.random.default_rng(0).integers(0, 40, (2, 7))
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    want = rotary(torch.zeros(1), torch.from_numpy(pos))
    for rows in (None, 40):
        got = rope_tables(cfg, jnp.asarray(pos), jnp.float32, rows)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-6, rtol=0)
    module = LlamaForCausalLM(cfg)
    ids = jnp.ones((1, 9), jnp.int32)
    hlo = jax.jit(lambda p: module.apply({"params": p}, ids).logits).lower(init_params(module)).compile().as_text()
    assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1, "cos/sin fused into the layers"


def test_config_forms():
    old = dict(BASE, rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 4.0}, eos_token_id=[2, 5])
    cfg = LlamaConfig.from_hf_config(old)
    assert (cfg.rope_theta, cfg.rope_linear_factor, cfg.eos_token_ids, cfg.head_dim) == (5000.0, 4.0, (2, 5), 8)
    new = transformers.LlamaConfig(**BASE, rope_parameters={"rope_type": "default", "rope_theta": 123.0},
                                   num_key_value_heads=2)
    cfg = LlamaConfig.from_hf_config(new)
    assert (cfg.rope_theta, cfg.rope_linear_factor, cfg.num_key_value_heads) == (123.0, 1.0, 2)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception, match="rope type"):
        LlamaConfig.from_hf_config(dict(BASE, rope_scaling={"type": "dynamic", "factor": 2.0}))


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=100.0)
    module = LlamaForCausalLM(cfg)
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, init_params(module, seed=1))
    return module, params


def test_kv_cache_decoding_equals_full_forward(tiny):
    module, params = tiny
    ids, mask = random_batch(module.config, batch=2, length=9, seed=3)
    full = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    cache = KVCache.init(module.config, 2, 16)
    out = module.apply({"params": params}, jnp.asarray(ids[:, :5], jnp.int32), jnp.asarray(mask[:, :5]), cache=cache)
    logits, hidden, cache = [out.logits], [out.hidden_states], out.cache
    for t in range(5, 9):  # one token at a time from the cache
        step = module.apply({"params": params}, jnp.asarray(ids[:, t:t + 1], jnp.int32), jnp.ones((2, 1)),
                            cache=cache)
        logits.append(step.logits)
        hidden.append(step.hidden_states)
        cache = step.cache
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(logits, 1)[keep], np.asarray(full.logits)[keep], atol=2e-5)
    np.testing.assert_allclose(np.concatenate(hidden, 1)[keep], np.asarray(full.hidden_states)[keep], atol=2e-5)
    assert int(cache.index) == 9 and np.asarray(cache.valid)[:, :9].tolist() == keep.tolist()


def test_hooks(tiny):
    module, params = tiny
    ids, mask = random_batch(module.config, batch=2, length=8, seed=4)
    ids[1, -2:] = 0
    mask[1] = [0, 0, 0, 1, 1, 1, 0, 0]  # left and right padding: last prompt token at 5
    run = lambda **kw: module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), **kw)  # noqa
    plain = run()
    seen = {}

    def identity(h, last):
        seen["shape"], seen["last"] = h.shape, np.asarray(last)
        return h

    same = run(hooks={1: identity})
    np.testing.assert_array_equal(np.asarray(same.logits), np.asarray(plain.logits))
    assert seen["shape"] == (2, 8, 32) and seen["last"].tolist() == [7, 5]

    def bump_last(h, last):  # CAM-like: rewrite the state at the last prompt token only
        return h.at[jnp.arange(h.shape[0]), last].add(1.0)

    changed = np.asarray(run(hooks={2: bump_last}).logits)
    np.testing.assert_array_equal(changed[0, :7], np.asarray(plain.logits)[0, :7])  # causal: earlier untouched
    assert np.abs(changed[0, 7] - np.asarray(plain.logits)[0, 7]).max() > 1e-3


def test_lora_merge_and_mask(tiny):
    module, params = tiny
    cfg = module.config.replace(lora=LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "up_proj")))
    lmod = LlamaForCausalLM(cfg)
    lparams = init_params(lmod, seed=2)
    ids, mask = random_batch(cfg, batch=2, length=7, seed=5)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    # B = 0 at init (PEFT): the adapter is a no-op.
    base = {k: v for k, v in lparams.items()}
    np.testing.assert_allclose(np.asarray(lmod.apply({"params": lparams}, *args).logits),
                               np.asarray(module.apply({"params": merge_lora(base, cfg.lora)}, *args).logits),
                               atol=1e-6)
    lparams = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.key(len(str(p))), x.shape) * 0.3
        if p[-1].key == "lora_b" else x, lparams)
    unmerged = np.asarray(lmod.apply({"params": lparams}, *args).logits)
    merged_params = merge_lora(lparams, cfg.lora)
    merged = np.asarray(module.apply({"params": merged_params}, *args).logits)
    assert rel_err(merged, unmerged) <= TOL
    assert np.abs(merged - np.asarray(module.apply({"params": merge_lora(
        jax.tree_util.tree_map_with_path(lambda p, x: x * 0 if p[-1].key == "lora_b" else x, lparams),
        cfg.lora)}, *args).logits)).max() > 1e-3  # the adapter does change the output
    mask_tree = lora_mask(lparams)
    flagged = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(mask_tree) if v}
    assert len(flagged) == 3 * 3 * 2 and all("lora_" in f for f in flagged)
    # Dropout is active only when asked for.
    drop = lmod.apply({"params": lparams}, *args, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert np.abs(np.asarray(drop.logits) - unmerged).max() > 0


@pytest.mark.parametrize("name", ["mha_untied", "gqa_odd_heads_tied_theta", "gqa_linear_rope_bias"])
def test_gradients_match_transformers(name, tmp_path):
    """Training path: the written-out backward of the attention and of lm_head + CE
    (losses.causal_lm_loss_from_hidden) against torch autograd of HF's loss, every parameter, left padding."""
    from calico_jax.train.losses import causal_lm_loss_from_hidden
    model = hf_llama(**HF_CONFIGS[name])
    module, params = convert(model, tmp_path)
    ids, mask = random_batch(module.config, batch=3, length=10, seed=2)
    labels = np.where(mask.astype(bool), ids, -100)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    model.zero_grad()
    with torch.enable_grad():
        loss = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(pos), labels=torch.from_numpy(labels)).loss
        loss.backward()
    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}

    def loss_fn(p):
        hidden = module.apply({"params": p}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)).hidden_states
        kernel = LlamaForCausalLM.output_kernel(module.config, p)   # the token table when tied
        return causal_lm_loss_from_hidden(hidden, kernel, jnp.asarray(labels, jnp.int32))["ce"]

    value, grads = jax.value_and_grad(loss_fn)(params)
    assert abs(float(value) - float(loss)) <= 1e-5 * float(loss)
    checked = 0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        names = [k.key for k in path]
        key = ".".join(n.replace("layers_", "layers.") for n in names[:-1])
        leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[names[-1]]
        ref = torch_grads[f"{key}.{leaf}"]
        assert rel_err(np.asarray(g), ref.T if names[-1] == "kernel" else ref) <= 1e-4, key
        checked += 1
    assert checked == len(torch_grads)
