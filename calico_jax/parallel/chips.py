"""Published per-chip figures (dense bf16 peak, HBM size and bandwidth, interconnect bandwidth), keyed by the exact
``device_kind`` the runtime reports: the plans' roofline compares with them and the training log's MFU divides by the
peak. ``hbm_gib`` is what a program may use: on TPU the compiler's own limit (from its RESOURCE_EXHAUSTED messages:
15.75 GiB of a 16 GiB v5e); on GPU it depends on the device's memory and JAX's preallocation fraction, so it is 0 here
and filled in by :mod:`calico_jax.plans.targets`.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one chip (per device as JAX sees it)."""
    name: str
    peak_tflops: float               # dense bf16
    hbm_gib: float                   # memory a program may use (see module doc)
    hbm_gbps: float                  # HBM bandwidth, GB/s
    link_gbps: float                 # chip-to-chip bandwidth one way, GB/s (ICI or NVLink); roofline only


# device_kind -> figures. TPU: Cloud TPU system-architecture pages (v5e 197 TF/s, 819 GB/s, ICI 1600 Gbit/s; v5p
# 459, 2765, 4800 Gbit/s; v4 275, 1200, 2400 Gbit/s; v6e 918, 1640, 3584 Gbit/s). GPU: NVIDIA data sheets (H100
# SXM 989 TF/s dense bf16, 3.35 TB/s; H200 989, 4.8 TB/s; A100 312, 2.039 TB/s (80 GB) / 1.555 TB/s (40 GB);
# NVLink 900 / 600 GB/s both ways). GPU memory sizes come from the gpu_targets files at plan time.
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("TPU v5 lite", 197.0, 15.75, 819.0, 200.0),      # v5e
    Chip("TPU v5", 459.0, 95.74, 2765.0, 600.0),          # v5p
    Chip("TPU v5p", 459.0, 95.74, 2765.0, 600.0),
    Chip("TPU v4", 275.0, 30.75, 1200.0, 300.0),          # megacore: one device per chip
    Chip("TPU v6 lite", 918.0, 31.25, 1640.0, 448.0),     # v6e
    Chip("NVIDIA H100 80GB HBM3", 989.0, 0.0, 3350.0, 450.0),
    Chip("NVIDIA H200", 989.0, 0.0, 4800.0, 450.0),
    Chip("NVIDIA A100-SXM4-80GB", 312.0, 0.0, 2039.0, 300.0),
    Chip("NVIDIA A100-SXM4-40GB", 312.0, 0.0, 1555.0, 300.0),
)}


def chip_for(device_kind: str) -> Chip | None:
    """Exact ``device_kind`` lookup (a substring match took v5p's "TPU v5" for v5e's figures)."""
    return CHIPS.get(device_kind)
