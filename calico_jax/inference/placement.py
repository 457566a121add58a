"""Where the predictor's weights and batches live: a mesh of this process's devices, weights placed by the training
logical-axis rules (:mod:`calico_jax.parallel.sharding`), batch rows split over ``data`` x ``fsdp``.

Inference never needs a device of another process: in a job of several processes (``python -m calico_jax.launch``)
each one predicts its own block of samples on a mesh of its *local* devices, so ``--mesh`` describes one process.
A mesh axis that does not divide a weight's dimension leaves that dimension replicated (as training does), except
``tensor`` on the LLM's attention heads: a tensor axis that does not divide them is refused up front.

Also here: the persistent compilation cache the commands turn on, so a second call does not recompile.
"""
from __future__ import annotations

import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from calico_jax.checkpoints import converted as pretrained
from calico_jax.checkpoints.workdir import cast_frozen
from calico_jax.parallel.sharding import MESH_AXES, RULES, fit_shardings, make_mesh, param_shardings

DTYPES = ("float32", "bfloat16", "float16")


class PlacementError(ValueError):
    """A mesh or dtype the devices or the model cannot take; the message names the value."""


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """``--mesh '{"data": 4, "tensor": 2}'`` -> the axis sizes (None: no mesh, one device)."""
    if text is None or text == "":
        return None
    try:
        shape = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlacementError(f"--mesh {text!r}: not JSON ({e.msg}); e.g. '{{\"data\": 4, \"tensor\": 2}}'") from None
    if not isinstance(shape, dict) or not shape:
        raise PlacementError(f"--mesh {text!r}: expected an object of axis sizes, e.g. '{{\"data\": 4}}'")
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise PlacementError(f"--mesh {text!r}: unknown axis {unknown}; axes are {list(MESH_AXES)}")
    bad = {k: v for k, v in shape.items() if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1)}
    if bad:
        raise PlacementError(f"--mesh {text!r}: axis sizes must be integers >= 1 (or one -1), got {bad}")
    return shape


def parse_dtype(text: str | None) -> str | None:
    if text is None or text == "":
        return None
    if text not in DTYPES:
        raise PlacementError(f"--dtype {text!r}: expected one of {list(DTYPES)}")
    return text


def local_mesh(shape: dict[str, int], config) -> jax.sharding.Mesh:
    """A mesh over this process's devices (the first k of them when its k devices divide their number), checked
    against them and against the LLM's heads."""
    devices = jax.local_devices()
    k = math.prod(shape.values())
    if k > 0 and len(devices) % k == 0:   # no -1 axis
        devices = devices[:k]
    try:
        mesh = make_mesh(shape, devices)
    except ValueError as e:
        raise PlacementError(f"--mesh {json.dumps(shape)}: does not fit the {len(devices)} devices of this process "
                             f"({e})") from None
    tensor, llm = mesh.shape["tensor"], config.llm
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(llm, name)
        if heads % tensor:
            raise PlacementError(f"--mesh {json.dumps(shape)}: tensor axis {tensor} does not divide the LLM's "
                                 f"{name}={heads}")
    return mesh


def rows_multiple(mesh: jax.sharding.Mesh | None) -> int:
    """Batch rows must be a multiple of this (the devices the rows are split over)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def weight_shardings(module, mesh: jax.sharding.Mesh) -> Any:
    """NamedSharding tree of ``module``'s params by the logical-axis rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        boxed = pretrained.abstract_params(module)
    return fit_shardings(nn.unbox(boxed), param_shardings(boxed, mesh))


def cast(params: Any, dtype: str | None) -> Any:
    """Floating leaves to ``dtype`` (None: as stored); integer leaves unchanged."""
    return params if dtype is None else cast_frozen(params, dtype)


def place(module, params: Any, mesh: jax.sharding.Mesh | None, dtype: str | None) -> Any:
    """The params cast to ``dtype`` and put on the mesh (or the default device without one)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, cast(params, dtype))
    shardings = weight_shardings(module, mesh)
    return jax.device_put(cast(jax.tree.map(np.asarray, params), dtype), shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows (the leading axis of every batch field) over ``data`` x ``fsdp``, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def put_batch(inputs, mesh: jax.sharding.Mesh | None):
    """A numpy :class:`~calico_jax.models.inputs.CalicoInputs` on the devices (rows split over the mesh)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, inputs)
    return jax.device_put(inputs, batch_sharding(mesh))


class MeshContext:
    """The mesh and the rules table active while a program traces (the model's activation constraints read them);
    a no-op without a mesh."""

    def __init__(self, mesh: jax.sharding.Mesh | None):
        self.mesh, self.stack = mesh, []

    def __enter__(self):
        if self.mesh is not None:
            for cm in (jax.set_mesh(self.mesh), nn.logical_axis_rules(RULES)):
                cm.__enter__()
                self.stack.append(cm)
        return self

    def __exit__(self, *exc):
        while self.stack:
            self.stack.pop().__exit__(*exc)


