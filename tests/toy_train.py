"""``train.py`` on the toy task for subprocess tests, with fault injection as a callback:

    python tests/toy_train.py [--fault KIND:N[@P]] [--dump DIR] TRAIN_PY_ARGS...

Faults at step N (1-based), in process P only with ``@P`` (default: every process):

* ``kill:N`` -- SIGKILL after step N (before that step's checkpoint); ``term:N`` -- SIGTERM (preemption: the loop
  writes a final checkpoint at step N and exits);
* ``killsave:N`` -- SIGKILL while step N's checkpoint is being written (inside orbax's write of its ``meta`` item,
  which process 0 writes: the step is half-written, never committed);
* ``failsave:N`` -- that write fails part-way (a truncated file, then ENOSPC), as on a full disk;
* ``slow:MS`` -- every step takes MS milliseconds longer and prints ``toy_train: step N`` (tests that signal a
  running job).

Several ``--fault`` options combine.

``--dump DIR``: process 0 writes every state it checkpoints (``DIR/saved-STEP.npz``) and the one it restores
(``DIR/restored-STEP.npz``), gathered from all processes, so tests compare them bit for bit."""
import errno
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_fault(spec: str) -> tuple[str, int, int | None]:
    kind, _, at = spec.partition(":")
    step, _, proc = at.partition("@")
    return kind, int(step), int(proc) if proc else None


def install_save_fault(kind: str, at: int) -> None:
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
    original = jh.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if isinstance(x, dict) and x.get("step") == at:
            if kind == "killsave":
                os.kill(os.getpid(), signal.SIGKILL)
            (directory / "metadata").write_text('{"step": ')   # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, f"No space left on device (injected at step {at})")
        return await original(self, x, directory)

    jh.JsonCheckpointHandler._save_fn = save_fn


def install_dump(directory: Path) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from calico_jax.train import loop
    from calico_jax.train.checkpoint import Checkpointer

    def dump(name: str, state) -> None:
        full = multihost_utils.process_allgather(state, tiled=True)
        if jax.process_index() == 0:
            leaves = jax.tree_util.tree_leaves_with_path(full)
            directory.mkdir(parents=True, exist_ok=True)
            np.savez(directory / f"{name}.npz", **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})

    class Dumping(Checkpointer):
        def save(self, step, state, data_iter, meta):
            dump(f"saved-{step}", state)
            return super().save(step, state, data_iter, meta)

        def restore_latest(self, *args, **kwargs):
            out = super().restore_latest(*args, **kwargs)
            if out is not None:
                dump(f"restored-{int(out[0]['step'])}", out[0])
            return out

    loop.Checkpointer = Dumping


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import tests.toy  # noqa: F401 -- registers the "toy" task
    import train

    hooks = []
    while argv[:1] in (["--fault"], ["--dump"]):
        if argv[0] == "--dump":
            install_dump(Path(argv[1]))
        else:
            kind, at, proc = parse_fault(argv[1])
            if kind in ("killsave", "failsave"):
                install_save_fault(kind, at)
            elif kind == "slow":
                hooks.append(lambda step, ms=at: (time.sleep(ms / 1000), print(f"toy_train: step {step}", flush=True)))
            else:
                sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind]

                def hook(step: int, at: int = at, sig=sig, proc=proc) -> None:
                    import jax
                    if step == at and proc in (None, jax.process_index()):
                        os.kill(os.getpid(), sig)
                hooks.append(hook)
        argv = argv[2:]
    return train.main(argv, on_step=(lambda step: [h(step) for h in hooks]) if hooks else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
