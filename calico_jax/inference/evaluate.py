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
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from calico_jax.core.fs import write_atomic
from calico_jax.core.viz import overlay
from calico_jax.data.pairs_io import read_pairs
from calico_jax.data.processors import load_image
from calico_jax.data.rle import decode, encode
from calico_jax.eval.masks import Mask, SampleResult
from calico_jax.eval.metrics import PROTOCOLS, MetricConfig, evaluate
from calico_jax.eval.report import format_table, write_report
from calico_jax.eval.sentence import SentenceEncoder, SentenceModelError

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


def predict_samples(args, pairs, samples: list[dict]) -> dict[str, dict]:
    """Runs the model over ``samples`` -> {id: prediction record}; overlays for the first few."""
    from calico_jax.inference.predictor import load_predictor  # after argparse: --help stays fast (imports the models)

    overrides = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    predictor = load_predictor(args.ckpt, **overrides)
    records: dict[str, dict] = {}
    drawn: dict[str, int] = {}   # overlays per task
    chunk = max(args.batch_size * 8, 1)   # load images chunk by chunk: bounded memory on large sets
    from tqdm import tqdm
    bar = tqdm(total=len(samples), desc="evaluate", unit="sample", disable=not args.progress)
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        inputs = []
        for s in part:
            ims = []
            for k, i in enumerate(s["images"]):
                info = pairs.images[i]
                ims.append(load_image(pairs.image_path(s, k), (info["height"], info["width"])))
            inputs.append((ims, s["prompt"]))
        preds = predictor.predict(inputs, batch_size=args.batch_size)
        for s, (ims, _), p in zip(part, inputs, preds):
            records[s["id"]] = {"id": s["id"], "task": s["task"], "answer": p.answer, "truncated": p.truncated,
                                "num_unrouted_seg": p.num_unrouted,
                                "masks": [{"label": m.label, "image": m.image, "score": round(m.score, 6),
                                           "rle": encode(m.mask)} for m in p.masks]}
            if args.overlays and drawn.get(s["task"], 0) < args.num_overlays:
                drawn[s["task"]] = drawn.get(s["task"], 0) + 1
                _draw(Path(args.overlays), s, ims, p, pairs)
        bar.update(len(part))
    bar.close()
    return records


def _draw(root: Path, sample: dict, images, pred, pairs) -> None:
    """Prediction | ground truth side by side (captioned), one PNG per image of the sample."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        p = overlay(im, [(m.mask, m.label) for m in pred.masks if m.image == k])
        g = overlay(im, [(pairs.mask(s), s["label"])
                         for s in sample["segs"] if s["image"] == k])
        both = Image.new("RGB", (p.width + g.width + 8, max(p.height, g.height) + 20), "white")
        both.paste(p, (0, 20))
        both.paste(g, (p.width + 8, 20))
        draw = ImageDraw.Draw(both)
        draw.text((4, 4), "prediction", fill="black")
        draw.text((p.width + 12, 4), "ground truth", fill="black")
        both.save(root / f"{sample['id']}_image{k + 1}.png")
    (root / f"{sample['id']}.txt").write_text(f"prompt: {sample['prompt']}\npredicted: {pred.answer}\n"
                                              f"ground truth: {sample['answer']}\n", encoding="utf-8")


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
    ap.add_argument("--pairs", required=True, help="pairs file (python -m calico_jax.data.pairs)")
    ap.add_argument("--images", default=None, help="images root (default: the pairs file's sources)")
    ap.add_argument("--limit", type=int, default=0, help="first N samples only (0 = all)")
    ap.add_argument("--out", required=True, help="report.json")
    ap.add_argument("--save_predictions", default=None, help="also write the predictions file here")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=None)
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
    return ap


def metric_config(args):
    """``--protocol``'s preset with the switches given on the command line on top."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MetricConfig)
             if f.name != "protocol" and getattr(args, f.name) is not None}
    return MetricConfig.preset(args.protocol, **given)


def _load_predictions(args, pairs, samples) -> dict:
    """``--predictions`` read back (every id must be in the pairs file), else the model's, saved if asked."""
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
    preds = predict_samples(args, pairs, samples)
    if args.save_predictions:
        out = Path(args.save_predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": PRED_FORMAT, "version": 1, "pairs": str(Path(args.pairs).absolute()),
                "samples": list(preds.values())}
        write_atomic(out, json.dumps(data, ensure_ascii=False) + "\n")
    return preds


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        metric_cfg = metric_config(args)
        pairs = read_pairs(args.pairs, images_root=args.images)
        samples = pairs.samples[:args.limit] if args.limit > 0 else pairs.samples
        if not samples:
            raise ValueError(f"{args.pairs}: no samples to evaluate")
        preds = _load_predictions(args, pairs, samples)
        encoder = SentenceEncoder()
        report = evaluate(gt_results(pairs, samples, preds), metric_cfg, encoder.similarity)
        report["source"] = {"ckpt": args.ckpt, "predictions": args.predictions, "pairs": str(args.pairs)}
        report["generation"] = {"truncated": int(sum(bool(p.get("truncated")) for p in preds.values())),
                                "unrouted_seg": int(sum(p.get("num_unrouted_seg", 0) for p in preds.values())),
                                "predicted_masks": int(sum(len(p["masks"]) for p in preds.values())),
                                "gt_masks": int(sum(len(s["segs"]) for s in samples))}
        write_report(Path(args.out), report)
    except (FileNotFoundError, ValueError, SentenceModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
