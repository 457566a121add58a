"""Test setup: 8 simulated CPU devices (CPU backend only), exact fp32 matmuls, absl flags parsed (grain workers)."""
import os

# Must happen before jax is imported anywhere.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# CPU only: with the AOT extras installed jax would otherwise probe libtpu and the CUDA plugin at backend start
# (tracebacks, libtpu's lock file shared by the xdist workers); AOT tests compile for topologies explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

try:
    import torch  # noqa: E402

    torch.set_grad_enabled(False)
except ImportError:  # parity tests skip themselves without torch
    pass
