"""What the loop logs: ``metrics.jsonl`` (+ TensorBoard scalars) and the per-step record with throughput and MFU."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from calico_jax.core.fs import write_atomic
from calico_jax.data.records import SKIP_KINDS
from calico_jax.parallel.chips import CHIPS

METRIC_KEYS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "lr", "grad_norm")
# Dense bf16 peak TFLOP/s per device by the exact ``device_kind`` (a substring match took v5p, whose kind is
# "TPU v5", for v5e's "TPU v5 lite"): the chips of the AOT targets plus a few PCIe/inference parts.
PEAK_TFLOPS = {**{kind: chip.peak_tflops for kind, chip in CHIPS.items()},
               "NVIDIA H100 PCIe": 756.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA A100-PCIE-40GB": 312.0,
               "NVIDIA L4": 121.0}


class MetricsFile:
    """``metrics.jsonl``: one complete line per logged step. On resume, lines after the restored step
    (and any torn last line) are dropped atomically, so the file always reads as one clean run.
    With ``tensorboard_dir`` the numeric values also go to TensorBoard scalars (tensorboardX); its
    ``purge_step`` hides events a resumed run replays, for the same reason."""

    def __init__(self, path: Path, resume_step: int, tensorboard_dir: Path | None = None):
        self.path = path
        self.tb = None
        if tensorboard_dir is not None and jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        write_atomic(path, "".join(f"{x}\n" for x in kept))
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")   # one write of a whole line, then flush
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])
            self.tb.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def peak_tflops(cfg) -> float:
    """Per-device peak for MFU: ``cfg.peak_tflops``, else the device-kind table, else 0 (no MFU)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops
    return PEAK_TFLOPS.get(jax.devices()[0].device_kind, 0.0)


def data_skip_record(task) -> dict:
    """``data_skipped_<kind>``: training records skipped so far (bad or oversized samples), summed over the
    processes (every process must call this at the same step: it is a collective with several)."""
    skips = task.data_skips() if hasattr(task, "data_skips") else {}
    kinds = [*SKIP_KINDS, "other"]
    vec = np.array([skips.get(k, 0) for k in SKIP_KINDS]
                   + [sum(v for k, v in skips.items() if k not in SKIP_KINDS)], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        vec = np.asarray(multihost_utils.process_allgather(vec)).reshape(-1, len(kinds)).sum(0)
    return {f"data_skipped_{k}": int(v) for k, v in zip(kinds, vec) if v}


def step_record(step: int, m: dict, dt: float, skipped: int, cfg, task, flops: float, peak: float,
                num_devices: int) -> dict:
    """One ``metrics.jsonl`` line: the step's losses and metrics, time, throughput, FLOPs and MFU."""
    n = cfg.batch_size
    rec = {"step": step, **{k: float(m[k]) for k in METRIC_KEYS}, "step_time_s": dt, "examples_per_s": n / dt,
           "skipped": skipped, **{k: float(v) for k, v in m.items() if k not in METRIC_KEYS}}
    if task.tokens_per_example:
        rec["tokens_per_s"] = n * task.tokens_per_example / dt
    if task.images_per_example:
        rec["images_per_s"] = n * task.images_per_example / dt
    if flops:
        rec["step_tflops"] = flops * num_devices / 1e12
        if peak:
            rec["mfu"] = flops / dt / (peak * 1e12)
    return rec
