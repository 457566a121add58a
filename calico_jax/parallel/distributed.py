"""Several JAX processes as one job: starting them (``jax.distributed``) and the few agreements training needs.

How a process learns its place, first match wins:

1. explicit: ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (flags of ``train.py``), or
   the variables ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (what
   ``python -m calico_jax.launch`` sets for each process it starts);
2. automatic: plain ``jax.distributed.initialize()`` reads the TPU pod / SLURM / Open MPI environment.

``--init_timeout`` (``CALICO_INIT_TIMEOUT``, seconds) bounds the start: a process that has not joined the job by
then (coordinator unreachable, a peer missing) prints which address it waited for and exits with status 2.
jax would abort with a C++ stack trace after its own ``initialization_timeout``; a watchdog thread ends the
process first, with a message (the C++ connect call cannot be interrupted from Python).

CPU processes exchange collectives through gloo (``jax_cpu_collectives_implementation``), so a job of several
CPU processes on one machine runs the same partitioned programs as a pod, over the loopback interface. gloo gives a
peer 30 s to reach a program's first collective; :func:`barrier` (the coordination service, ``CALICO_BARRIER_TIMEOUT``
seconds) lines the processes up before each newly compiled program of the training loop first runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

ADDRESS, COUNT, INDEX, TIMEOUT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                  "CALICO_INIT_TIMEOUT")
DEFAULT_TIMEOUT = 300.0
BARRIER_TIMEOUT, DEFAULT_BARRIER_TIMEOUT = "CALICO_BARRIER_TIMEOUT", 1800.0
# The exit status of a process whose collective failed because a peer went away (sysexits' EX_UNAVAILABLE): it is
# a casualty, not the cause, and calico_jax.parallel.launch names the process that failed for another reason instead.
PEER_LOST = 69
_PEER_MARKERS = ("gloo", "closed by peer", "reset by peer")


class DistributedError(RuntimeError):
    """The job could not start (bad settings); train.py exits with status 2."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """Where this process belongs; ``coordinator`` None = automatic detection."""
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout: float = DEFAULT_TIMEOUT


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--multihost", action="store_true",
                    help="join a multi-process job (implied when JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are "
                         "set); without the three settings below jax.distributed.initialize() detects TPU/SLURM/MPI")
    ap.add_argument("--coordinator_address", default=None, help=f"HOST:PORT of process 0 (env {ADDRESS})")
    ap.add_argument("--num_processes", type=int, default=None, help=f"processes in the job (env {COUNT})")
    ap.add_argument("--process_id", type=int, default=None, help=f"this process, 0..N-1 (env {INDEX})")
    ap.add_argument("--init_timeout", type=float, default=None,
                    help=f"seconds to wait for the job to assemble, then exit 2 (env {TIMEOUT}; default "
                         f"{DEFAULT_TIMEOUT:.0f})")


def _int(text: str | None, name: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer") from None


def spec_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Spec | None:
    """The :class:`Spec` of ``train.py``'s arguments and the environment; None = a single-process run."""
    address = args.coordinator_address or environ.get(ADDRESS) or None
    count = args.num_processes if args.num_processes is not None else _int(environ.get(COUNT), COUNT)
    index = args.process_id if args.process_id is not None else _int(environ.get(INDEX), INDEX)
    timeout = args.init_timeout if args.init_timeout is not None else float(environ.get(TIMEOUT) or DEFAULT_TIMEOUT)
    explicit = (address, count, index)
    if not args.multihost and (address is None or count is None):
        return None
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        missing = [n for n, v in zip(("--coordinator_address", "--num_processes", "--process_id"), explicit)
                   if v is None]
        raise DistributedError(f"multihost: {', '.join(missing)} missing (give all three, flags or {ADDRESS}/"
                               f"{COUNT}/{INDEX}, or none for automatic TPU/SLURM/MPI detection)")
    if count is not None and not 0 <= index < count:
        raise DistributedError(f"multihost: process_id {index} is not in 0..{count - 1}")
    if timeout <= 0:
        raise DistributedError(f"multihost: init_timeout must be > 0, got {timeout}")
    return Spec(address, count, index, timeout)


def initialize(spec: Spec) -> None:
    """``jax.distributed.initialize`` within ``spec.timeout`` seconds, else a message and ``os._exit(2)``."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # only the CPU client uses it
    where = (f"coordinator {spec.coordinator} (process {spec.process_id} of {spec.num_processes})"
             if spec.coordinator else "the automatically detected coordinator (TPU/SLURM/MPI)")

    def give_up():
        print(f"multihost: could not join the job through {where} within {spec.timeout:g} s: is process 0 running "
              f"and reachable, and did every process start? (--init_timeout / {TIMEOUT})", file=sys.stderr,
              flush=True)
        os._exit(2)

    watchdog = threading.Timer(spec.timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:   # jax's own timeout a little later, so the watchdog's message comes first
        jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                                   initialization_timeout=int(spec.timeout) + 30)
    except (ValueError, RuntimeError) as e:   # e.g. --multihost outside any detectable cluster
        raise DistributedError(f"multihost: cannot join the job through {where}: {e}") from None
    finally:
        watchdog.cancel()


def leave(code: int) -> int:
    """The exit status of a process that stops on its own (a failed checkpoint write) -- returned with one
    process; with several, the process exits now: the others may be blocked waiting for it, and jax's clean
    shutdown would wait for them (minutes) before a launcher or scheduler could restart the job."""
    import jax
    if jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a cross-process collective that failed because a peer died or vanished (a gloo
    connection closed or reset, a context whose peer never came): jax raises it as its runtime error type."""
    if "RuntimeError" not in type(error).__name__:
        return False
    text = str(error).lower()
    return any(m in text for m in _PEER_MARKERS)


# ------------------------------------------------------------------------------------------ agreements
def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (one small collective; free with one process)."""
    import jax
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils
    barrier_once("any_process")   # before its program's first run (see barrier)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def all_processes(flag: bool) -> bool:
    return not any_process(not flag)


_BARRIERS: dict[str, int] = {}   # name -> times this process passed it


def barrier(name: str, timeout: float | None = None) -> None:
    """Every process reaches ``name`` before any goes on; waits up to ``timeout`` seconds (default
    ``CALICO_BARRIER_TIMEOUT``, else 1800: a peer may still be compiling a large step), then raises
    :class:`DistributedError`.

    It goes through the coordination service, not a device collective: CPU collectives (gloo) give a peer only
    30 s to arrive at a program's first collective, so processes whose compile times differ by more than that
    must meet here before a newly compiled program first runs."""
    import jax
    if jax.process_count() == 1:
        return
    _BARRIERS[name] = count = _BARRIERS.get(name, 0) + 1   # every process passes a name equally often
    from jax._src import distributed as jax_distributed  # the client has no public accessor
    client = jax_distributed.global_state.client
    if client is None:   # a multi-process backend not started by jax.distributed (none known today)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    if timeout is None:
        timeout = float(os.environ.get(BARRIER_TIMEOUT) or DEFAULT_BARRIER_TIMEOUT)
    try:
        client.wait_at_barrier(f"calico/{name}/{count}", int(timeout * 1000))
    except Exception as e:   # jax raises its runtime error type; its text names the missing processes
        raise DistributedError(f"multihost: process {jax.process_index()} waited {timeout:g} s at barrier {name!r} "
                               f"and not every process arrived ({BARRIER_TIMEOUT} raises the limit): {e}") from e


def barrier_once(name: str) -> None:
    """:func:`barrier` the first time this process reaches ``name``, later a no-op."""
    if name not in _BARRIERS:
        barrier(name)


def batch_block(sharding: Any, rows: int) -> tuple[int, int]:
    """``(block, blocks)``: the rows of a global batch of ``rows`` rows that this process's devices hold, as block
    ``block`` of ``blocks`` equal contiguous blocks (what ``jax.make_array_from_process_local_data`` expects this
    process to pass). A layout that gives a process several separate row ranges is an error."""
    import jax
    spans = sorted({(idx[0].start or 0, rows if idx[0].stop is None else idx[0].stop)
                    for idx in sharding.addressable_devices_indices_map((rows,)).values()})
    lo, hi = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != hi - lo or rows % (hi - lo) or lo % (hi - lo):
        raise ValueError(f"process {jax.process_index()} holds batch rows {spans} of {rows}: not one contiguous "
                         "block; order the mesh devices by process")
    return lo // (hi - lo), rows // (hi - lo)
