"""Compile targets for AOT plans: the devices of a TPU slice or GPU node that is not attached, and their chip figures.

``--target`` names one (:func:`parse`):

* ``cpu:N`` -- N host CPU devices (XLA:CPU; the path of ``--compile_only --devices N``);
* a libtpu topology, ``v5e:2x2``, ``v5p:2x2x1``, ``v4:2x2x1``, ``v6e:2x4``, ... (``jax.experimental.topologies``;
  needs the ``tpu-aot`` extra), optionally ``,slices=2`` for multi-slice; v4 and v5p use megacore (one device per
  chip, as on the hardware);
* a GPU node, ``h100:8``, ``a100-80g:8``, ``a100-40g:8``, ``h200:8`` (the CUDA PJRT plugin compiles for a device
  described by one of our ``gpu_targets/*.txtpb`` files; needs the ``gpu-aot`` extra; no GPU, driver or ptxas).

Each target carries its chip's published figures (:data:`calico_jax.parallel.chips.CHIPS`); on GPU, ``hbm_gib`` is the
device memory of the target's description file times JAX's preallocation fraction (``XLA_PYTHON_CLIENT_MEM_FRACTION``,
default 0.75).
"""
from __future__ import annotations

import dataclasses
import os
import re
from importlib import resources
from typing import Any

from calico_jax.parallel.chips import Chip, chip_for

GPU_MEM_FRACTION_DEFAULT = 0.75      # jax's default XLA_PYTHON_CLIENT_MEM_FRACTION


# --target GPU names -> description files (package data, written from the data sheets; GpuTargetConfigProto text
# in the schema of the pinned jaxlib 0.10.2).
GPU_TARGETS = {"h100": "h100_sxm_80gb", "h200": "h200_sxm_141gb", "a100-80g": "a100_sxm_80gb",
               "a100": "a100_sxm_80gb", "a100-40g": "a100_sxm_40gb"}
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e", "v5litepod")
_MEGACORE = ("v4", "v5p")


class TargetError(ValueError):
    """A bad ``--target`` or a missing extra (the message says which to install)."""


@dataclasses.dataclass
class Target:
    spec: str                        # as given
    platform: str                    # "cpu" | "tpu" | "cuda"
    devices: list
    chip: Chip | None                # None: no published figures (cpu)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def memory_bytes(self) -> float:
        return self.chip.hbm_gib * 1024 ** 3 if self.chip and self.chip.hbm_gib else 0.0

    def describe(self) -> str:
        kind = self.devices[0].device_kind if self.devices else "?"
        return f"{self.spec} ({self.num_devices} x {kind})"


def aot_environment() -> None:
    """Environment for compiling without hardware, set before jax initialises: no TPU/CUDA backend probing (the
    topology devices need neither), libtpu's lock file not taken (a second process would fail on it)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    import sys
    if "jax" in sys.modules:   # jax reads JAX_PLATFORMS at import; backends start later, on first use
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def _need(module: str, extra: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise TargetError(f"this target needs the {extra!r} extra: pip install -c .ci/constraints.txt "
                          f"-e '.[{extra}]'")


def gpu_description(name: str) -> str:
    """The GpuTargetConfigProto text of a ``--target`` GPU name (``h100``, ``a100-40g``, ...)."""
    if name not in GPU_TARGETS:
        raise TargetError(f"--target {name}: unknown GPU; known: {sorted(GPU_TARGETS)}")
    return resources.files("calico_jax.plans").joinpath(f"gpu_targets/{GPU_TARGETS[name]}.txtpb").read_text()


def _gpu_field(text: str, field: str) -> str:
    m = re.search(rf"\b{field}:\s*\"?([^\"\n]+)\"?", text)
    if m is None:
        raise TargetError(f"GPU description lacks {field}")
    return m.group(1).strip()


def parse(spec: str) -> Target:
    """``--target`` -> the devices to compile for (see module doc)."""
    head, _, count = spec.partition(":")
    head = head.lower()
    if head == "cpu":
        import jax
        n = int(count or 0)
        devices = jax.devices("cpu")
        if n > len(devices):
            raise TargetError(f"--target {spec}: only {len(devices)} CPU devices (set jax_num_cpu_devices first)")
        return Target(spec, "cpu", devices[:n or len(devices)], None)
    if head in GPU_TARGETS:
        if not count.isdigit() or int(count) < 1:
            raise TargetError(f"--target {spec}: expected {head}:N (N GPUs in one node)")
        _need("jax_plugins.xla_cuda12", "gpu-aot")
        from jax.experimental import topologies
        text = gpu_description(head)
        topo = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{int(count)}", target_config=text)
        mem = int(_gpu_field(text, "device_memory_size"))
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION_DEFAULT))
        kind = topo.devices[0].device_kind
        chip = dataclasses.replace(chip_for(kind) or Chip(kind, 0.0, 0.0, 0.0, 0.0), hbm_gib=mem * fraction / 1024 ** 3)
        return Target(spec, "cuda", list(topo.devices), chip)
    if head in TPU_GENERATIONS:
        _need("libtpu", "tpu-aot")
        from jax.experimental import topologies
        shape, _, opts = count.partition(",")
        kwargs: dict[str, Any] = {}
        for opt in filter(None, opts.split(",")):
            key, _, val = opt.partition("=")
            if key != "slices" or not val.isdigit():
                raise TargetError(f"--target {spec}: unknown option {opt!r} (slices=N)")
            kwargs["num_slices"] = int(val)
        if head in _MEGACORE:
            kwargs["chip_config_name"] = "megacore"
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{head}:{shape}", **kwargs)
        except Exception as e:  # noqa: BLE001 -- libtpu says what it does not know; keep its words
            raise TargetError(f"--target {spec}: {str(e).splitlines()[0]}") from None
        kind = topo.devices[0].device_kind
        return Target(spec, "tpu", list(topo.devices), chip_for(kind))
    raise TargetError(f"--target {spec}: expected cpu:N, a TPU topology ({', '.join(TPU_GENERATIONS)}, e.g. "
                      f"v5p:2x2x1) or a GPU node ({', '.join(sorted(GPU_TARGETS))}, e.g. h100:8)")
