"""Scanned layer stacks (``scan_layers``, :mod:`calico_jax.models.scan`): the scanned LLaMA decoder (segments cut
at the CAM layers, remat inside the scan, LoRA), EVA ViT and DINOv2 equal their unrolled forms (forward and
gradients, fp32), stack/unstack is an exact round trip, KV-cache decoding gives the same tokens, converted
checkpoints stay per-layer on disk and load into either layout, and the PyTorch export of a scanned tree is the
export of its per-layer tree."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calico_jax.checkpoints import converted, torch_export
from calico_jax.models import scan
from calico_jax.models.calico import Calico, CalicoConfig
from calico_jax.models.dinov2 import Dinov2, Dinov2Config
from calico_jax.models.eva_vit import EvaVit, EvaVitConfig
from calico_jax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from calico_jax.models.lora import LoraConfig, lora_mask, merge_lora

TOL = 2e-6        # fp32: the scanned body is the same math, fused differently
LLAMA = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                    lora=LoraConfig(r=4, alpha=8.0, dropout=0.0))
HOOKS = {2: lambda h, last: h * 1.25 + 0.1, 4: lambda h, last: h.at[jnp.arange(h.shape[0]), last].add(1.0)}


def jitter(params, seed=1, std=0.05):
    """Every leaf moved off its init (LoRA B non-zero), so every path of the forward and backward matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def assert_trees_close(a, b, tol=TOL):
    """Relative to each leaf's scale (max |b|), so gradient sums of any size are held to the same precision. A leaf
    whose exact value is zero (the gradient of a key bias: softmax ignores it) holds rounding noise only, so the
    scale is floored at 1e-3 of the largest value of the whole tree."""
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    floor = 1e-3 * max(float(np.abs(np.asarray(y)).max()) for _, y in flat_b)
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(float(np.abs(y).max()), floor)
        assert float(np.abs(x - y).max()) <= tol * scale, (jax.tree_util.keystr(path), np.abs(x - y).max(), scale)


def llama_pair(remat="none"):
    cfg = LLAMA.replace(remat=remat)
    scfg = cfg.replace(scan_layers=True, scan_splits=tuple(HOOKS))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
    params = jitter(nn.unbox(LlamaForCausalLM(cfg).init(jax.random.key(0), ids))["params"])
    return cfg, scfg, ids, params


@pytest.mark.parametrize("remat", ["none", "full"])
def test_llama_scanned_equals_unrolled(remat):
    cfg, scfg, ids, params = llama_pair(remat)
    sparams = scan.stack_layers(params, scfg)
    assert sorted(sparams["model"]) == ["embed_tokens", "norm", "scan_0_2", "scan_2_4", "scan_4_5"]
    mask = jnp.asarray([[1] * 7, [0, 0] + [1] * 5])

    def loss(module, p):
        out = module.apply({"params": p}, ids, mask, hooks=HOOKS)
        return jnp.sum(out.logits * jnp.linspace(-1, 1, out.logits.shape[-1])), out.logits

    (l0, y0), g0 = jax.value_and_grad(lambda p: loss(LlamaForCausalLM(cfg), p), has_aux=True)(params)
    (l1, y1), g1 = jax.value_and_grad(lambda p: loss(LlamaForCausalLM(scfg), p), has_aux=True)(sparams)
    assert_trees_close(y1, y0)
    assert_trees_close(scan.unstack_layers(g1, scfg), g0, tol=2e-5)   # sums over 2x7 tokens and 64 logits
    # LoRA factors are still found by name under the stacked layout (the trainable mask of the recipe).
    masked = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(lora_mask(sparams)) if m}
    assert len(masked) == 2 * 2 * 3 and all("scan_" in p for p in masked)


def test_llama_hook_inside_a_segment_is_an_error():
    _, scfg, ids, params = llama_pair()
    with pytest.raises(ValueError, match=r"hooks at layers \[3\].*scan_splits"):
        LlamaForCausalLM(scfg).apply({"params": scan.stack_layers(params, scfg)}, ids, hooks={3: HOOKS[2]})


def test_llama_kv_cache_decoding_under_scan():
    """Prefill with hooks + greedy decoding: the scanned decoder gives the same tokens (and logits) as unrolled."""
    cfg, scfg, ids, params = llama_pair()
    sparams = scan.stack_layers(params, scfg)
    runs = []
    for c, p in ((cfg, params), (scfg, sparams)):
        module = LlamaForCausalLM(c)
        cache = KVCache.init(c, 2, 7 + 6)
        out = module.apply({"params": p}, ids, cache=cache, hooks=HOOKS, last_logits_only=True)
        tokens, logits = [], [out.logits[:, -1]]
        step = jax.jit(lambda p, tok, cache, m=module: m.apply({"params": p}, tok[:, None], cache=cache,
                                                               last_logits_only=True))
        for _ in range(6):
            tok = jnp.argmax(out.logits[:, -1], -1)
            tokens.append(tok)
            out = step(p, tok, out.cache)
            logits.append(out.logits[:, -1])
        runs.append((np.stack(tokens, 1), np.stack(logits, 1), out.cache))
    (t0, y0, c0), (t1, y1, c1) = runs
    np.testing.assert_array_equal(t1, t0)
    assert_trees_close(y1, y0)
    assert [k.shape[0] for k in c1.k] == [2, 2, 1]                     # one stacked buffer per segment
    assert_trees_close(jnp.concatenate(c1.k), jnp.stack(c0.k))


@pytest.mark.parametrize("tower", ["eva", "dinov2"])
def test_vision_towers_scanned_equal_unrolled(tower):
    if tower == "eva":
        cfg, cls, key = EvaVitConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=3, num_attention_heads=4, remat="dots"), EvaVit, "layers_"
    else:
        cfg = Dinov2Config(image_size=28, patch_size=14, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                           use_swiglu_ffn=False, num_register_tokens=1)
        cls, key = Dinov2, "layer_"
    scfg = cfg.replace(scan_layers=True)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
    params = jitter(nn.unbox(cls(cfg).init(jax.random.key(0), x))["params"])
    assert f"{key}2" in params["encoder"]
    sparams = scan.stack_layers(params, scfg)
    assert list(sparams["encoder"]) == ["scan_0_3"]
    kw = {"output_hidden_states": True} if tower == "dinov2" else {}

    def run(c, p, x):
        out = cls(c).apply({"params": p}, x, **kw)
        return jnp.sum(out["last_hidden_state"] ** 2), out

    (l0, o0), g0 = jax.value_and_grad(lambda p, x: run(cfg, p, x), argnums=(0, 1), has_aux=True)(params, x)
    (l1, o1), g1 = jax.value_and_grad(lambda p, x: run(scfg, p, x), argnums=(0, 1), has_aux=True)(sparams, x)
    assert_trees_close(o1, o0)
    assert_trees_close((scan.unstack_layers(g1[0], scfg), g1[1]), g0, tol=2e-5)


@pytest.fixture(scope="module")
def calico_pair():
    cfg = CalicoConfig.tiny()
    scfg = cfg.with_scan(True)
    g = np.random.default_rng(0)   # every leaf random (LoRA B, CAMs non-zero), as after training
    params = jax.tree.map(lambda v: g.normal(0, 0.2, v.shape).astype(np.float32),
                          nn.unbox(converted.abstract_params(Calico(cfg))))
    return cfg, scfg, params


def test_stack_unstack_round_trip_bit_equal(calico_pair):
    cfg, scfg, params = calico_pair
    stacked = scan.stack_layers(params, scfg)
    abstract = nn.unbox(converted.abstract_params(Calico(scfg)))
    assert jax.tree.structure(stacked) == jax.tree.structure(abstract)
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda a: a.shape, abstract)
    back = scan.unstack_layers(stacked, scfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # idempotent, and a no-op for an unscanned config
    assert scan.stack_layers(stacked, scfg) is stacked and scan.unstack_layers(params, scfg) is params
    assert scan.stack_layers(params, cfg) is params


def test_calico_scanned_equals_unrolled(calico_pair):
    """The whole tiny CALICO (EVA, DINOv2 and the decoder scanned, CAMs between segments): same outputs."""
    cfg, scfg, params = calico_pair
    module = Calico(cfg)
    inputs = module.dummy_inputs()
    out = module.apply({"params": params}, inputs)
    sout = Calico(scfg).apply({"params": scan.stack_layers(params, scfg)}, inputs)
    for k in ("logits", "hidden_states", "mask_logits"):
        assert_trees_close(sout[k], out[k])


def test_converted_checkpoint_stays_per_layer(calico_pair, tmp_path):
    """Saved from a scanned tree, the directory holds per-layer params; it loads stacked under the scanned config
    and per-layer under the unscanned one (a directory written before scanning existed loads the same way)."""
    cfg, scfg, params = calico_pair
    converted.save(tmp_path / "scanned", "calico", scfg, scan.stack_layers(params, scfg))
    converted.save(tmp_path / "plain", "calico", cfg, params)
    _, loaded, lcfg = converted.load(tmp_path / "scanned")
    assert lcfg == scfg and "scan_1_3" in loaded["llm"]["model"]
    for a, b in zip(jax.tree.leaves(scan.unstack_layers(loaded, scfg)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    _, plain, _ = converted.load(tmp_path / "plain")
    assert "layers_3" in plain["llm"]["model"]
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          nn.unbox(converted.abstract_params(Calico(scfg))))
    restored = converted.restore_params(tmp_path / "plain", target, scfg)   # a per-layer base into a scanned run
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_torch_export_of_a_scanned_tree_is_the_per_layer_export(calico_pair, tmp_path):
    """Export names one tensor per layer: the scanned tree exports exactly what its per-layer tree exports
    (which ``tests/test_export_torch.py`` round-trips through ``python -m convert calico`` bit for bit)."""
    cfg, scfg, params = calico_pair
    want = torch_export.author_state(cfg, params, full=True)
    got = torch_export.author_state(scfg, scan.stack_layers(params, scfg), full=True)
    assert sorted(got) == sorted(want) and "model.layers.3.self_attn.q_proj.weight" in got
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    torch_export.save(tmp_path / "plain", cfg, params, full=True)
    torch_export.save(tmp_path / "scanned", scfg, scan.stack_layers(params, scfg), full=True)
    for rel in ("model-00001-of-00001.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "scanned" / rel).read_bytes() == (tmp_path / "plain" / rel).read_bytes(), rel


def test_merge_lora_on_a_stacked_tree():
    """merge_lora folds a stack's [L, in, r] @ [L, r, out] factors layer by layer, as on the per-layer tree."""
    _, scfg, _, params = llama_pair()
    got = merge_lora(scan.stack_layers(params, scfg), LLAMA.lora)
    want = scan.stack_layers(merge_lora(params, LLAMA.lora), scfg)
    assert "lora_a" not in got["model"]["scan_0_2"]["self_attn"]["q_proj"]
    assert_trees_close(got, want)
