"""Test setup: 8 simulated CPU devices (CPU backend only), exact fp32 matmuls, absl flags parsed (grain workers)."""
import os

# Must happen before jax is imported anywhere.
# XLA's CPU backend at -O0: the suite's time is mostly compiling tiny programs, and LLVM's optimization passes are
# part of it (the tiny CALICO's init compile 17 s -> 8 s, 10-15 % of a file's CPU: tests/README.md); every result a
# test compares is compiled alike (the subprocesses inherit XLA_FLAGS). A level set by the caller wins.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# CPU only: with the AOT extras installed jax would otherwise probe libtpu and the CUDA plugin at backend start
# (tracebacks, libtpu's lock file shared by the xdist workers); AOT tests compile for topologies explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

try:
    import torch  # noqa: E402

    torch.set_grad_enabled(False)
except ImportError:  # parity tests skip themselves without torch
    pass

_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


@pytest.hookimpl(trylast=True)   # after the tmpdir plugin has set up pytest's temp root
def pytest_configure(config):
    """One persistent compilation cache for the whole session, under pytest's temp root: the xdist workers and the
    subprocesses tests start (CLI, multi-process runs) inherit it through the environment, so each distinct
    program is compiled once per session instead of once per process. A directory set by the caller wins."""
    if not hasattr(config, "workerinput") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(config._tmp_path_factory.getbasetemp() / "jax-compile-cache")
    for k, v in _CACHE_ENV.items():
        os.environ.setdefault(k, v)
    # jax read its flags when conftest imported it: set them in this process too
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ[
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(os.environ[
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


# The longest files first (whole-file totals, bench/results/suite.md). With --no-loadscope-reorder (Makefile) xdist
# hands out whole files in collection order; by default it starts with the files that have the most tests, and the
# 2-process CALICO file (2 tests, ~3 min) was handed out last and ran alone at the end.
LONGEST_FIRST = ("test_multihost_calico.py", "test_inference_scale.py", "test_train_calico.py", "test_aot_targets.py",
                 "test_experiment_config.py", "test_train_eval.py", "test_remat.py", "test_scan.py",
                 "test_assemble.py", "test_predict.py", "test_multihost.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the order within a file stays
