"""Scanned layer stacks: one traced layer looped by ``nn.scan`` instead of N unrolled copies (MaxText style).

A tower whose config sets ``scan_layers=True`` runs its identical layers as ``nn.scan`` over a parameter tree
whose leaves carry a leading layer axis (logical name ``"layers"``, replicated by the rules table in
:mod:`calico_jax.parallel.sharding`). XLA then compiles one layer body per segment instead of every layer:
compile time stops growing with depth. The tower's remat policy is applied inside the scanned body
(``nn.remat`` inside ``nn.scan``).

Segments: a stack is cut into segments ``[start, stop)`` where something must happen between layers (the LLaMA
decoder's hooks -- CALICO's CAMs -- sit before layers 11 and 22, so its 32 layers run as three scans 0-11, 11-22,
22-32). Segment ``[a, b)`` is the submodule ``scan_{a}_{b}`` next to where the per-layer modules would be.

Parameter layout ("per-layer storage, stacked at load"): everything stored outside a live training run keeps
the per-layer names (``layers_0``, ``layers_1``, ...): converted checkpoints, the golden per-layer trees and the
PyTorch export. :func:`stack_layers` / :func:`unstack_layers` map a per-layer params tree to the scanned one and
back for a given config; the load boundary (:mod:`calico_jax.checkpoints.converted`) and the export
(:mod:`calico_jax.checkpoints.torch_export`) call them, so a checkpoint converted or exported before a tower was
scanned still loads with scanning on. Both are exact (stacking copies values, nothing is recomputed), and both
are no-ops on a tree already in the target layout, so calling them twice is harmless. Which subtrees are stacks
is declared by each config's ``scan_stacks()`` (a list of :class:`Stack`); a config without that method has
none.

A training checkpoint written with scanning on holds the stacked tree (it is the live params tree).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from calico_jax.models import layers

LAYER_AXIS = "layers"          # logical name of the stacked leading axis
SCAN_PREFIX = "scan_"          # segment [a, b) is the submodule scan_{a}_{b}
_SEGMENT = re.compile(r"scan_(\d+)_(\d+)")


class Stack(NamedTuple):
    """One layer stack of a params tree: the dict at ``path`` holds ``{prefix}{i}`` per layer (i < ``num_layers``)
    or ``scan_{a}_{b}`` per segment of ``splits`` (layer indices where a new segment starts, besides 0)."""

    path: tuple[str, ...]
    prefix: str
    num_layers: int
    splits: tuple[int, ...] = ()

    def segments(self) -> tuple[tuple[int, int], ...]:
        return segments(self.num_layers, self.splits)


def segments(num_layers: int, splits: Sequence[int] = ()) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` of each scanned segment: cut at every split inside (0, num_layers)."""
    bounds = sorted({0, num_layers} | {int(s) for s in splits if 0 < s < num_layers})
    return tuple(zip(bounds[:-1], bounds[1:], strict=True))


def segment_name(start: int, stop: int) -> str:
    return f"{SCAN_PREFIX}{start}_{stop}"


def scanned(block: type[nn.Module], *, length: int, remat: str, in_axes: tuple[Any, ...],
            static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """``block`` (``__call__(carry, *xs) -> (carry, ys)``) under the remat policy ``remat`` and ``nn.scan`` over
    ``length`` layers. ``in_axes``: one entry per argument after the carry (0 = per-layer slice, ``nn.broadcast`` =
    the same for every layer); ``static_argnums`` as :func:`~calico_jax.models.layers.remat_block` (``self`` = 0).

    Params and the dropout RNG are split per layer; a fresh init draws each layer's params from its own key (the
    values differ from an unrolled init; load per-layer params through :func:`stack_layers` to compare)."""
    if remat not in layers.REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r} for {block.__name__} unknown; known: {sorted(layers.REMAT_POLICIES)}")
    if remat != "none":
        # prevent_cse is not needed inside a scan (the loop already keeps XLA from merging the recomputation)
        # and costs extra optimisation barriers.
        block = nn.remat(block, policy=layers.REMAT_POLICIES[remat], static_argnums=static_argnums,
                         prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: LAYER_AXIS})


# ----------------------------------------------------------------------------- per-layer <-> stacked trees
def _stack_of(config: Any) -> list[Stack]:
    fn: Callable[[], list[Stack]] | None = getattr(config, "scan_stacks", None)
    return [] if fn is None else list(fn())


def _node(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any] | None:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree if isinstance(tree, Mapping) else None


def _replace(tree: Mapping[str, Any], path: tuple[str, ...], node: dict[str, Any]) -> dict[str, Any]:
    if not path:
        return node
    out = dict(tree)
    out[path[0]] = _replace(tree[path[0]], path[1:], node)
    return out


def _stack_leaves(*leaves: Any) -> Any:
    if isinstance(leaves[0], nn.Partitioned):      # boxed (abstract) params: add the layer axis name
        value = _stack_leaves(*(leaf.value for leaf in leaves))
        return leaves[0].replace(value=value, names=(LAYER_AXIS, *leaves[0].names))
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype,
                                    sharding=_layer_sharding(leaves[0].sharding, add=True))
    if isinstance(leaves[0], np.ndarray):
        return np.stack(leaves)
    return jax.numpy.stack(leaves)


def _take(leaf: Any, i: int) -> Any:
    if isinstance(leaf, nn.Partitioned):
        if not leaf.names or leaf.names[0] != LAYER_AXIS:
            raise ValueError(f"a stacked leaf has logical names {leaf.names}, expected {LAYER_AXIS!r} first")
        return leaf.replace(value=_take(leaf.value, i), names=tuple(leaf.names[1:]))
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=_layer_sharding(leaf.sharding, add=False))
    return leaf[i]


def _layer_sharding(sharding: Any, add: bool) -> Any:
    """A NamedSharding with the (replicated) layer axis added in front or dropped; other shardings as they are."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None, *spec) if add else spec[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def stack_layers(params: Any, config: Any) -> Any:
    """Per-layer tree -> the layout ``config`` runs (segments stacked for each scanned tower; towers without
    ``scan_layers`` untouched). Leaves may be arrays, ShapeDtypeStructs or boxed ``nn.Partitioned``. A stack
    already in scanned form is left as it is; a stack missing from ``params`` (a switched-off tower) is skipped."""
    for stack in _stack_of(config):
        node = _node(params, stack.path)
        if node is None or any(_SEGMENT.fullmatch(k) for k in node):
            continue
        names = [f"{stack.prefix}{i}" for i in range(stack.num_layers)]
        missing = [n for n in names if n not in node]
        if missing:
            raise ValueError(f"stack_layers: {'/'.join(stack.path)} lacks {missing[:4]} (expected "
                             f"{stack.num_layers} layers named {stack.prefix}N)")
        new = {k: v for k, v in node.items() if k not in names}
        for start, stop in stack.segments():
            new[segment_name(start, stop)] = jax.tree.map(_stack_leaves, *(node[n] for n in names[start:stop]),
                                                          is_leaf=_is_leaf)
        params = _replace(params, stack.path, new)
    return params


def unstack_layers(params: Any, config: Any) -> Any:
    """The inverse of :func:`stack_layers`: scanned segments -> ``{prefix}{i}`` per layer (a per-layer tree is
    returned as it is)."""
    for stack in _stack_of(config):
        node = _node(params, stack.path)
        if node is None or not any(_SEGMENT.fullmatch(k) for k in node):
            continue
        want = {segment_name(a, b) for a, b in stack.segments()}
        have = {k for k in node if _SEGMENT.fullmatch(k)}
        if have != want:
            raise ValueError(f"unstack_layers: {'/'.join(stack.path)} has segments {sorted(have)}, the config "
                             f"expects {sorted(want)}")
        new = {k: v for k, v in node.items() if k not in want}
        for start, stop in stack.segments():
            seg = node[segment_name(start, stop)]
            for i in range(stop - start):
                new[f"{stack.prefix}{start + i}"] = jax.tree.map(lambda leaf, i=i: _take(leaf, i), seg,
                                                                 is_leaf=_is_leaf)
        params = _replace(params, stack.path, new)
    return params

