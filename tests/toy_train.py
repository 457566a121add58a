"""``train.py`` on the toy task for subprocess tests, with fault injection as a callback:

    python tests/toy_train.py [--fault KIND:N[@P]] [--dump DIR] [--late P:DIR] TRAIN_PY_ARGS...

Faults at step N (1-based), in process P only with ``@P`` (default: every process):

* ``kill:N`` -- SIGKILL after step N (before that step's checkpoint), once the checkpoint in flight, if any, has
  committed (the fault is "a process dies between checkpoints"; dying during a write is ``killsave``), so the
  newest complete checkpoint at the kill does not depend on how fast the host writes; ``term:N`` -- SIGTERM
  (preemption: the loop writes a final checkpoint at step N and exits);
* ``killsave:N`` -- SIGKILL while step N's checkpoint is being written (inside orbax's write of its ``meta`` item,
  which process 0 writes: the step is half-written, never committed);
* ``failsave:N`` -- that write fails part-way (a truncated file, then ENOSPC), as on a full disk;
* ``slow:MS`` -- every step takes MS milliseconds longer and prints ``toy_train: step N``;
* ``hold:N`` -- after step N, prints ``toy_train: holding at step N`` and waits (at most 120 s) for a SIGTERM, so a
  test that signals the running job knows the step every process stops after.

Several ``--fault`` options combine.

``--late P:DIR``: process P is a peer that compiles late, for as long as the test wants: its K-th AOT compile
(``jax.stages.Lowered.compile``: the initial state, the train step, the first evaluation) prints ``toy_train:
compile K held`` and waits (at most 300 s) until the file ``DIR/release-K`` exists. Every process prints
``toy_train: at barrier NAME`` before each :func:`calico_jax.parallel.distributed.barrier` and ``toy_train: passed
barrier NAME with R released`` after it (R: the release files by then), so the test sees whether a barrier waited
for the late peer without waiting any fixed time itself.

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


LIVE = []   # the run's Checkpointer (installed by ``install_checkpointer``)


def wait_for_commit(timeout: float = 120) -> None:
    """Until the step of the checkpoint in flight, if any, exists (orbax renames it into place on commit)."""
    ckpt, deadline = LIVE[0], time.monotonic() + timeout
    while ckpt.pending is not None and not (ckpt.directory / str(ckpt.pending)).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"toy_train: checkpoint {ckpt.pending} not committed within {timeout} s")
        time.sleep(0.02)


def hold_until_sigterm(step: int, timeout: float = 120) -> None:
    got = []
    loop_handler = signal.getsignal(signal.SIGTERM)

    def handler(sig, frame):
        got.append(sig)
        loop_handler(sig, frame)

    signal.signal(signal.SIGTERM, handler)
    print(f"toy_train: holding at step {step}", flush=True)
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    signal.signal(signal.SIGTERM, loop_handler)


def install_late_peer(proc: int, gate: Path, timeout: float = 300) -> None:
    import jax

    from calico_jax.parallel import distributed

    original, held = jax.stages.Lowered.compile, []

    def compile_(self, *args, **kwargs):
        if jax.process_index() == proc:
            held.append(None)
            release, deadline = gate / f"release-{len(held)}", time.monotonic() + timeout
            print(f"toy_train: compile {len(held)} held", flush=True)
            while not release.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"toy_train: {release} did not appear within {timeout} s")
                time.sleep(0.005)
        return original(self, *args, **kwargs)

    barrier = distributed.barrier

    def traced(name, *args, **kwargs):
        print(f"toy_train: at barrier {name}", flush=True)
        barrier(name, *args, **kwargs)
        print(f"toy_train: passed barrier {name} with {len(list(gate.glob('release-*')))} released", flush=True)

    jax.stages.Lowered.compile = compile_
    distributed.barrier = traced   # its callers look it up in the module at each call


def cache_on_every_process() -> None:
    """Every process of a CPU job writes its programs to the persistent compilation cache, not process 0 only:
    jax keys an entry by the devices' topology, which on CPU differs from process to process, and writes from
    process 0 only, so without this the other processes compile every program again in every job (the
    compile-heavy part of a rerun: the job waits for its slowest process)."""
    from jax._src import compilation_cache, compiler, config
    from jax._src import distributed as jax_distributed

    original = compiler._cache_write

    def write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if jax_distributed.global_state.process_id in (None, 0) or host_callbacks:
            return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
        if compile_time_secs >= config.persistent_cache_min_compile_time_secs.value:
            compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                      int(compile_time_secs))

    compiler._cache_write = write


def install_checkpointer(dump_dir: Path | None) -> None:
    """The loop's Checkpointer, recorded in ``LIVE``; with ``dump_dir`` it also dumps what it saves/restores."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from calico_jax.checkpoints.training import Checkpointer
    from calico_jax.train import loop

    def dump(name: str, state) -> None:
        if dump_dir is None:
            return
        full = multihost_utils.process_allgather(state, tiled=True)
        if jax.process_index() == 0:
            leaves = jax.tree_util.tree_leaves_with_path(full)
            dump_dir.mkdir(parents=True, exist_ok=True)
            np.savez(dump_dir / f"{name}.npz", **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})

    class Tracked(Checkpointer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            LIVE.append(self)

        def save(self, step, state, data_iter, meta):
            dump(f"saved-{step}", state)
            return super().save(step, state, data_iter, meta)

        def restore_latest(self, *args, **kwargs):
            out = super().restore_latest(*args, **kwargs)
            if out is not None:
                dump(f"restored-{int(out[0]['step'])}", out[0])
            return out

    loop.Checkpointer = Tracked


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import tests.toy  # noqa: F401 -- registers the "toy" task
    import train

    hooks, dump_dir = [], None
    while argv[:1] in (["--fault"], ["--dump"], ["--late"]):
        if argv[0] == "--dump":
            dump_dir = Path(argv[1])
        elif argv[0] == "--late":
            proc, _, gate = argv[1].partition(":")
            install_late_peer(int(proc), Path(gate))
        else:
            kind, at, proc = parse_fault(argv[1])
            if kind in ("killsave", "failsave"):
                install_save_fault(kind, at)
            elif kind == "slow":
                hooks.append(lambda step, ms=at: (time.sleep(ms / 1000), print(f"toy_train: step {step}", flush=True)))
            elif kind == "hold":
                hooks.append(lambda step, at=at: step == at and hold_until_sigterm(step))
            else:
                sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind]

                def hook(step: int, at: int = at, sig=sig, proc=proc) -> None:
                    import jax
                    if step == at and proc in (None, jax.process_index()):
                        if sig == signal.SIGKILL:
                            wait_for_commit()
                        os.kill(os.getpid(), sig)
                hooks.append(hook)
        argv = argv[2:]
    install_checkpointer(dump_dir)
    cache_on_every_process()
    return train.main(argv, on_step=(lambda step: [h(step) for h in hooks]) if hooks else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
