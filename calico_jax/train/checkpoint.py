"""Training checkpoints: orbax ``CheckpointManager`` (async, keep last N, atomic commit).

Each step directory holds three items (reading one back outside training: :mod:`calico_jax.checkpoints`)::

    state/      trainable params, optimizer state, step, RNG key data, skipped-update count
    data_iter/  the grain iterator state (exact resume of the input order)
    meta/       JSON: step, where the frozen weights come from (``frozen_source``), config name

Frozen weights are *not* copied: ``frozen_source`` references the converted base checkpoint (or the
seed of a random init), and the loop rebuilds them from there on restore.

Restore targets are ``jax.ShapeDtypeStruct`` trees carrying the *current* mesh's shardings, so a
checkpoint written on one mesh/device count restores onto any other. Orbax writes each step into a
temporary directory and renames it on commit, so a step directory that exists is complete; a step
that still fails to restore (truncated or corrupted files) is moved to ``corrupt/`` next to the
checkpoints with a warning, and the previous step is tried.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from calico_jax.checkpoints import DATA_ITER, META, STATE
from calico_jax.train.config import CheckpointConfig

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig | None = None):
        cfg = cfg if cfg is not None else CheckpointConfig()
        # epath: local directories and any orbax/tensorstore location (gs://, s3://, ...).
        self.directory = epath.Path(directory)
        if "://" not in str(directory):
            self.directory = epath.Path(Path(directory).absolute())
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, create=True,
                                               enable_async_checkpointing=cfg.async_save,
                                               cleanup_tmp_directories=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any]) -> bool:
        """Starts an (async) save of step ``step``; device arrays are copied to host before it returns,
        so ``state`` may be donated right after."""
        args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave({**meta, "step": int(step)})}
        if data_iter is not None:
            args[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mngr.save(int(step), args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()

    def all_steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    # --------------------------------------------------------------------------------- restore
    def restore_step(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
        args = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        if data_iter is not None:
            args[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.mngr.restore(int(step), args=ocp.args.Composite(**args))
        return out[STATE], dict(out[META])

    def restore_latest(self, abstract_state: Any, data_iter: Any) -> tuple[Any, dict] | None:
        """Newest restorable checkpoint as ``(state, meta)``; ``None`` when there is none. A step
        that fails to restore is set aside (warning) and the previous one is tried."""
        for step in reversed(self.all_steps()):
            try:
                return self.restore_step(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad files
                msg = (f"checkpoint step {step} in {self.directory} is unreadable "
                       f"({type(e).__name__}: {str(e)[:300]}); falling back to the previous checkpoint")
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log.warning(msg)
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Moves a bad step directory out of the manager's way (so the step can be saved again)."""
        src = self.directory / str(step)
        if jax.process_index() == 0 and src.exists():
            dst = self.directory.parent / f"{self.directory.name}_corrupt" / f"{step}-{int(time.time())}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                src.rename(dst)
            except OSError:
                src.rmtree(missing_ok=True)
        self.mngr.reload()
