"""Converted-checkpoint directories: ``config.json`` + an orbax checkpoint of the params.

Layout of a directory written by :func:`save` (and by ``python -m convert``)::

    OUT/config.json   {"format": "calico_jax", "format_version": 1, "model": NAME,
                       "config": {...}, "dtype": "float32", "source": {...}}
    OUT/params/       orbax StandardCheckpointer tree of the (unboxed) params

Writes are atomic: everything goes to a hidden sibling directory that is renamed onto OUT at the end,
so an interrupted or failed write never leaves a partial OUT.
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
    params = jax.tree.map(jnp.asarray, nn.unbox(params))
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
    expected = nn.unbox(abstract_params(module))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:10]
        raise ValueError(f"{path}: params do not match the {meta['model']} config; first differences: {diff}")
    return module, params, config
