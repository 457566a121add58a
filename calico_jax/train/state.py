"""Trainable/frozen split of a params tree by path regexes (big_vision style) and the optimizer around it.

A leaf is trainable iff its '/'-joined path (``llm/model/layers_3/self_attn/q_proj/lora_a``) fully
matches one of the patterns declared in the config (``CalicoConfig.trainable``). Two equivalent ways
to train only those leaves:

* :class:`TrainState` keeps the trainable and frozen leaves in two trees; the loss is differentiated
  with respect to the trainable tree only (:func:`value_and_grad_trainable`), so no gradient is ever
  computed for a frozen leaf, and the optimizer state exists for trainable leaves only.
* :func:`masked_optimizer` wraps a transformation for the full tree with ``optax.multi_transform``:
  frozen leaves get ``set_to_zero`` (no state, zero update).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def _flat(params: Any) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(flax.core.unfreeze(nn.unbox(params)))


def trainable_paths(params: Any, patterns: Sequence[str]) -> set[tuple[str, ...]]:
    compiled = [re.compile(p) for p in patterns]
    return {path for path in _flat(params) if any(c.fullmatch("/".join(path)) for c in compiled)}


def unmatched_patterns(params: Any, patterns: Sequence[str]) -> list[str]:
    """Patterns that select no leaf (usually a typo, or a module an ablation removed)."""
    names = ["/".join(p) for p in _flat(params)]
    return [p for p in patterns if not any(re.fullmatch(p, n) for n in names)]


def trainable_mask(params: Any, patterns: Sequence[str]) -> Any:
    """Same-structure tree of bools (True = trainable)."""
    chosen = trainable_paths(params, patterns)
    return traverse_util.unflatten_dict({k: k in chosen for k in _flat(params)})


def partition(params: Any, patterns: Sequence[str], strict: bool = False) -> tuple[dict, dict]:
    """-> (trainable, frozen): two nested dicts, each holding only its own leaves."""
    if strict:
        missing = unmatched_patterns(params, patterns)
        if missing:
            raise ValueError(f"trainable patterns match no parameter: {missing}")
    flat = _flat(params)
    chosen = trainable_paths(params, patterns)
    train = {k: v for k, v in flat.items() if k in chosen}
    frozen = {k: v for k, v in flat.items() if k not in chosen}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
    """Inverse of :func:`partition`."""
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def count_params(params: Any, patterns: Sequence[str] = ()) -> tuple[int, int]:
    """(total, trainable) element counts (works on ShapeDtypeStructs too)."""
    flat = _flat(params)
    chosen = trainable_paths(params, patterns)
    size = lambda x: int(jnp.size(x)) if not hasattr(x, "size") else int(x.size)  # noqa: E731
    return sum(size(v) for v in flat.values()), sum(size(v) for k, v in flat.items() if k in chosen)


def value_and_grad_trainable(loss_fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """``loss_fn(params, *args)`` -> ``f(trainable, frozen, *args) = (value, grads w.r.t. trainable)``."""
    def wrapped(trainable, frozen, *args, **kwargs):
        return loss_fn(combine(trainable, frozen), *args, **kwargs)
    return jax.value_and_grad(wrapped, has_aux=has_aux)


def masked_optimizer(tx: optax.GradientTransformation, params: Any,
                     patterns: Sequence[str]) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, ``set_to_zero`` (stateless) on the frozen ones, for the full tree."""
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask(params, patterns))
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict
    frozen: dict
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, patterns: Sequence[str],
               strict: bool = False) -> "TrainState":
        trainable, frozen = partition(params, patterns, strict)
        return cls(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable), tx)

    @property
    def params(self) -> dict:
        return combine(self.trainable, self.frozen)

    def apply_gradients(self, grads: dict) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.trainable)
        return self.replace(step=self.step + 1, trainable=optax.apply_updates(self.trainable, updates),
                            opt_state=opt_state)
