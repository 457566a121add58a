"""Mesh and the one logical-axis rules table.

Every parameter carries logical axis names (see :mod:`calico_jax.models.layers`); this table maps them to the
mesh axes ``data``, ``fsdp`` and ``tensor``. The mesh is built with ``AxisType.Auto`` axes: jax 0.10
defaults to Explicit, under which Linen's logical constraints and sharded contracting dims fail.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes); None = replicated. FSDP shards the model width, tensor
# parallelism the attention heads, MLP hidden units and vocabulary rows.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("norm", None),
    ("conv_in", None),
    ("layers", None),      # the leading axis of a scanned layer stack (models/scan.py): every device holds all layers
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A mesh over ``MESH_AXES``; one size may be -1 (fill with the remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes {shape}")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                             axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_specs(boxed_params: Any, rules: Sequence[tuple[str, Any]] = RULES) -> Any:
    """PartitionSpec tree for a boxed (``nn.Partitioned``) params tree."""
    return nn.logical_to_mesh(nn.get_partition_spec(boxed_params), rules)


def param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]] = RULES) -> Any:
    """NamedSharding tree for a boxed params tree (e.g. from ``pretrained.abstract_params``)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), logical_specs(boxed_params, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def fit_shardings(abstract: Any, shardings: Any) -> Any:
    """Drops the mesh axes of a dimension they do not divide (e.g. a 32007-row vocabulary on ``tensor`` 2): that
    dimension is replicated instead of failing to compile. Training and inference place weights with this."""
    def fit(a, sh):
        spec = list(sh.spec) + [None] * (len(a.shape) - len(sh.spec))
        for i, axes in enumerate(spec):
            names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            if names and a.shape[i] % math.prod(sh.mesh.shape[n] for n in names):
                spec[i] = None
        return NamedSharding(sh.mesh, PartitionSpec(*spec))
    return jax.tree.map(fit, abstract, shardings)
