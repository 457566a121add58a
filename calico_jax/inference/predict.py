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

``--mesh '{"data": 2, "tensor": 4}'`` places the weights on a mesh of this machine's devices by the training
rules (:mod:`calico_jax.inference.placement`), ``--dtype bfloat16`` casts them; the persistent compilation cache
(``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/calico_jax/jax``) spares a second call the compilation.
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
from calico_jax.core.viz import figure, render
from calico_jax.data.pairs import TASKS
from calico_jax.data.processors import load_image
from calico_jax.data.rle import encode
from calico_jax.inference.ask import Answer, InputError, build_question, task_name, to_answer

DEFAULT_MAX_PIXELS = 64_000_000


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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "mask"


def mask_files(answer: Answer) -> list[str]:
    return [f"masks/{k:02d}_image{m.image + 1}_{_slug(m.label)}.png" for k, m in enumerate(answer.masks)]


def write_outputs(out: Path, images: list[np.ndarray], paths: list[str], question: str, answer: Answer,
                  kind: str | None = None) -> None:
    """Writes the prediction files into the (empty, temporary) directory ``out``: ``answer.txt`` (the sentence, the
    mask list, the warnings), ``masks/``, ``overlay.png`` (all images, legend, answer), ``overlay_imageK.png`` and
    ``predictions.json`` (the raw text too). ``kind``: "object" or "part" when the task says which."""
    (out / "masks").mkdir()
    files = mask_files(answer)
    text = [answer.sentence, "", *answer.mask_lines(files), *[f"warning: {w}" for w in answer.warnings]]
    (out / "answer.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    records = []
    for m, name in zip(answer.masks, files):
        Image.fromarray(m.mask.astype(np.uint8) * 255).save(out / name)
        records.append({"label": m.label, "image": m.image, "score": round(m.score, 6), "rle": encode(m.mask),
                        "file": name})
    panels = [(im, [(m.mask, m.label, kind) for m in answer.masks if m.image == i], f"IMAGE{i + 1}")
              for i, im in enumerate(images)]
    rendered = render(panels)   # each image drawn once: alone, and in the figure
    for i, (pic, _) in enumerate(rendered):
        pic.save(out / f"overlay_image{i + 1}.png")
    figure(panels, caption=answer.sentence, rendered=rendered).save(out / "overlay.png")
    pred = answer.prediction
    meta = {"answer": answer.sentence, "raw_answer": answer.raw, "prompt": question,
            "images": [{"path": str(p), "height": int(im.shape[0]), "width": int(im.shape[1])}
                       for p, im in zip(paths, images)],
            "masks": records, "warnings": answer.warnings, "num_unrouted_seg": pred.num_unrouted,
            "num_unlabeled_seg": pred.num_unlabeled, "truncated": pred.truncated}
    (out / "predictions.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _task(text: str) -> str:
    try:
        return task_name(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="exported checkpoint or training workdir")
    ap.add_argument("--image", action="append", default=[], help="an input image (repeat, in order)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", type=_task, metavar="|".join(x.replace("_", "-") for x in TASKS),
                      help="one of the paper's tasks (- or _ both work)")
    what.add_argument("--prompt", help="free-form question")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="per image; 0 = no limit")
    ap.add_argument("--mesh", default=None, help="mesh of this machine's devices as JSON, e.g. "
                                                 "'{\"data\": 2, \"tensor\": 4}' (default: one device)")
    ap.add_argument("--dtype", default=None, help="weights' dtype for inference: float32, bfloat16, float16 "
                                                  "(default: the checkpoint's)")
    args = ap.parse_args(argv)
    try:
        if not args.image:
            raise InputError("no images: pass at least one --image FILE")
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise InputError(f"{out} already exists (pass --overwrite to replace it)")
        images = [read_image(p, args.max_pixels) for p in args.image]
        question = build_question(len(images), args.task, args.prompt)
        # after argparse: --help stays fast (these import jax and the models)
        from calico_jax.core.platform import enable_compile_cache
        from calico_jax.inference.placement import parse_dtype, parse_mesh
        from calico_jax.inference.predictor import load_predictor
        mesh, dtype = parse_mesh(args.mesh), parse_dtype(args.dtype)
        enable_compile_cache()
        overrides = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
        predictor = load_predictor(args.ckpt, mesh=mesh, dtype=dtype, **overrides)
        answer = to_answer(predictor.predict([(images, question)])[0], len(images), predictor.trained_max_images)
        kind = None if args.task is None else ("object" if args.task == "common_object" else "part")
        with atomic_directory(out, overwrite=args.overwrite) as tmp:
            write_outputs(tmp, images, args.image, question, answer, kind)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(answer.sentence)
    print(f"{len(answer.masks)} mask{'s' if len(answer.masks) != 1 else ''} (label, image, score, pixels, file):")
    for line in answer.mask_lines([str(out / f) for f in mask_files(answer)]):
        print(line)
    for w in answer.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {out}: answer.txt, overlay.png, masks/, predictions.json (the raw answer too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
