"""Trainable/frozen split of a params tree by path regexes (big_vision style).

A leaf is trainable iff its '/'-joined path (``llm/model/layers_3/self_attn/q_proj/lora_a``) fully matches one
of the patterns of the training recipe (``RecipeConfig.trainable``). Training keeps the two parts in separate trees
and differentiates the trainable one only (:func:`calico_jax.train.step.value_and_grad_trainable`), so no
gradient or optimizer state exists for a frozen leaf; checkpoints hold the trainable tree, and restoring puts it
back over the frozen one (:func:`combine`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp
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
