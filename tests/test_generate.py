"""Generation: jit prefill + while_loop decode vs a naive full-forward argmax loop, padding sides,
stop tokens, hidden states at generated positions, seeded top-p sampling, one compile per bucket,
and decode() inside a caller's jit with a hook that closes over traced values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calico_jax.checkpoints.converted import init_params
from calico_jax.inference.generate import decode, decode_jit, generate, sample_logits
from calico_jax.models.llama import LlamaConfig, LlamaForCausalLM

N = 6


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_ids=(2,))
    module = LlamaForCausalLM(cfg)
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, init_params(module, seed=7))
    return module, params


def naive_greedy(module, params, ids, n):
    """Recompute the full forward for every token (no cache), argmax, record the predicting hidden."""
    ids = list(ids)
    toks, hid = [], []
    for _ in range(n):
        out = module.apply({"params": params}, jnp.asarray([ids], jnp.int32))
        toks.append(int(jnp.argmax(out.logits[0, -1])))
        hid.append(np.asarray(out.hidden_states[0, -1]))
        ids.append(toks[-1])
    return toks, np.stack(hid)


def test_greedy_matches_naive_loop_with_padding(tiny):
    module, params = tiny
    prompts = [[1, 5, 9, 13, 17, 21, 25], [1, 30, 31]]
    ids = np.zeros((2, 7), np.int64)
    mask = np.zeros((2, 7), np.int64)
    for r, p in enumerate(prompts):  # right padding on input: generate left-aligns it
        ids[r, :len(p)], mask[r, :len(p)] = p, 1
    out = generate(module, params, ids, mask, max_new_tokens=N, stop_token_ids=(), return_hidden=True, bucket=8)
    for r, p in enumerate(prompts):
        toks, hid = naive_greedy(module, params, p, N)
        assert np.asarray(out.tokens[r]).tolist() == toks
        np.testing.assert_allclose(np.asarray(out.hidden_states[r]), hid, atol=2e-5)
    assert np.asarray(out.lengths).tolist() == [N, N]


def test_stop_tokens_pad_and_lengths(tiny):
    module, params = tiny
    ids = np.array([[1, 5, 9, 13], [1, 30, 31, 32]])
    free = np.asarray(generate(module, params, ids, max_new_tokens=N, stop_token_ids=()).tokens)
    stop = int(free[0, 2])
    assert stop not in free[0, :2].tolist(), "pick a prompt whose 3rd token is new"
    out = generate(module, params, ids, max_new_tokens=N, stop_token_ids=(stop,), pad_token_id=63)
    toks = np.asarray(out.tokens)
    assert toks[0].tolist() == free[0, :3].tolist() + [63] * (N - 3)
    n1 = next((i + 1 for i, t in enumerate(free[1]) if t == stop), N)
    assert toks[1, :n1].tolist() == free[1, :n1].tolist()
    assert np.asarray(out.lengths).tolist() == [3, n1]


def test_sampling_seeded_and_top_p():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 3, jnp.float32)
    k = jax.random.key(1)
    a = sample_logits(logits, k, 1.0, 0.9)
    np.testing.assert_array_equal(a, sample_logits(logits, k, 1.0, 0.9))
    # top_p -> 0 keeps only the most likely token: sampling equals greedy.
    np.testing.assert_array_equal(sample_logits(logits, k, 1.0, 1e-6), jnp.argmax(logits, -1))
    # top-p support: over many keys every sampled token lies in the nucleus.
    draws = np.stack([np.asarray(sample_logits(logits, jax.random.key(s), 0.7, 0.5)) for s in range(200)])
    probs = np.asarray(jax.nn.softmax(logits / 0.7))
    for r in range(4):
        order = np.argsort(-probs[r])
        nucleus = set(order[:np.searchsorted(np.cumsum(probs[r][order]), 0.5) + 1].tolist())
        assert set(draws[:, r].tolist()) <= nucleus
        assert len(set(draws[:, r].tolist())) > 1 or len(nucleus) == 1


def test_sampled_generation_is_seeded(tiny):
    module, params = tiny
    ids = np.array([[1, 5, 9, 13]])
    kw = dict(max_new_tokens=8, stop_token_ids=(), temperature=1.5, top_p=0.95)
    a = np.asarray(generate(module, params, ids, seed=3, **kw).tokens)
    np.testing.assert_array_equal(a, np.asarray(generate(module, params, ids, seed=3, **kw).tokens))
    others = [np.asarray(generate(module, params, ids, seed=s, **kw).tokens) for s in (4, 5, 6)]
    assert any((o != a).any() for o in others)


def test_one_compile_per_bucket(tiny):
    module, params = tiny
    before = decode_jit._cache_size()
    for length in (3, 5, 11):  # all in the 16 bucket
        generate(module, params, np.arange(1, length + 1)[None], max_new_tokens=4, bucket=16)
    assert decode_jit._cache_size() == before + 1


def test_decode_inside_jit_with_traced_hook(tiny):
    module, params = tiny
    ids = jnp.asarray([[1, 5, 9, 13, 17]], jnp.int32)

    @jax.jit
    def run(delta):
        hook = lambda h, last: h.at[jnp.arange(h.shape[0]), last].add(delta)  # noqa: E731
        return decode(module, params, ids, max_new_tokens=4, hooks={1: hook}).tokens

    base = generate(module, params, np.asarray(ids), max_new_tokens=4, stop_token_ids=()).tokens
    np.testing.assert_array_equal(run(jnp.zeros(32)), base)
    assert run(jnp.full(32, 5.0)).shape == (1, 4)
