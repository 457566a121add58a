"""``python -m bench --suite gpu [--tiny]``: what one accelerator does with CALICO, in one call and one table.

1. **Train step**, bf16: the largest CALICO config of a ladder that runs on this device (``calico_7b`` at 2, then 1
   sample per step; the tiny model in its config's fp32 with ``--tiny``), a few steps of the real training loop on
   the synthetic set (random weights: speed, not learning): median step time after the first, MFU (the compiled
   step's FLOPs over the chip's peak), compile time, and memory: the compiled program's plan next to the device's
   measured peak.
2. **Predict**: that model exported and loaded by :func:`~calico_jax.inference.predictor.load_predictor`;
   latency per pair at batch 1 and samples/s at the largest batch of a ladder that runs (the tiny model: 4),
   each with its compile time (the first call) apart.

A rung that runs out of memory is recorded as such and the next one is tried. ``--tiny`` runs end to end on a CPU
(the test suite does); the full suite is meant for a GPU or TPU. Nothing here needs an accelerator to import.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

BF16 = {"dtype": "bfloat16", "frozen_dtype": "bfloat16"}   # the accelerator rungs (--tiny keeps the config's fp32)
# (config file, overrides) from the largest to the smallest; the first that runs is measured.
TRAIN_LADDER = [("configs/calico_7b.py", {"batch_size": 2, **BF16}),
                ("configs/calico_7b.py", {"batch_size": 1, **BF16})]
TINY_TRAIN = [("configs/tiny.py", {"batch_size": 2})]
PREDICT_BATCHES = (64, 32, 16, 8, 4, 2)
TINY_PREDICT_BATCHES = (4,)
STEPS, TINY_STEPS = 8, 3
# Every rung: one device, no accumulation, a small synthetic set, no periodic work inside the timed steps.
COMMON = {"optim.grad_accum": 1, "num_devices": 1, "mesh": '{"data": 1, "fsdp": 1, "tensor": 1}',
          "data.synthetic.num_images": 16, "data.synthetic_heldout.num_images": 4, "data.worker_count": 0,
          "eval_every": 0, "log_every": 1, "progress": "false"}


def out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def device_peak_bytes() -> int | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def train_row(config: str, overrides: dict, steps: int, workdir: Path) -> dict:
    from calico_jax.plans.train_plan import memory_sizes
    from calico_jax.train import config as config_lib
    from calico_jax.train import loop, tasks

    over = {**COMMON, **overrides, "total_steps": steps, "checkpoint_every": steps}
    cfg = config_lib.load(config, [(k, str(v)) for k, v in over.items()])
    task = tasks.build(cfg, workdir)
    summary = loop.train(cfg, workdir, task=task)
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in recs if r["step"] > 1]
    plan = sum(memory_sizes(p)["peak"] for p in summary["compiled"].parts.values())
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    return {"what": "train step", "config": cfg.name, "batch": cfg.batch_size, "compile_s": summary["compile_s"],
            "time_s": statistics.median(r["step_time_s"] for r in timed),
            "samples_per_s": statistics.median(r["examples_per_s"] for r in timed),
            "mfu": statistics.median(mfu) if mfu else None, "plan_bytes": plan, "peak_bytes": device_peak_bytes(),
            "_state": summary, "_task": task, "_workdir": workdir}


def predict_rows(train: dict, batches: tuple[int, ...]) -> list[dict]:
    import numpy as np
    from PIL import Image

    from calico_jax.core.params import combine
    from calico_jax.inference import export
    from calico_jax.inference.ask import build_question
    from calico_jax.inference.predictor import load_predictor

    summary, task, workdir = train["_state"], train["_task"], train["_workdir"]
    model_dir = export.save(workdir / "model", task.model_config,
                            combine(summary["state"]["params"], summary["frozen"]), task.tokenizer_dir)
    predictor = load_predictor(model_dir)
    files = sorted((workdir / "data" / "train" / "images").iterdir())[:2]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    pair = (images, build_question(2, task="common_parts"))
    rows = []
    for b in (1, *batches):
        try:
            t0 = time.perf_counter()
            predictor.predict([pair] * b, batch_size=b)                  # compiles this batch's programs
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                predictor.predict([pair] * b, batch_size=b)
                times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 -- only running out of memory moves on to a smaller batch
            if not out_of_memory(e):
                raise
            rows.append({"what": "predict", "config": train["config"], "batch": b, "note": "out of memory"})
            continue
        t = statistics.median(times)
        rows.append({"what": "predict", "config": train["config"], "batch": b, "compile_s": compile_s,
                     "time_s": t, "samples_per_s": b / t, "peak_bytes": device_peak_bytes()})
        if b > 1:   # the largest batch that ran
            break
    return rows


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / 1024 ** 3:.2f}"


def table(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}", "",
             "| what | config | batch | compile s | time s | samples/s | MFU | memory GiB: plan / measured peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("note"):
            lines.append(f"| {r['what']} | {r['config']} | {r['batch']} | {r['note']} | | | | |")
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.0f} %"
        lines.append(f"| {r['what']} | {r['config']} | {r['batch']} | {r['compile_s']:.1f} | {r['time_s']:.3f} | "
                     f"{r['samples_per_s']:.2f} | {mfu} | {_gib(r.get('plan_bytes'))} / {_gib(r.get('peak_bytes'))} |")
    return "\n".join(lines) + "\n"


def run(tiny: bool, out: str | None) -> str:
    import jax

    root = Path(tempfile.mkdtemp(prefix="calico-bench-gpu-"))
    rows, train = [], None
    for k, (config, overrides) in enumerate(TINY_TRAIN if tiny else TRAIN_LADDER):
        try:
            train = train_row(config, overrides, TINY_STEPS if tiny else STEPS, root / f"train{k}")
            break
        except Exception as e:  # noqa: BLE001 -- only running out of memory moves on to a smaller rung
            if not out_of_memory(e):
                raise
            rows.append({"what": "train step", "config": Path(config).stem, "batch": overrides["batch_size"],
                         "note": "out of memory"})
    if train is None:
        raise SystemExit("bench gpu: no rung of the ladder fits this device")
    rows.append({k: v for k, v in train.items() if not k.startswith("_")})
    rows += predict_rows(train, TINY_PREDICT_BATCHES if tiny else PREDICT_BATCHES)
    d = jax.devices()[0]
    device = f"{d.platform} {d.device_kind} ({jax.device_count()} device(s) visible, one used)"
    text = table(rows, device)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": device, "tiny": tiny, "rows": rows}, indent=2) + "\n")
        path.with_suffix(".md").write_text(text)
    return text
