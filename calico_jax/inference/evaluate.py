"""Score a CALICO checkpoint on MixedParts-style pairs in the paper's table layout.

    python -m calico_jax.evaluate --ckpt DIR --pairs PAIRS.json --images DIR [--limit N] --out report.json
    python -m calico_jax.evaluate --predictions PRED.json --pairs PAIRS.json --out report.json   # no model

Runs batched, jit-compiled inference (:class:`calico_jax.inference.predictor.Predictor`) over the pairs file's
samples (their
own prompts; any number of images per sample), then AP50 / mIoU / Recall / SS / S-IoU per task and their
unweighted mean (:mod:`calico_jax.eval.metrics`). ``--protocol calico|glamm|osprey`` picks a preset of the metric
switches (documented there); each switch flag given on top overrides it. Writes ``report.json`` (metrics in
percent, the protocol, the switches that differ from it and every switch) and prints the table;
``--save_predictions`` keeps the predictions (masks as COCO RLE at the original size) so they can be re-scored
with other switches via ``--predictions``; ``--overlays DIR`` draws the first ``--num_overlays`` samples of
each task.

Predictions file: ``{"format": "calico_jax.predictions", "version": 1, "pairs": path, "samples": [{"id", "task",
"answer", "masks": [{"label", "image", "score", "rle"}]}]}`` (``image`` = 0-based position in the sample).

At scale (:mod:`calico_jax.inference.eval_run`): ``--mesh '{"data": 4, "tensor": 2}'`` runs each batch on a mesh
of this process's devices (weights placed by the training rules, rows split over ``data``), ``--dtype bfloat16``
casts the weights; several processes (``python -m calico_jax.launch --local 2 -- -m calico_jax.evaluate ...``)
each predict a block of the batches and process 0 scores. Predictions stream to ``PRED.parts/`` batch by batch, so
rerunning an interrupted command resumes it. The persistent compilation cache is on
(``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/calico_jax/jax``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from calico_jax.core.fs import write_atomic
from calico_jax.data.pairs_io import read_pairs
from calico_jax.data.rle import decode
from calico_jax.eval.masks import Mask, SampleResult
from calico_jax.eval.metrics import PROTOCOLS, MetricConfig, by_image_count, evaluate
from calico_jax.eval.report import format_table, write_report
from calico_jax.inference.eval_run import Run
from calico_jax.parallel import distributed

PRED_FORMAT = "calico_jax.predictions"


def gt_results(pairs, samples: list[dict], predictions: dict[str, dict]):
    """Pairs samples + {sample id: prediction record} -> SampleResults (a sample without a prediction has none)."""
    out = []
    for s in samples:
        gt = [Mask(image=g["image"], label=g["label"], rle=pairs.masks[g["mask"]]["rle"]) for g in s["segs"]]
        rec = predictions.get(s["id"], {"masks": []})
        pred = [Mask(image=m["image"], label=m["label"], rle=m["rle"], score=float(m.get("score", 1.0)))
                for m in rec["masks"]]
        out.append(SampleResult(id=s["id"], task=s["task"], num_images=len(s["images"]), gt=gt, pred=pred))
    return out


def _check_mask(m, where: str) -> None:
    """One predicted mask record's schema: label (str), image (int), optional score (number), rle {size, counts}."""
    if not isinstance(m, dict):
        raise ValueError(f"{where}: a {type(m).__name__}, not an object")
    missing = [k for k in ("label", "image", "rle") if k not in m]
    if missing:
        raise ValueError(f"{where} misses {missing}")
    if not isinstance(m["label"], str):
        raise ValueError(f"{where}.label: expected a string, got {m['label']!r}")
    if not isinstance(m["image"], int) or isinstance(m["image"], bool) or m["image"] < 0:
        raise ValueError(f"{where}.image: expected an image index >= 0, got {m['image']!r}")
    if "score" in m and (not isinstance(m["score"], (int, float)) or isinstance(m["score"], bool)):
        raise ValueError(f"{where}.score: expected a number, got {m['score']!r}")
    rle = m["rle"]
    size = rle.get("size") if isinstance(rle, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)) \
            or not isinstance(rle.get("counts"), (str, list)):
        raise ValueError(f"{where}.rle: expected {{'size': [H, W], 'counts': str}}, got {str(rle)[:80]}")
    try:
        decoded = decode(rle)
    except Exception as e:   # pycocotools raises several kinds on malformed counts
        raise ValueError(f"{where}.rle: cannot decode ({type(e).__name__}: {e})") from None
    if decoded.shape != tuple(size):
        raise ValueError(f"{where}.rle: counts describe {decoded.shape}, size says {tuple(size)}")


def read_predictions(path: Path) -> dict[str, dict]:
    """A ``--save_predictions`` file -> {sample id: record}; every schema problem is a ValueError naming
    the file and the field (``samples[3].masks[0].rle``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--predictions {path}: cannot read ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PRED_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"--predictions {path}: format is {got!r}, expected {PRED_FORMAT!r}")
    if not isinstance(data.get("samples"), list):
        raise ValueError(f"--predictions {path}: 'samples' must be a list, got {data.get('samples')!r}"[:200])
    out = {}
    for n, rec in enumerate(data["samples"]):
        where = f"--predictions {path}: samples[{n}]"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: a {type(rec).__name__}, not an object")
        for key in ("id", "masks"):
            if key not in rec:
                raise ValueError(f"{where} has no {key!r}")
        if not isinstance(rec["id"], str) or not isinstance(rec["masks"], list):
            raise ValueError(f"{where}: 'id' must be a string and 'masks' a list")
        for j, m in enumerate(rec["masks"]):
            _check_mask(m, f"{where}.masks[{j}]")
        out[rec["id"]] = rec
    return out


def check_against_pairs(path, preds: dict[str, dict], pairs) -> None:
    """Each predicted mask points at one of its sample's images and has that image's size."""
    by_id = {s["id"]: s for s in pairs.samples}
    for sid, rec in preds.items():
        s = by_id[sid]
        for j, m in enumerate(rec["masks"]):
            where = f"--predictions {path}: sample {sid!r} masks[{j}]"
            if m["image"] >= len(s["images"]):
                raise ValueError(f"{where}.image = {m['image']}: the sample has {len(s['images'])} images")
            im = pairs.images[s["images"][m["image"]]]
            if "height" in im and list(m["rle"]["size"]) != [im["height"], im["width"]]:
                raise ValueError(f"{where}.rle: size {m['rle']['size']} but the image is "
                                 f"{im['height']}x{im['width']}")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.evaluate", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="exported checkpoint or training workdir")
    src.add_argument("--predictions", help="score a saved predictions file instead of running a model")
    ap.add_argument("--pairs", required=True, help="pairs file (python -m calico_jax.data.pairs) or packed "
                                                   "directory (python -m calico_jax.data.pack)")
    ap.add_argument("--images", default=None, help="images root (default: the pairs file's sources)")
    ap.add_argument("--limit", type=int, default=0, help="first N samples only (0 = all)")
    ap.add_argument("--out", required=True, help="report.json")
    ap.add_argument("--save_predictions", default=None, help="also write the predictions file here")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--mesh", default=None,
                    help="mesh of this process's devices as JSON, e.g. '{\"data\": 4, \"tensor\": 2}' "
                         "(default: one device)")
    ap.add_argument("--dtype", default=None, help="weights' dtype for inference: float32, bfloat16, float16 "
                                                  "(default: the checkpoint's)")
    ap.add_argument("--overlays", default=None, help="directory for prediction|ground-truth overlays")
    ap.add_argument("--num_overlays", type=int, default=4, help="samples drawn per task")
    ap.add_argument("--no_progress", dest="progress", action="store_false")
    ap.add_argument("--protocol", choices=tuple(PROTOCOLS), default="calico",
                    help="metric preset: calico (ours), glamm (GLaMM's GCG AP50/mIoU/Recall), osprey (Osprey's "
                         "SS/S-IoU); the switches below override it")
    for f in dataclasses.fields(MetricConfig):
        if f.name == "protocol":
            continue
        kind = _bool if isinstance(f.default, bool) else type(f.default)
        ap.add_argument(f"--{f.name}", type=kind, default=None,
                        help=f"metric switch (default: the preset's; calico {f.default})")
    distributed.add_arguments(ap)
    return ap


def metric_config(args):
    """``--protocol``'s preset with the switches given on the command line on top."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MetricConfig)
             if f.name != "protocol" and getattr(args, f.name) is not None}
    return MetricConfig.preset(args.protocol, **given)


def _load_predictions(args, pairs, samples, run: Run) -> dict | None:
    """``--predictions`` read back (every id must be in the pairs file), else the model's, saved if asked (None on
    a process other than 0 of a job)."""
    if args.predictions:
        preds = read_predictions(Path(args.predictions))
        unknown = sorted(set(preds) - {s["id"] for s in pairs.samples})
        if unknown:
            raise ValueError(f"--predictions {args.predictions}: {len(unknown)} sample ids not in {args.pairs}, "
                             f"e.g. {unknown[:3]}")
        check_against_pairs(args.predictions, preds, pairs)
        missing = sum(s["id"] not in preds for s in samples)
        if missing:
            print(f"warning: {missing} of {len(samples)} samples have no prediction (scored as empty)",
                  file=sys.stderr)
        return preds
    preds = run.predict(pairs, samples)
    if preds is None:
        return None
    if args.save_predictions:
        out = Path(args.save_predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": PRED_FORMAT, "version": 1, "pairs": str(Path(args.pairs).absolute()),
                "samples": list(preds.values())}
        write_atomic(out, json.dumps(data, ensure_ascii=False) + "\n")
    return preds


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from calico_jax.eval.sentence import SentenceEncoder, SentenceModelError  # after argparse: imports jax
    run, ok = Run(args), False
    try:
        from calico_jax.inference.placement import parse_dtype, parse_mesh  # after argparse: imports jax
        args.mesh, args.dtype = parse_mesh(args.mesh), parse_dtype(args.dtype)
        if args.ckpt and args.batch_size < 1:
            raise ValueError(f"--batch_size {args.batch_size}: must be >= 1")
        metric_cfg = metric_config(args)
        pairs = read_pairs(args.pairs, images_root=args.images)
        samples = pairs.samples[:args.limit] if args.limit > 0 else pairs.samples
        if not samples:
            raise ValueError(f"{args.pairs}: no samples to evaluate")
        if args.ckpt:
            run.start()
        preds = _load_predictions(args, pairs, samples, run)
        if preds is None:   # another process of the job: process 0 scores
            ok = True
            return 0
        encoder = SentenceEncoder()
        results = gt_results(pairs, samples, preds)
        report = evaluate(results, metric_cfg, encoder.similarity)
        if len({r.num_images for r in results}) > 1:   # a set that mixes image counts: each N on its own too
            report["per_images"] = by_image_count(results, metric_cfg, encoder.similarity)
        report["source"] = {"ckpt": args.ckpt, "predictions": args.predictions, "pairs": str(args.pairs)}
        report["generation"] = {"truncated": int(sum(bool(p.get("truncated")) for p in preds.values())),
                                "unrouted_seg": int(sum(p.get("num_unrouted_seg", 0) for p in preds.values())),
                                "predicted_masks": int(sum(len(p["masks"]) for p in preds.values())),
                                "gt_masks": int(sum(len(s["segs"]) for s in samples))}
        write_report(Path(args.out), report)
        ok = True
    except (FileNotFoundError, ValueError, SentenceModelError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.ckpt:
            run.finish(ok)
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
