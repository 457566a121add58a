"""Trainable/frozen split by path regexes; gradients and optimizer state for the trainable subtree only."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calico_jax.core import params as st
from calico_jax.train.step import value_and_grad_trainable

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
    q_proj = p["llm"]["layers_0"]["q_proj"]
    h = x @ (q_proj["kernel"] + q_proj["lora_a"] @ q_proj["lora_b"]) @ p["cem"]["q_proj"]["kernel"] \
        + p["cem"]["q_proj"]["bias"]
    return jnp.sum(h @ p["llm"]["lm_head"]["kernel"]) ** 2 * 1e-3 + jnp.sum(p["sam"]["mask_decoder"]["w"] ** 2) \
        + jnp.sum(p["sam"]["image_encoder"]["w"] ** 2) + jnp.sum(p["xcem"]["w"] ** 2)


def test_partition_combine_and_mask():
    p = tree()
    train, frozen = st.partition(p, PATTERNS)
    assert set(map("/".join, __import__("flax").traverse_util.flatten_dict(train))) == {
        "llm/layers_0/q_proj/lora_a", "llm/layers_0/q_proj/lora_b", "cem/q_proj/kernel", "cem/q_proj/bias",
        "sam/mask_decoder/w"}
    jax.tree.map(np.testing.assert_array_equal, st.combine(train, frozen), p)
    chosen = st.trainable_paths(p, PATTERNS)
    assert ("xcem", "w") not in chosen and ("sam", "mask_decoder", "w") in chosen
    assert st.count_params(p, PATTERNS) == (16 + 8 + 8 + 24 + 16 + 4 + 3 + 5 + 2, 8 + 8 + 16 + 4 + 3)
    assert st.unmatched_patterns(p, PATTERNS + ("cam_.*",)) == ["cam_.*"]
    with pytest.raises(ValueError, match="cam_"):
        st.partition(p, PATTERNS + ("cam_.*",), strict=True)


def test_grads_only_for_trainable_and_frozen_untouched():
    p, x = tree(), jnp.ones((2, 4))
    trainable, frozen = st.partition(p, PATTERNS)
    tx = optax.adam(1e-1)
    opt_state = tx.init(trainable)
    # Adam state (mu, nu) exists for the trainable leaves only.
    assert jax.tree.structure(opt_state[0].mu) == jax.tree.structure(trainable)
    loss, grads = value_and_grad_trainable(loss_fn)(trainable, frozen, x)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    np.testing.assert_allclose(loss, loss_fn(p, x), rtol=1e-6)
    full = jax.grad(loss_fn)(p, x)                      # reference: the same gradients for those leaves
    jax.tree.map(lambda g, f: np.testing.assert_allclose(g, f, rtol=1e-5), grads,
                 st.partition(full, PATTERNS)[0])
    updates, _ = tx.update(grads, opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new, trainable)
    assert all(jax.tree.leaves(changed))
    jax.tree.map(np.testing.assert_array_equal, st.partition(st.combine(new, frozen), PATTERNS)[1],
                 st.partition(p, PATTERNS)[1])
