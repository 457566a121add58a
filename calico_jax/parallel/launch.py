"""Starts a job of N processes on this machine (in the spirit of ``torchrun --standalone``)::

    python -m calico_jax.launch --local 2 --devices-per-process 4 -- train.py --config configs/tiny.py --workdir W
    python -m calico_jax.launch --local 8 --gpus-per-process 1 -- train.py --config configs/calico_7b.py --workdir W

Each process gets ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port; process 0 binds only the loopback
interface), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, which ``train.py`` reads (see
:mod:`calico_jax.parallel.distributed`); ``--devices-per-process K`` simulates K CPU devices per process,
``--gpus-per-process K`` gives process i the GPUs ``i*K .. i*K+K-1``. A command that starts with a ``.py`` file
or with ``-m pkg.mod`` runs with this Python, e.g.
``python -m calico_jax.launch --local 2 --devices-per-process 4 -- -m calico_jax.evaluate --ckpt M --pairs P --out R``
(each process predicts its block of the samples, process 0 scores).

Output lines are forwarded with a ``[pI]`` prefix. When a process dies (non-zero status or a signal), the others
are stopped (SIGTERM, then SIGKILL after ``--grace`` seconds: a job with a dead member cannot make progress) and
the launcher exits with the status of the cause (128 + signal for a signal), naming it. The cause is the first
process to fail with any status but 69. ``train.py`` exits 69 when its collective lost a peer
(:data:`calico_jax.parallel.distributed.PEER_LOST`), and that can be seen before the dead peer's own exit, so after a 69
the launcher waits up to ``--settle`` seconds for the cause; if none comes, it names the first 69.
SIGTERM / SIGINT to the launcher is forwarded to every process (train.py then writes a final checkpoint), and the
launcher exits with their status. Children die with the launcher (Linux ``PR_SET_PDEATHSIG``).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from calico_jax.parallel.distributed import PEER_LOST

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, index: int, count: int, port: int, devices: int = 0, gpus: int = 0) -> dict:
    """The environment of process ``index`` of ``count``."""
    env = {**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": str(count), "JAX_PROCESS_ID": str(index), "PYTHONUNBUFFERED": "1"}
    if devices:
        flags = re.sub(rf"{DEVICE_FLAG}=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} {DEVICE_FLAG}={devices}".strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * gpus + g) for g in range(gpus))
    return env


def describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}" + (" (it lost a peer)" if rc == PEER_LOST else "")


def exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _die_with_parent() -> None:   # runs in the child before exec
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _forward(stream, out, prefix: bytes) -> None:
    for line in iter(stream.readline, b""):
        out.buffer.write(prefix + line)
        out.buffer.flush()
    stream.close()


class Job:
    def __init__(self, cmd: list[str], count: int, port: int, devices: int, gpus: int, grace: float,
                 settle: float):
        self.grace, self.settle, self.procs, self.threads = grace, settle, [], []
        # (index, status) in the order the reaper threads saw the processes end. Peers fail within milliseconds
        # of a death (a collective's connection closes as the process dies, before it can be reaped), so the order
        # alone does not tell the cause: a peer that says so exits PEER_LOST, and wait() ranks it last.
        self.exits: list[tuple[int, int]] = []
        # Signals are handled from before the first child starts: a SIGTERM that arrives while they start (they
        # may already be printing) is forwarded, not the launcher's own death.
        self.terminating: list[int] = []
        self.forwarded = 0   # children that the first signal reached (each gets it once: a second one kills)
        self.old_handlers = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        for i in range(count):
            p = subprocess.Popen(cmd, env=child_env(dict(os.environ), i, count, port, devices, gpus),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                 preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            self.procs.append(p)
            threading.Thread(target=lambda i=i, p=p: self.exits.append((i, p.wait())), daemon=True).start()
            for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_forward, args=(stream, out, f"[p{i}] ".encode()), daemon=True)
                t.start()
                self.threads.append(t)
        if self.terminating:   # signalled while starting: the children started after it get it too
            self.signal_all(signal.SIGTERM, start=self.forwarded)

    def signal_all(self, sig: int, start: int = 0) -> None:
        for p in self.procs[start:]:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """SIGTERM, then SIGKILL (whole process groups: grain workers too) after the grace period."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()

    def handle(self, sig, _) -> None:   # first signal: forward SIGTERM (final checkpoints); a second one: kill
        self.terminating.append(sig)
        if len(self.terminating) == 1:
            self.forwarded = len(self.procs)
            self.signal_all(signal.SIGTERM)
        else:
            self.grace = 0.0
            self.stop()

    def wait(self) -> int:
        terminating = self.terminating
        first_failure = None
        try:
            while True:
                exits = list(self.exits)
                # the cause first, then the order of ending (a stable sort)
                failed = sorted(((i, rc) for i, rc in exits if rc != 0), key=lambda f: f[1] == PEER_LOST)
                if failed and first_failure is None:
                    first_failure = time.monotonic()
                settling = (failed and failed[0][1] == PEER_LOST and len(exits) < len(self.procs)
                            and time.monotonic() < first_failure + self.settle)
                if failed and not terminating and not settling:
                    i, rc = failed[0]
                    others = len(self.procs) - len(exits)
                    print(f"launch: process {i} (pid {self.procs[i].pid}) {describe(rc)}; stopping the other "
                          f"{others} process(es)", file=sys.stderr, flush=True)
                    self.stop()
                    return exit_code(rc)
                if len(exits) == len(self.procs):
                    for i, rc in failed:
                        print(f"launch: process {i} {describe(rc)}", file=sys.stderr, flush=True)
                    return exit_code(failed[0][1]) if failed else 0
                time.sleep(0.05)
        finally:
            for s, h in self.old_handlers.items():
                signal.signal(s, h)
            for t in self.threads:
                t.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(prog="python -m calico_jax.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", type=int, required=True, metavar="N", help="processes to start on this machine")
    ap.add_argument("--devices-per-process", type=int, default=0, metavar="K", help="simulated CPU devices each")
    ap.add_argument("--gpus-per-process", type=int, default=0, metavar="K", help="CUDA_VISIBLE_DEVICES slice each")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    ap.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL when stopping")
    ap.add_argument("--settle", type=float, default=3.0,
                    help=f"seconds to wait for the cause after a process exits {PEER_LOST} (it lost a peer)")
    ap.usage = "python -m calico_jax.launch --local N [options] -- COMMAND ..."
    args = ap.parse_args(argv[:cut])   # --help prints the usage and exits 0 here
    cmd = argv[cut + 1:]
    if not cmd or args.local < 1:
        ap.error("need --local N >= 1 and a command after --")
    if cmd[0].endswith(".py") or cmd[0] == "-m":
        cmd = [sys.executable, *cmd]
    job = Job(cmd, args.local, args.port or free_port(), args.devices_per_process, args.gpus_per_process, args.grace,
              args.settle)
    return job.wait()


if __name__ == "__main__":
    sys.exit(main())
