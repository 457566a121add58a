"""Ask a CALICO checkpoint about a set of images and save its answer and masks.

    python -m calico_jax.predict --ckpt DIR --image A.jpg --image B.jpg --task common-parts --out OUT
    python -m calico_jax.predict --ckpt DIR --image A.jpg --image B.jpg --prompt "Which parts differ?" --out OUT

``--ckpt``: an exported/converted checkpoint or a training workdir (see
:func:`calico_jax.inference.predictor.load_predictor`).
``OUT`` (written atomically) gets ``answer.txt``, ``masks/NN_imageK_label.png`` (one binary PNG per mask, at the
input's size), ``overlay_imageK.png`` (the input with its coloured, labelled masks) and ``predictions.json``
(answer, prompt, images, and per mask: label, image index, score, COCO RLE, PNG name).

A ``--prompt`` without ``<image>`` gets the paper's image preamble ("The <image> (IMAGE1) and <image> (IMAGE2)
provide an overview of the pictures.") in front; with ``<image>`` slots, their number must equal the images'.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from calico_jax.core.fs import atomic_directory
from calico_jax.core.viz import overlay
from calico_jax.data.pairs import PREFIX, QUESTIONS, images_phrase
from calico_jax.data.processors import load_image
from calico_jax.data.rle import encode

TASK_NAMES = {"common-object": "common_object", "common-parts": "common_parts", "unique-parts": "unique_parts"}
DEFAULT_MAX_PIXELS = 64_000_000


class InputError(ValueError):
    """Bad user input; the message says what and where."""


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file -> RGB uint8 [H, W, 3] with its EXIF orientation applied; grayscale, palette, CMYK and
    alpha images are converted (alpha composited on white). Clear :class:`InputError` otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path}: no such file")
    if not path.is_file():
        raise InputError(f"image {path}: not a file")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                raise InputError(f"image {path}: {w}x{h} = {w * h / 1e6:.0f} MP is above --max_pixels "
                                 f"{max_pixels / 1e6:.0f} MP; downscale it or raise --max_pixels")
            return load_image(im)
    except UnidentifiedImageError:
        raise InputError(f"image {path}: not an image file PIL can read") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image {path}: {e}") from None
    except OSError as e:   # truncated or corrupt data
        raise InputError(f"image {path}: cannot decode ({e})") from None


def build_question(num_images: int, task: str | None = None, prompt: str | None = None) -> str:
    if task is not None:
        return PREFIX.format(images=images_phrase(num_images)) + QUESTIONS[TASK_NAMES.get(task, task)][0]
    prompt = (prompt or "").strip()
    if not prompt:
        raise InputError("--prompt is empty")
    slots = prompt.count("<image>")
    if slots == 0:
        return PREFIX.format(images=images_phrase(num_images)) + prompt
    if slots != num_images:
        raise InputError(f"--prompt has {slots} <image> slots but {num_images} --image files were given")
    return prompt


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "mask"


def write_outputs(out: Path, images: list[np.ndarray], paths: list[str], question: str, pred) -> None:
    """Writes the prediction files into the (empty, temporary) directory ``out``."""
    (out / "masks").mkdir()
    (out / "answer.txt").write_text(pred.answer + "\n", encoding="utf-8")
    records = []
    for k, m in enumerate(pred.masks):
        name = f"{k:02d}_image{m.image + 1}_{_slug(m.label)}.png"
        Image.fromarray(m.mask.astype(np.uint8) * 255).save(out / "masks" / name)
        rle = encode(m.mask)
        records.append({"label": m.label, "image": m.image, "score": round(m.score, 6), "rle": rle,
                        "file": f"masks/{name}"})
    for i, im in enumerate(images):
        mine = [(m.mask, m.label) for m in pred.masks if m.image == i]
        overlay(im, mine).save(out / f"overlay_image{i + 1}.png")
    meta = {"answer": pred.answer, "prompt": question,
            "images": [{"path": str(p), "height": int(im.shape[0]), "width": int(im.shape[1])}
                       for p, im in zip(paths, images)],
            "masks": records, "num_unrouted_seg": pred.num_unrouted, "num_unlabeled_seg": pred.num_unlabeled,
            "truncated": pred.truncated}
    (out / "predictions.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="exported checkpoint or training workdir")
    ap.add_argument("--image", action="append", default=[], help="an input image (repeat, in order)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=sorted(TASK_NAMES))
    what.add_argument("--prompt", help="free-form question")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="per image; 0 = no limit")
    args = ap.parse_args(argv)
    try:
        if not args.image:
            raise InputError("no images: pass at least one --image FILE")
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise InputError(f"{out} already exists (pass --overwrite to replace it)")
        images = [read_image(p, args.max_pixels) for p in args.image]
        question = build_question(len(images), args.task, args.prompt)
        from calico_jax.inference.predictor import load_predictor  # after argparse: --help stays fast (the models)
        overrides = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
        predictor = load_predictor(args.ckpt, **overrides)
        pred = predictor.predict([(images, question)])[0]
        with atomic_directory(out, overwrite=args.overwrite) as tmp:
            write_outputs(tmp, images, args.image, question, pred)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(pred.answer)
    print(f"{len(pred.masks)} masks -> {out}" + (f" ({pred.num_unrouted} [SEG] without a valid image identifier)"
                                                if pred.num_unrouted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
