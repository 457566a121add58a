"""From source keys to a calico_jax params tree: rename table + generic PyTorch -> Flax rules.

A family turns the checkpoint's keys into *canonical* keys: the PyTorch state-dict names of the
family's reference module tree (HF names for BLIP-2/DINOv2, segment-anything names for SAM), each
with a loader. The generic step then maps canonical keys onto the Flax tree, whose module names
mirror the PyTorch ones (``layers.3.fc1.weight`` -> ``layers_3/fc1/kernel``):

* ``weight`` -> ``kernel`` (Linear: transpose; Conv/ConvTranspose: (2,3,1,0) to HWIO),
  ``scale`` (LayerNorm) or ``embedding`` (nn.Embedding), whichever the Flax tree has;
* every other leaf name is copied unchanged.

All missing keys, unexpected keys and shape mismatches are collected and reported together.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

from calico_jax import models
from calico_jax.checkpoints.converted import abstract_params
from calico_jax.checkpoints.torch_files import Checkpoint, CheckpointError
from calico_jax.core.config import Config
from calico_jax.models import scan

WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A canonical tensor: the source keys it is built from and how (default: the single source as is)."""

    sources: tuple[str, ...]
    combine: Callable[..., np.ndarray] | None = None

    def load(self, ckpt: Checkpoint) -> np.ndarray:
        arrays = [ckpt.get(s) for s in self.sources]
        return self.combine(*arrays) if self.combine is not None else arrays[0]


@dataclasses.dataclass(frozen=True)
class Skip:
    """A rename-table target: drop the source key, counted under ``reason``."""

    reason: str


@dataclasses.dataclass
class Plan:
    """What a family decided for one checkpoint."""

    model: str                       # calico_jax.models registry name
    config: Config
    tensors: dict[str, Tensor]       # canonical key -> how to load it
    unexpected: list[str] = dataclasses.field(default_factory=list)   # source keys nobody claimed
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> number of keys
    notes: list[str] = dataclasses.field(default_factory=list)
    files: list = dataclasses.field(default_factory=list)  # copied into OUT/tokenizer/ (GLaMM's tokenizer)

    def module(self) -> nn.Module:
        return models.build(self.model, self.config)[0]


Rule = tuple[str, "str | Skip"]


def apply_rules(keys: Iterable[str], rules: Sequence[Rule]) -> tuple[dict[str, Tensor], list[str], dict[str, int]]:
    """Renames source keys by the first rule whose regex fully matches (``re`` replacement syntax)."""
    compiled = [(re.compile(p), r) for p, r in rules]
    tensors: dict[str, Tensor] = {}
    unexpected: list[str] = []
    skipped: dict[str, int] = {}
    for key in keys:
        for pattern, repl in compiled:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            if isinstance(repl, Skip):
                skipped[repl.reason] = skipped.get(repl.reason, 0) + 1
            else:
                tensors[m.expand(repl)] = Tensor((key,))
            break
        else:
            unexpected.append(key)
    return tensors, unexpected, skipped


def flax_path(canonical: str) -> tuple[tuple[str, ...], str]:
    """``a.layers.3.fc1.weight`` -> (("a", "layers_3", "fc1"), "weight")."""
    out: list[str] = []
    for part in canonical.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out[:-1]), out[-1]


def canonical_name(path: tuple[str, ...]) -> str:
    """Inverse of :func:`flax_path` for messages: Flax path -> PyTorch-style key."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    leaf = "weight" if path[-1] in WEIGHT_LEAVES[:3] else path[-1]
    return ".".join(parts + [leaf])


def to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _flax_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(to_flax(leaf, np.empty(shape, np.bool_)).shape) if leaf == "kernel" else shape


def _mismatch(ckpt: Checkpoint, tensor: Tensor, path: tuple[str, ...], got: tuple, want: tuple) -> str:
    src = ", ".join(f"{s} {tuple(ckpt.shape(s))}" for s in tensor.sources)
    if path[-1] == "kernel" and len(want) in (2, 4):  # state the expectation in PyTorch layout
        want_torch = want[::-1] if len(want) == 2 else (want[3], want[2], want[0], want[1])
        return f"{src}: expected {want_torch} (flax {'/'.join(path)} {want})"
    return f"{src}: expected {want} (flax {'/'.join(path)}; got {got})"


def _resolve(canonical: str, targets: dict[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    prefix, leaf = flax_path(canonical)
    for name in (WEIGHT_LEAVES if leaf == "weight" else (leaf,)):
        if prefix + (name,) in targets:
            return prefix + (name,)
    return None


def _fmt(items: list[str], limit: int = 60) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


# Stored dtype names of floating tensors: safetensors' (F32, BF16, ...) and torch's (float32, bfloat16, ...).
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "FLOAT16", "BFLOAT16", "FLOAT32", "FLOAT64", "FLOAT", "HALF", "DOUBLE"}


def build_params(ckpt: Checkpoint, plan: Plan, dtype: Any = np.float32, progress: bool = True) -> dict:
    """Loads every canonical tensor into the module's params tree, or raises one CheckpointError."""
    # converted checkpoints are stored per layer, whatever the config's scan_layers (models/scan.py)
    abstract = scan.unstack_layers(nn.unbox(abstract_params(plan.module())), plan.config)
    targets = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    resolved: dict[str, tuple[str, ...]] = {}
    unexpected = [f"{k} (not a {plan.model} parameter)" for k in plan.unexpected]
    for canonical, tensor in plan.tensors.items():
        path = _resolve(canonical, targets)
        if path is None:
            unexpected.append(f"{', '.join(tensor.sources)} (as {canonical}: no such {plan.model} parameter)")
        else:
            resolved[canonical] = path
    filled = set(resolved.values())
    missing = [f"{canonical_name(p)} (flax {'/'.join(p)}, shape {tuple(v.shape)})"
               for p, v in targets.items() if p not in filled]
    # Shapes of plain (single-source) tensors come from the file headers: every problem is found
    # before any tensor data is read, and reported in one message.
    mismatched, wrong_dtype = [], []
    for canonical, path in resolved.items():
        tensor = plan.tensors[canonical]
        if tensor.combine is None:
            got = _flax_shape(path[-1], tuple(ckpt.shape(tensor.sources[0])))
            if got != tuple(targets[path].shape):
                mismatched.append(_mismatch(ckpt, tensor, path, got, tuple(targets[path].shape)))
            stored = ckpt.dtype(tensor.sources[0])
            if np.issubdtype(targets[path].dtype, np.floating) and stored.upper() not in _FLOAT_DTYPES:
                wrong_dtype.append(f"{tensor.sources[0]} is {stored}, {'/'.join(path)} is a float parameter")
    problems = []
    if wrong_dtype:   # an integer or bool tensor where weights belong: a corrupt or mislabelled file
        problems.append(f"{len(wrong_dtype)} non-float tensor(s):{_fmt(wrong_dtype)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s):{_fmt(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s):{_fmt(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):{_fmt(mismatched)}")
    if problems:
        raise CheckpointError(f"{ckpt.path}: checkpoint does not match the {plan.model} config:\n  "
                              + "\n  ".join(problems))
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for canonical, path in tqdm(resolved.items(), desc="converting", unit="tensor", disable=not progress):
        tensor = plan.tensors[canonical]
        value = to_flax(path[-1], tensor.load(ckpt))
        want = tuple(targets[path].shape)
        if value.shape != want:
            mismatched.append(_mismatch(ckpt, tensor, path, tuple(value.shape), want))
            continue
        flat[path] = np.asarray(value, dtype=dtype if np.issubdtype(targets[path].dtype, np.floating) else None)
    if mismatched:
        raise CheckpointError(f"{ckpt.path}: {len(mismatched)} shape mismatch(es):{_fmt(mismatched)}")
    return _unflatten(flat)


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree
