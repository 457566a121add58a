"""Training checkpoints: orbax ``CheckpointManager`` (async, keep last N, atomic commit).

Each step directory holds three items (reading one back outside training: :mod:`calico_jax.checkpoints.workdir`)::

    state/      trainable params, optimizer state, step, RNG key data, skipped-update count
    data_iter/  the grain iterator state (exact resume of the input order)
    meta/       JSON: step, where the frozen weights come from (``frozen_source``), config name

Frozen weights are *not* copied: ``frozen_source`` references the converted base checkpoint (or the
seed of a random init), and the loop rebuilds them from there on restore.

Restore targets are ``jax.ShapeDtypeStruct`` trees carrying the *current* mesh's shardings, so a
checkpoint written on one mesh/device count restores onto any other. Orbax writes each step into a
temporary directory and renames it on commit, so a step directory that exists is complete; a step
that still fails to restore (truncated or corrupted files) is moved to ``checkpoints_corrupt/`` next to the
checkpoints with a warning, and the previous step is tried.

Several processes: every process writes its shards of ``state`` and its own iterator state
(``data_iter/process_I-of-N.json``); process 0 commits the step once all have written (orbax's barrier), so a
process killed mid-save leaves only a temporary directory, never a step. Restoring onto another process count
re-derives each process's iterator position from the saved ones (:func:`translate_data_state`). All processes
agree on the step they restore. A save that fails (disk full, a killed writer) raises :class:`CheckpointWriteError`
naming the step; the steps before it stay readable.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from calico_jax.checkpoints.workdir import DATA_ITER, META, STATE
from calico_jax.core.config import Config
from calico_jax.parallel import distributed

log = logging.getLogger(__name__)

# Replica-parallel saving splits every replicated array across its replicas with one compiled slice program per
# shape (~2 s of compiles per process for the toy and tiny models); below 1 MiB per slice one replica writes it.
# (orbax warns about the override on the absl logger: expected here, so not shown.)
_absl, _level = logging.getLogger("absl"), logging.getLogger("absl").level
_absl.setLevel(logging.ERROR)
try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20), override=True)
finally:
    _absl.setLevel(_level)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Config):
    """Where and how training checkpoints are written (``ExperimentConfig.checkpoint``)."""
    directory: str = ""                   # "" = WORKDIR/checkpoints; any orbax/tensorstore path
    max_to_keep: int = 3
    async_save: bool = True


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the step and the newest complete one."""


def translate_data_state(saved: dict[int, dict], count: int, global_rows: int) -> dict:
    """The iterator state for a process of a job of ``count`` processes, from the states ``saved`` (by process
    index) of a job of ``len(saved)``: each process's ``next_index`` counts rows of its own stream, ``global_rows /
    processes`` per global batch (:mod:`calico_jax.data.pipeline`), so the position is the number of global
    batches read. A process that skipped unreadable samples has read further: the furthest one wins (no
    sample is read twice; a few may be left out)."""
    if any(set(s) != {"next_index"} for s in saved.values()):
        raise ValueError("the data iterator state holds more than a position (grain workers?): restore it with the "
                         f"process count that saved it ({len(saved)}), or with data.worker_count=0 on both sides")
    old_rows, new_rows = global_rows // len(saved), global_rows // count
    batches = max(-(-int(s["next_index"]) // old_rows) for s in saved.values())
    return {"next_index": batches * new_rows}


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
        self.pending: int | None = None     # the step whose async save may still be running
        self.failed = False

    def committed_steps(self) -> list[int]:
        """Steps whose directory exists (committed); orbax lists a step from the moment its save starts."""
        if not self.directory.exists():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def _error(self, step: int, e: Exception) -> CheckpointWriteError:
        self.failed = True
        steps = [s for s in self.committed_steps() if s != step]
        return CheckpointWriteError(
            f"checkpoint step {step} could not be written to {self.directory} ({type(e).__name__}: {str(e)[:400]}); "
            f"the newest complete checkpoint is {f'step {steps[-1]}' if steps else 'none'}")

    # ------------------------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any]) -> bool:
        """Starts an (async) save of step ``step``; device arrays are copied to host before it returns,
        so ``state`` may be donated right after."""
        self.wait()   # a failure of the previous (async) save is reported as that step's
        args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave({**meta, "step": int(step)})}
        if data_iter is not None:
            args[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            saved = self.mngr.save(int(step), args=ocp.args.Composite(**args), force=True)
        except Exception as e:  # noqa: BLE001 -- orbax/tensorstore/OS errors of any type
            raise self._error(int(step), e) from e
        self.pending = int(step)
        return saved

    def check(self) -> None:
        """Raises :class:`CheckpointWriteError` if the last async save has failed (cheap; called every step, so a
        full disk stops training at once rather than at the next save)."""
        if self.pending is not None and not self.mngr.is_saving_in_progress():
            self.wait()   # the save has ended: returns at once, or raises its error

    def wait(self) -> None:
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._error(self.pending if self.pending is not None else -1, e) from e
        self.pending = None

    def close(self) -> None:
        """Waits for the last save (its failure raises :class:`CheckpointWriteError`), then closes."""
        try:
            if not self.failed:
                self.wait()
        finally:
            try:
                self.mngr.close()
            except Exception:  # noqa: BLE001 -- an error already reported
                if not self.failed:
                    raise

    def all_steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    # --------------------------------------------------------------------------------- restore
    def restore_step(self, step: int, abstract_state: Any, data_iter: Any,
                     global_rows: int | None = None) -> tuple[Any, dict]:
        """``global_rows`` (the global batch size) lets the data position move to another process count."""
        out = self.mngr.restore(int(step), args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}))
        if data_iter is not None:
            data_iter.set_state(self._data_state(int(step), global_rows))
            if hasattr(data_iter, "start_prefetch"):
                data_iter.start_prefetch()
        return out[STATE], dict(out[META])

    def _data_state(self, step: int, global_rows: int | None) -> dict:
        """This process's saved iterator state, or one derived from another process count's."""
        directory = self.directory / str(step) / DATA_ITER
        index, count = jax.process_index(), jax.process_count()
        own = directory / f"process_{index}-of-{count}.json"
        if own.exists():
            return json.loads(own.read_text())
        saved = {}
        for f in directory.glob("process_*-of-*.json"):
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", f.name)
            if m:
                saved[int(m.group(1))] = (int(m.group(2)), json.loads(f.read_text()))
        counts = {n for n, _ in saved.values()}
        if len(counts) != 1 or len(saved) != next(iter(counts)):
            raise FileNotFoundError(f"{directory}: no complete set of per-process iterator states "
                                    f"(found {sorted(f.name for f in directory.glob('*'))})")
        if global_rows is None:
            raise ValueError(f"{directory}: saved by {len(saved)} processes; pass global_rows to restore onto {count}")
        state = translate_data_state({i: s for i, (_, s) in saved.items()}, count, global_rows)
        if index == 0:
            log.warning("data iterator of step %d: saved by %d process(es), restored onto %d: position %s",
                        step, len(saved), count, state)
        return state

    def restore_latest(self, abstract_state: Any, data_iter: Any,
                       global_rows: int | None = None) -> tuple[Any, dict] | None:
        """Newest restorable checkpoint as ``(state, meta)``; ``None`` when there is none. A step that fails to
        restore on any process is set aside (warning) by all of them, and the previous one is tried."""
        for step in reversed(self.all_steps()):
            try:
                out, error = self.restore_step(step, abstract_state, data_iter, global_rows), None
            except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for bad files
                out, error = None, e
            if distributed.all_processes(error is None):
                return out
            msg = (f"checkpoint step {step} in {self.directory} is unreadable "
                   + (f"({type(error).__name__}: {str(error)[:300]})" if error else "on another process")
                   + "; falling back to the previous checkpoint")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
            self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Moves a bad step directory out of the manager's way (so the step can be saved again)."""
        src = self.directory / str(step)
        distributed.barrier(f"calico_set_aside_{step}_start")
        if jax.process_index() == 0 and src.exists():
            dst = self.directory.parent / f"{self.directory.name}_corrupt" / f"{step}-{int(time.time())}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                src.rename(dst)
            except OSError:
                src.rmtree(missing_ok=True)
        distributed.barrier(f"calico_set_aside_{step}_done")
        self.mngr.reload()
