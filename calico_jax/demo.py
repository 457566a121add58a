"""``make demo``: synthetic part data -> train a small CALICO on CPU -> evaluate on held-out pairs.

    python -m calico_jax.demo [--workdir runs/demo] [--config configs/demo.py] [--config.key=value ...]

Writes into the workdir: ``data/{train,heldout}/`` (synthetic images, annotations, pairs), the training run
(``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``), ``training_curve.png``, ``model/`` (the
exported checkpoint, usable with ``python -m calico_jax.predict --ckpt``), ``report.json`` + ``predictions.json``
(held-out evaluation), ``overlays/`` (prediction | ground truth for a few pairs per task) and ``demo_summary.json``
(timings, the thresholds and whether they were met). Rerunning resumes/reuses what is already there.

The config file may define ``SYNTHETIC = {"train": {...}, "heldout": {...}}``: keyword arguments of
:func:`calico_jax.data.synthetic.generate` per split (``num_images``, ``seed`` and the generator's options).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

THRESHOLDS = {"mIoU": 50.0, "SS": 70.0}       # on the mean over tasks, in percent (issue: "visibly learns")
DEFAULT_SYNTHETIC = {"train": {"num_images": 400, "seed": 0}, "heldout": {"num_images": 80, "seed": 1}}


def _config_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_calico_demo_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_split(root: Path, options: dict, pair_seed: int) -> Path:
    """Synthetic images + annotations + pairs under ``root`` (atomic; reused when present) -> pairs file."""
    from calico_jax.data import pairs, synthetic
    from calico_jax.pretrained import atomic_directory

    if not (root / "pairs.json").is_file():
        with atomic_directory(root, overwrite=root.exists()) as tmp:
            opts = dict(options)
            ann = synthetic.generate(tmp, opts.pop("num_images"), seed=opts.pop("seed"), progress=True, **opts)
            rc = pairs.main(["--coco", str(ann), "--images", str(root / "images"), "--out", str(tmp / "pairs.json"),
                             "--seed", str(pair_seed), "--check_images", "none"])
            if rc != 0:
                raise RuntimeError(f"building the pairs file for {root} failed (rc {rc})")
    return root / "pairs.json"


def main(argv: list[str] | None = None) -> int:
    from calico_jax.train import config as config_lib

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = config_lib.split_overrides(argv)
    ap = argparse.ArgumentParser(prog="python -m calico_jax.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--config", default="configs/demo.py")
    ap.add_argument("--num_overlays", type=int, default=2, help="overlay samples per task")
    args = ap.parse_args(rest)

    from calico_jax import evaluate, export
    from calico_jax.train import loop, state as state_lib
    from calico_jax.viz import plot_curves

    t_start = time.perf_counter()
    workdir = Path(args.workdir).absolute()
    cfg_path = Path(args.config)
    cfg = config_lib.load(cfg_path, overrides)
    splits = {**DEFAULT_SYNTHETIC, **getattr(_config_module(cfg_path), "SYNTHETIC", {})}
    timings = {}

    t = time.perf_counter()
    train_pairs = make_split(workdir / "data" / "train", splits["train"], cfg.seed)
    heldout_pairs = make_split(workdir / "data" / "heldout", splits["heldout"], cfg.seed + 1)
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = cfg.replace(data=cfg.data.replace(pairs=str(train_pairs)))
    summary = loop.train(cfg, workdir)
    timings["train_s"] = time.perf_counter() - t
    plot_curves(workdir / "metrics.jsonl", workdir / "training_curve.png")

    t = time.perf_counter()
    params = state_lib.combine(summary["state"]["params"], summary["frozen"])
    tok_dir, icfg = export.inference_setup(cfg, workdir)
    model_dir = export.save(workdir / "model", summary["trainer"].task.module, params, tok_dir, icfg,
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
              "num_heldout_samples": report["num_samples"]}
    config_lib.write_atomic(workdir / "demo_summary.json", json.dumps(result, indent=2) + "\n")
    print(f"\ndemo: {summary['step']} steps, data {timings['data_s']:.0f} s, training {timings['train_s']:.0f} s, "
          f"evaluation {timings['evaluate_s']:.0f} s, total {timings['total_s'] / 60:.1f} min")
    for k, v in THRESHOLDS.items():
        print(f"  mean {k} = {mean.get(k)} (target >= {v}): {'met' if met[k] else 'NOT met'}")
    print(f"outputs in {workdir}: report.json, metrics.jsonl, training_curve.png, overlays/, model/")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
