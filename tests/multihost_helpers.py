"""Running real multi-process jobs from tests: ``python -m calico_jax.launch --local N`` (gloo over loopback, a free
port per job), or one plain process; metrics and dumps of the run (tests/toy_train.py ``--dump``)."""
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8                                    # global devices of every job (4 per process with 2 processes)
# Compile time dominates these runs; every run a test compares is compiled alike (XLA's backend at -O0 from
# tests/conftest.py's XLA_FLAGS, a compilation cache shared by the module's runs: ``cache_dir``).
EXACT = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "lr", "grad_norm", "skipped")


def env(**extra) -> dict:
    out = {**os.environ, "JAX_PLATFORMS": "cpu", **extra}
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", out.get("XLA_FLAGS", ""))
    out["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    return out


@contextlib.contextmanager
def cache_dir(path):
    """Runs started inside share a persistent compilation cache at ``path`` (relaunches skip most compiles)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(path))
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
        yield


def command(processes: int, script: list[str]) -> list[str]:
    """``script`` run by ``processes`` launched processes, or directly with one (no jax.distributed)."""
    if processes == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "calico_jax.launch", "--local", str(processes), "--devices-per-process",
            str(DEVICES // processes), "--grace", "2", "--", *script]


def run(processes: int, script: list[str], timeout: float = 240, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(command(processes, script), cwd=ROOT, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


def start(processes: int, script: list[str], log, **extra_env) -> subprocess.Popen:
    """:func:`run` in the background, its output (stdout and stderr) to the open file ``log``."""
    return subprocess.Popen(command(processes, script), cwd=ROOT, env=env(**extra_env), stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def popen(processes: int, script: list[str], **extra_env) -> subprocess.Popen:
    return subprocess.Popen(command(processes, script), cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rows(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def trace(workdir, keys=EXACT) -> list[tuple]:
    return [(r["step"], *(r[k] for k in keys)) for r in rows(workdir)]


def steps(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def resumed_from(output: str) -> int | None:
    m = re.search(r"resuming from checkpoint step (\d+)", output)
    return int(m.group(1)) if m else None


def load_dump(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def bit_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
