"""Which JAX backends a command-line run may start, decided before JAX is imported.

An install with the AOT extras (``libtpu`` and the CUDA PJRT plugin, needed to *plan* for TPUs and GPUs on any
machine) makes JAX try both in every process. On a machine with neither accelerator each attempt fails loudly (a
CUDA traceback, ``cudart_stub`` lines, libtpu's ``INVALID_ARGUMENT`` lines) before JAX falls back to the CPU.
:func:`quiet_cli` looks for the accelerators' device files instead and, when there are none, restricts JAX to the
CPU and keeps the CUDA plugin from loading, unless the command plans for a target (``--target``, ``--search``).

It runs for ``python -m calico_jax.<tool>`` (from the package ``__init__``, before the tool's own imports) and at
the top of ``train.py``. An explicit ``JAX_PLATFORMS`` always wins, and a library import changes nothing.
Nothing here imports JAX.
"""
from __future__ import annotations

import glob
import os
import sys
import types
from collections.abc import Sequence

# Device files a process sees when an accelerator is attached: the NVIDIA driver's (WSL: /dev/dxg); TPU VMs
# expose /dev/accel* (v2-v5p) or VFIO groups (v5e, v6e).
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")
# Arguments that make a command compile for an accelerator it may not have (the AOT plans need the plugins).
PLANNING_FLAGS = ("--target", "--search")
# JAX imports these at import time (CUDA version probe) and at first backend use (plugin discovery).
CUDA_MODULES = ("jax_cuda13_plugin", "jax_cuda12_plugin")
CUDA_PLUGINS = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")


def accelerator_present() -> bool:
    """True if this machine shows a GPU or TPU device file, or the environment names a TPU."""
    if any(os.path.exists(p) for p in GPU_DEVICE_FILES):
        return True
    if os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_NAME"):
        return True
    return any(glob.glob(g) for g in TPU_DEVICE_GLOBS)


def plans_for_accelerator(argv: Sequence[str]) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in PLANNING_FLAGS)


def decide(chosen: str, argv: Sequence[str], accelerator: bool) -> tuple[str | None, bool]:
    """(the ``JAX_PLATFORMS`` to set or None, whether to keep the CUDA plugin out) for a command line.

    ``chosen``: the user's ``JAX_PLATFORMS`` ("" when unset). An explicit choice is kept (without ``cuda`` in it the
    CUDA plugin stays out too); unset with an accelerator attached changes nothing; unset without one means the CPU.
    A command that plans for a target (``--target``, ``--search``) keeps the plugins: the plans need them.
    """
    if not chosen and accelerator:
        return None, False
    platforms = chosen or "cpu"
    gpu = any(p in platforms for p in ("cuda", "gpu", "rocm"))
    return (None if chosen else "cpu"), not gpu and not plans_for_accelerator(argv)


def quiet_cli(argv: Sequence[str] | None = None) -> bool:
    """Applies :func:`decide` to this process (before JAX is imported); returns whether it changed anything."""
    # transformers serves tokenizers here; its advice that PyTorch (for its models) is missing is not for us
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "jax" in sys.modules:
        return False
    chosen = os.environ.get("JAX_PLATFORMS", "")
    platforms, block_cuda = decide(chosen, sys.argv if argv is None else argv,
                                   accelerator_present() if not chosen else False)
    if platforms:
        os.environ["JAX_PLATFORMS"] = platforms
        # XLA's C++ log on a CPU says little a user can act on ("Very slow compile?" as ERROR on a busy host):
        # off unless asked for (TF_CPP_MIN_LOG_LEVEL=0 shows everything). Failures still raise in Python.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if block_cuda:
        for name in CUDA_MODULES:
            sys.modules.setdefault(name, None)       # import -> ImportError, which JAX treats as "not installed"
        for name in CUDA_PLUGINS:
            stub = types.ModuleType(name, "placeholder: no GPU on this machine (calico_jax.core.platform)")
            stub.initialize = lambda: None
            sys.modules.setdefault(name, stub)
    return bool(platforms or block_cuda)


CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
DEFAULT_CACHE = "~/.cache/calico_jax/jax"


def enable_compile_cache() -> str:
    """Turns on JAX's persistent compilation cache in ``$JAX_COMPILATION_CACHE_DIR`` (kept when set), else
    ``~/.cache/calico_jax/jax``, caching every program (the predictor's are small but many), so a repeated command
    does not compile again. The command-line tools call it; returns the directory."""
    import jax

    path = os.environ.get(CACHE_ENV) or os.path.expanduser(DEFAULT_CACHE)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
