"""Converted-checkpoint directories: ``config.json`` + an orbax checkpoint of the params.

Layout of a directory written by :func:`save` (and by ``python -m convert``)::

    OUT/config.json   {"format": "calico_jax", "format_version": 1, "model": NAME,
                       "config": {...}, "dtype": "float32", "source": {...}}
    OUT/params/       orbax StandardCheckpointer tree of the (unboxed) params

Writes are atomic: everything goes to a hidden sibling directory that is renamed onto OUT at the end,
so an interrupted or failed write never leaves a partial OUT.

``params/`` always holds the per-layer tree (``layers_0``, ``layers_1``, ...), whatever the config's
``scan_layers`` switches say: :func:`write` unstacks a scanned tree, :func:`load` and :func:`restore_params`
stack it again for a scanned config (:mod:`calico_jax.models.scan`). A directory written before scanning existed
therefore loads with scanning on.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calico_jax import models
from calico_jax.core.fs import atomic_directory
from calico_jax.models import scan

FORMAT = "calico_jax"
FORMAT_VERSION = 1


def abstract_params(module: nn.Module) -> Any:
    """Shape/dtype tree (boxed with logical axis names) of ``module``'s params, without allocating them."""
    variables = jax.eval_shape(lambda k: models.init_variables(module, k), jax.random.key(0))
    return variables["params"]


def init_params(module: nn.Module, seed: int = 0) -> Any:
    """Random, unboxed params (used by tests and demos)."""
    return nn.unbox(models.init_variables(module, jax.random.key(seed))["params"])


def write(directory: str | os.PathLike, model: str, config: Any, params: Any, *, dtype: str = "float32",
          source: Mapping[str, Any] | None = None) -> None:
    """Writes config.json and params/ into an existing (empty) directory; see :func:`save`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model,
            "config": config.to_dict(), "dtype": dtype, "source": dict(source or {})}
    params = jax.tree.map(jnp.asarray, scan.unstack_layers(nn.unbox(params), config))
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params)
        ckptr.wait_until_finished()


def save(out: str | os.PathLike, model: str, config: Any, params: Any, *, dtype: str = "float32",
         source: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Atomically writes ``params`` and the model's config to ``out``."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write(tmp, model, config, params, dtype=dtype, source=source)
    return Path(out)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} is not a calico_jax checkpoint: {cfg} is missing")
    meta = json.loads(cfg.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg}: not a calico_jax checkpoint (format={meta.get('format')!r})")
    return meta


def load(path: str | os.PathLike) -> tuple[nn.Module, Any, Any]:
    """Loads a converted checkpoint: returns ``(module, params, config)``.

    ``module.apply({"params": params}, ...)`` runs it; the params tree is checked against the
    module's own abstract params, so a checkpoint for another config fails loudly.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_meta(path)
    module, config = models.build(meta["model"], meta["config"])
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params")
    return module, checked_params(path, meta["model"], module, config, params), config


def checked_params(path: Path, model: str, module: nn.Module, config: Any, params: Any) -> Any:
    """Restored (per-layer) ``params`` checked against ``module``'s own abstract params, in the layout ``config``
    runs (scanned stacks stacked); a checkpoint for another config is a ValueError naming the first differences."""
    expected = scan.unstack_layers(nn.unbox(abstract_params(module)), config)   # the stored (per-layer) layout
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:10]
        raise ValueError(f"{path}: params do not match the {model} config; first differences: {diff}")
    return scan.stack_layers(params, config)


def restore_params(path: str | os.PathLike, target: Any, config: Any) -> Any:
    """The params of a converted directory (``PATH/params``) restored onto ``target`` (a ShapeDtypeStruct tree in
    the layout ``config`` runs, e.g. a training run's abstract params, shardings included) and returned in that
    layout: a scanned config's stacks are read per layer and stacked here."""
    import orbax.checkpoint as ocp

    stored = scan.unstack_layers(target, config)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(Path(path).absolute() / "params", stored)
    params = scan.stack_layers(params, config)
    # the stacked arrays land where jnp.stack put them; move them to the target's shardings where it has some
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding) if getattr(t, "sharding", None) is not None
                        else x, params, target)
