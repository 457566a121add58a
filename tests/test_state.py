"""Trainable/frozen split by path regexes, gradients for the trainable subtree only, optimizer state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calico_jax.train import state as st

PATTERNS = (r"llm/.*/lora_(a|b)", r"cem/.*", r"sam/mask_decoder/.*")


def tree():
    r = np.random.default_rng(0)
    a = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    return {"llm": {"layers_0": {"q_proj": {"kernel": a(4, 4), "lora_a": a(4, 2), "lora_b": a(2, 4)}},
                    "lm_head": {"kernel": a(4, 6)}},
            "cem": {"q_proj": {"kernel": a(4, 4), "bias": a(4)}},
            "sam": {"mask_decoder": {"w": a(3)}, "image_encoder": {"w": a(5)}},
            "xcem": {"w": a(2)}}                 # 'cem/.*' is a full match: not selected


def loss_fn(p, x):
    l = p["llm"]["layers_0"]["q_proj"]
    h = x @ (l["kernel"] + l["lora_a"] @ l["lora_b"]) @ p["cem"]["q_proj"]["kernel"] + p["cem"]["q_proj"]["bias"]
    return jnp.sum(h @ p["llm"]["lm_head"]["kernel"]) ** 2 * 1e-3 + jnp.sum(p["sam"]["mask_decoder"]["w"] ** 2) \
        + jnp.sum(p["sam"]["image_encoder"]["w"] ** 2) + jnp.sum(p["xcem"]["w"] ** 2)


def test_partition_combine_and_mask():
    p = tree()
    train, frozen = st.partition(p, PATTERNS)
    assert set(map("/".join, __import__("flax").traverse_util.flatten_dict(train))) == {
        "llm/layers_0/q_proj/lora_a", "llm/layers_0/q_proj/lora_b", "cem/q_proj/kernel", "cem/q_proj/bias",
        "sam/mask_decoder/w"}
    jax.tree.map(np.testing.assert_array_equal, st.combine(train, frozen), p)
    mask = st.trainable_mask(p, PATTERNS)
    assert mask["xcem"]["w"] is False and mask["sam"]["mask_decoder"]["w"] is True
    assert st.count_params(p, PATTERNS) == (16 + 8 + 8 + 24 + 16 + 4 + 3 + 5 + 2, 8 + 8 + 16 + 4 + 3)
    assert st.unmatched_patterns(p, PATTERNS + ("cam_.*",)) == ["cam_.*"]
    with pytest.raises(ValueError, match="cam_"):
        st.partition(p, PATTERNS + ("cam_.*",), strict=True)


def test_grads_only_for_trainable_and_frozen_untouched():
    p, x = tree(), jnp.ones((2, 4))
    state = st.TrainState.create(p, optax.adam(1e-1), PATTERNS)
    # Adam state (mu, nu) exists for the trainable leaves only.
    mu = state.opt_state[0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(state.trainable)
    vg = st.value_and_grad_trainable(loss_fn)
    loss, grads = vg(state.trainable, state.frozen, x)
    assert jax.tree.structure(grads) == jax.tree.structure(state.trainable)
    np.testing.assert_allclose(loss, loss_fn(p, x), rtol=1e-6)
    full = jax.grad(loss_fn)(p, x)                      # reference: the same gradients for those leaves
    jax.tree.map(lambda g, f: np.testing.assert_allclose(g, f, rtol=1e-5), grads,
                 st.partition(full, PATTERNS)[0])
    new = jax.jit(lambda s, g: s.apply_gradients(g))(state, grads)
    assert int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new.frozen, state.frozen)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new.trainable, state.trainable)
    assert all(jax.tree.leaves(changed))
    jax.tree.map(np.testing.assert_array_equal, st.partition(new.params, PATTERNS)[1], st.partition(p, PATTERNS)[1])


def test_masked_optimizer_on_full_tree():
    p, x = tree(), jnp.ones((2, 4))
    tx = st.masked_optimizer(optax.adamw(1e-1, weight_decay=0.1), p, PATTERNS)
    opt = tx.init(p)
    n_state = sum(x.size for x in jax.tree.leaves(opt) if x.ndim > 0)
    assert n_state == 2 * st.count_params(p, PATTERNS)[1]          # mu + nu for trainable leaves only
    updates, opt = tx.update(jax.grad(loss_fn)(p, x), opt, p)
    new = optax.apply_updates(p, updates)
    _, frozen = st.partition(new, PATTERNS)
    jax.tree.map(np.testing.assert_array_equal, frozen, st.partition(p, PATTERNS)[1])
    assert np.any(np.asarray(new["cem"]["q_proj"]["kernel"]) != np.asarray(p["cem"]["q_proj"]["kernel"]))
