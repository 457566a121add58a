"""The full parameters of a training workdir, outside training (no optimizer, mesh or training code).

Training (:mod:`calico_jax.checkpoints.training`) writes one orbax step directory per checkpoint::

    WORKDIR/checkpoints/<step>/state/      trainable params, optimizer state, step, RNG key data, skipped count
    WORKDIR/checkpoints/<step>/data_iter/  the grain iterator state
    WORKDIR/checkpoints/<step>/meta/       JSON (:func:`restore_meta` below)

The frozen weights are not in it: ``meta["frozen_source"]`` names where they come from (a converted base
checkpoint, or the seed of the random init), and ``meta["model"]`` holds the registry name, the resolved
model config, the trainable patterns, the frozen weights' storage dtype and the tokenizer directory.
:func:`restore_workdir` rebuilds the full parameter tree from exactly that -- the trainable leaves of the
newest step over the frozen ones -- without an optimizer, a mesh or any training code, which is what
export, prediction and evaluation need.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax import models
from calico_jax.checkpoints import converted
from calico_jax.core.params import combine, partition

STATE, META, DATA_ITER = "state", "meta", "data_iter"   # items of a training step directory


# ------------------------------------------------------------------------------------ initialisation
def init_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(parameter-init key, training-RNG key) of a run with this seed: the frozen weights of a random-init run
    are re-created from the first."""
    return tuple(jax.random.split(jax.random.key(seed)))


def cast_frozen(tree: Any, dtype: Any) -> Any:
    """Floating leaves to the frozen weights' storage dtype (integers untouched)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def load_base_params(base: str | os.PathLike, target: Any, config: Any) -> Any:
    """Every weight of a converted checkpoint (``BASE/params``, stored per layer) restored onto ``target``
    (ShapeDtypeStructs, optionally with shardings) in the layout ``config`` runs (its scanned stacks stacked)."""
    return converted.restore_params(base, target, config)


# ------------------------------------------------------------------------------------ training workdirs
@dataclasses.dataclass
class WorkdirModel:
    """What :func:`restore_workdir` returns."""
    module: nn.Module
    params: Any                    # full tree: trainable (newest step) over frozen (their source)
    config: Any                    # the model config the run trained (vocabulary and [SEG] id resolved)
    tokenizer_dir: Path
    step: int


def checkpoint_directory(workdir: str | os.PathLike) -> Path:
    """``checkpoint.directory`` of the run's ``config.json``, else ``WORKDIR/checkpoints``."""
    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir: {cfg_path} is missing")
    directory = json.loads(cfg_path.read_text()).get("checkpoint", {}).get("directory", "")
    return (Path(directory) if directory else workdir / "checkpoints").absolute()   # orbax wants absolute paths


def restore_meta(step_dir: Path) -> dict:
    meta_file = step_dir / META / "metadata"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{step_dir}: no {META}/metadata (not a calico_jax training checkpoint)")
    return json.loads(meta_file.read_text())


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / STATE).is_dir()) \
        if directory.is_dir() else []


def _restore_trainable(step_dir: Path, target: Any) -> Any:
    """The ``params`` subtree of a step's state (optimizer state is left on disk), on the first device."""
    import orbax.checkpoint as ocp
    from etils import epath
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(epath.Path(step_dir / STATE), args=ocp.args.PyTreeRestore(
            {"params": target}, restore_args={"params": args}, partial_restore=True))
    return out["params"]


def restore_workdir(workdir: str | os.PathLike, step: int | None = None) -> WorkdirModel:
    """Full params of a training run's newest restorable checkpoint (or of ``step``). A step that fails to
    restore is skipped with a warning (and named), as training does."""
    directory = checkpoint_directory(workdir)
    steps = [step] if step is not None else list(reversed(_steps(directory)))
    if not steps:
        raise FileNotFoundError(f"{workdir}: no restorable training checkpoint under {directory}")
    errors = []
    for s in steps:
        try:
            return _restore_step(directory / str(s), s)
        except (OSError, ValueError, KeyError) as e:
            if step is not None:
                raise
            errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
            warnings.warn(f"checkpoint step {s} in {directory} is unreadable ({errors[-1]}); trying the previous one",
                          RuntimeWarning, stacklevel=2)
    raise FileNotFoundError(f"{workdir}: no restorable training checkpoint under {directory} ({'; '.join(errors)})")


def _restore_step(step_dir: Path, step: int) -> WorkdirModel:
    meta = restore_meta(step_dir)
    model = meta.get("model")
    if not model:
        raise ValueError(f"{step_dir}: the checkpoint does not record its model (trained by another task?)")
    module, config = models.build(model["name"], model["config"])
    patterns = tuple(model["trainable"])

    def init(key):
        return nn.unbox(models.init_variables(module, key)["params"])

    abstract = jax.eval_shape(init, jax.random.key(0))
    a_train = partition(abstract, patterns)[0]
    trainable = _restore_trainable(step_dir, a_train)
    source = meta["frozen_source"]
    if source["kind"] == "base":
        frozen = partition(load_base_params(source["path"], abstract, config), patterns)[1]
    else:
        k_init, _ = init_keys(source["seed"])
        full = jax.jit(init)(k_init)
        frozen = partition(full, patterns)[1]
    frozen = cast_frozen(frozen, model.get("frozen_dtype", "float32"))
    return WorkdirModel(module, combine(trainable, frozen), config, Path(model["tokenizer"]), step)
