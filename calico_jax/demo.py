"""``make demo``: synthetic part data -> train a small CALICO on CPU -> evaluate on held-out pairs.

    python -m calico_jax.demo [--workdir runs/demo] [--config configs/demo.py] [--config.key=value ...]

Writes into the workdir: ``data/{train,heldout}/`` (synthetic images, annotations, pairs: the config's
``data.synthetic`` / ``data.synthetic_heldout``, built by the training task), the training run (``config.json``,
``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``), ``training_curve.png``, ``model/`` (the exported
checkpoint, usable with ``python -m calico_jax.predict --ckpt``), ``report.json`` + ``predictions.json``
(held-out evaluation), ``overlays/`` (prediction | ground truth for a few pairs per task) and
``demo_summary.json`` (timings, the thresholds and whether they were met). Rerunning resumes/reuses what is
already there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from calico_jax.core.fs import write_atomic
from calico_jax.core.params import combine
from calico_jax.core.viz import plot_curves
from calico_jax.inference import evaluate, export
from calico_jax.train import config as config_lib

# On the mean over tasks, in percent ("visibly learns"). Across hosts the demo's means moved by about 2 points
# (mIoU 59.1-61.2, SS 91.3-93.2 on three hosts); the bar sits ~9 points (mIoU) and ~21 points (SS) below the
# lowest of them, so a host change does not flip it while a model that learned nothing still fails it.
THRESHOLDS = {"mIoU": 50.0, "SS": 70.0}


def host_record() -> dict:
    """What a run's numbers depend on besides the code: results repeat bit for bit on one host, not across."""
    import os
    import platform

    import jax
    import jaxlib

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = config_lib.split_overrides(argv)
    ap = argparse.ArgumentParser(prog="python -m calico_jax.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--config", default="configs/demo.py")
    ap.add_argument("--num_overlays", type=int, default=2, help="overlay samples per task")
    args = ap.parse_args(rest)
    # after argparse: --help stays fast (the training task, data pipeline, optimizer and checkpointer)
    from calico_jax.train import loop, tasks

    t_start = time.perf_counter()
    workdir = Path(args.workdir).absolute()
    cfg = config_lib.load(args.config, overrides)
    if cfg.data.pairs:
        ap.error("the demo trains on its synthetic sets: data.pairs must be empty")
    timings = {}

    t = time.perf_counter()
    task = tasks.build(cfg, workdir)          # builds data/{train,heldout} and the tokenizer on first use
    timings["data_s"] = time.perf_counter() - t
    heldout_pairs = workdir / "data" / "heldout" / "pairs.json"

    t = time.perf_counter()
    summary = loop.train(cfg, workdir, task=task)
    timings["train_s"] = time.perf_counter() - t
    plot_curves(workdir / "metrics.jsonl", workdir / "training_curve.png")

    t = time.perf_counter()
    params = combine(summary["state"]["params"], summary["frozen"])
    model_dir = export.save(workdir / "model", task.model_config, params, task.tokenizer_dir,
                            {"workdir": str(workdir)}, overwrite=True)
    rc = evaluate.main(["--ckpt", str(model_dir), "--pairs", str(heldout_pairs), "--out", str(workdir / "report.json"),
                        "--save_predictions", str(workdir / "predictions.json"), "--overlays",
                        str(workdir / "overlays"), "--num_overlays", str(args.num_overlays), "--batch_size", "8"])
    timings["evaluate_s"] = time.perf_counter() - t
    if rc != 0:
        return rc
    report = json.loads((workdir / "report.json").read_text())
    mean = report["mean"]
    met = {k: (mean.get(k) is not None and mean[k] >= v) for k, v in THRESHOLDS.items()}
    timings["total_s"] = time.perf_counter() - t_start
    result = {"timings": timings, "steps": summary["step"], "mean": mean, "thresholds": THRESHOLDS, "met": met,
              "num_heldout_samples": report["num_samples"], "host": host_record()}
    write_atomic(workdir / "demo_summary.json", json.dumps(result, indent=2) + "\n")
    print(f"\ndemo: {summary['step']} steps, data {timings['data_s']:.0f} s, training {timings['train_s']:.0f} s, "
          f"evaluation {timings['evaluate_s']:.0f} s, total {timings['total_s'] / 60:.1f} min")
    for k, v in THRESHOLDS.items():
        print(f"  mean {k} = {mean.get(k)} (target >= {v}): {'met' if met[k] else 'NOT met'}")
    print(f"outputs in {workdir}: report.json, metrics.jsonl, training_curve.png, overlays/, model/")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
