"""The embedded synthetic part dataset: drawn objects made of named parts, in PACO's COCO part format.

``python -m calico_jax.data.synthetic --out DIR --num_images N --seed S`` writes
``DIR/images/000000.jpg ...`` and ``DIR/annotations.json``. The same seed gives byte-identical files
(every image draws from its own ``numpy`` generator seeded by ``(seed, index)``; JSON is written with
fixed key order and separators).

Content: 12 object classes, each made of 2-5 named parts (several part names -- ``wheel``,
``handle``, ``leg``, ``seat``, ``head``, ``body``, ``tail`` -- are shared across classes, so both
common- and unique-part questions have answers). Each image has 1-3 objects at random position,
scale, rotation and mirror, in random colours, over a gradient background with noise and clutter
shapes; objects may overlap each other and random occluders are drawn in front of some, so masks
are of the *visible* pixels (rendered through a label map drawn with the same rasteriser as the
image, hence exact).

Annotation format (the ``paco`` convention of :mod:`calico_jax.data.coco_parts`): object categories
``{"id", "name": "bicycle", "supercategory": "vehicle"}``, object-part categories ``"bicycle:wheel"``
(supercategory ``"PART"``), a PACO-style ``part_categories`` list, and annotations with compressed
RLE ``segmentation``, ``bbox``, ``area``, ``iscrowd`` and ``obj_ann_id`` (objects point at themselves,
parts at their object). Several polygons of one part name (a bicycle's two wheels) form one
annotation, as in PACO ("parts with the same name in the same object merged").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from calico_jax.core.fs import atomic_directory
from calico_jax.data import pairs
from calico_jax.data.coco_parts import DataError, Report, load_part_dataset


# ----------------------------------------------------------------------- shapes in the object frame
def _rect(cx, cy, w, h):
    return [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]


def _ell(cx, cy, rx, ry, n=20):
    return [(cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _arc(cx, cy, r_out, r_in, a0, a1, n=12):
    angles = [math.radians(a0 + (a1 - a0) * k / n) for k in range(n + 1)]
    outer = [(cx + r_out * math.cos(a), cy + r_out * math.sin(a)) for a in angles]
    inner = [(cx + r_in * math.cos(a), cy + r_in * math.sin(a)) for a in reversed(angles)]
    return outer + inner


# class -> (supercategory, [(part name, [polygons])]) in drawing order (later parts are in front).
CLASSES: dict[str, tuple[str, list[tuple[str, list]]]] = {
    "bicycle": ("vehicle", [("wheel", [_ell(-0.6, 0.35, 0.38, 0.38), _ell(0.6, 0.35, 0.38, 0.38)]),
                            ("body", [[(-0.6, 0.35), (-0.15, -0.35), (0.45, -0.35), (0.6, 0.35), (0.45, 0.35),
                                       (0.35, -0.2), (-0.1, -0.2), (-0.45, 0.35)]]),
                            ("seat", [_rect(-0.2, -0.45, 0.35, 0.1)]),
                            ("handle", [_rect(0.5, -0.55, 0.3, 0.08)])]),
    "car": ("vehicle", [("body", [[(-0.95, 0.25), (-0.95, -0.15), (-0.5, -0.2), (-0.3, -0.55), (0.35, -0.55),
                                   (0.6, -0.2), (0.95, -0.12), (0.95, 0.25)]]),
                        ("window", [_rect(-0.15, -0.37, 0.3, 0.22), _rect(0.27, -0.37, 0.3, 0.22)]),
                        ("light", [_rect(0.9, -0.05, 0.08, 0.1)]),
                        ("wheel", [_ell(-0.55, 0.28, 0.22, 0.22), _ell(0.55, 0.28, 0.22, 0.22)])]),
    "cart": ("vehicle", [("body", [_rect(-0.1, -0.1, 1.3, 0.6)]),
                         ("handle", [[(0.5, -0.35), (0.95, -0.9), (1.02, -0.84), (0.58, -0.3)]]),
                         ("wheel", [_ell(-0.5, 0.35, 0.18, 0.18), _ell(0.3, 0.35, 0.18, 0.18)])]),
    "chair": ("furniture", [("leg", [_rect(-0.3, 0.5, 0.1, 0.8), _rect(0.3, 0.5, 0.1, 0.8)]),
                            ("back", [_rect(-0.33, -0.5, 0.14, 0.9)]),
                            ("seat", [_rect(0, 0.07, 0.8, 0.14)])]),
    "table": ("furniture", [("leg", [_rect(-0.75, 0.3, 0.12, 0.9), _rect(0.75, 0.3, 0.12, 0.9)]),
                            ("top", [_rect(0, -0.2, 1.8, 0.16)])]),
    "stool": ("furniture", [("leg", [_rect(-0.3, 0.3, 0.08, 0.9), _rect(0.0, 0.3, 0.08, 0.9),
                                     _rect(0.3, 0.3, 0.08, 0.9)]),
                            ("seat", [_ell(0, -0.2, 0.5, 0.12)])]),
    "lamp": ("furniture", [("pole", [_rect(0, 0.2, 0.08, 1.3)]),
                           ("base", [_ell(0, 0.85, 0.45, 0.1)]),
                           ("shade", [[(-0.2, -0.9), (0.2, -0.9), (0.45, -0.45), (-0.45, -0.45)]])]),
    "mug": ("kitchenware", [("handle", [_arc(0.45, 0.0, 0.38, 0.24, -90, 90)]),
                            ("body", [_rect(0, 0, 0.9, 1.1)])]),
    "kettle": ("kitchenware", [("handle", [_arc(0, -0.35, 0.55, 0.43, 180, 360)]),
                               ("spout", [[(0.5, 0.0), (0.95, -0.4), (1.0, -0.33), (0.6, 0.25)]]),
                               ("body", [_ell(0, 0.15, 0.7, 0.55)]),
                               ("lid", [_ell(0, -0.38, 0.3, 0.1)])]),
    "dog": ("animal", [("leg", [_rect(x, 0.45, 0.12, 0.55) for x in (-0.5, -0.3, 0.3, 0.5)]),
                       ("tail", [[(-0.65, -0.05), (-1.0, -0.45), (-0.95, -0.5), (-0.6, -0.15)]]),
                       ("body", [_ell(0, 0.05, 0.7, 0.3)]),
                       ("head", [_ell(0.75, -0.35, 0.26, 0.22)])]),
    "bird": ("animal", [("leg", [_rect(-0.1, 0.55, 0.05, 0.4), _rect(0.1, 0.55, 0.05, 0.4)]),
                        ("tail", [[(-0.5, 0.0), (-1.0, -0.2), (-1.0, 0.25)]]),
                        ("body", [_ell(0, 0.05, 0.55, 0.32)]),
                        ("head", [_ell(0.55, -0.35, 0.2, 0.2)]),
                        ("wing", [[(-0.3, -0.05), (0.25, -0.05), (0.0, 0.25)]])]),
    "fish": ("animal", [("tail", [[(-0.6, 0.0), (-1.0, -0.4), (-1.0, 0.4)]]),
                        ("fin", [[(-0.2, -0.25), (0.2, -0.3), (-0.1, -0.6)]]),
                        ("body", [_ell(0, 0, 0.75, 0.33)]),
                        ("head", [_ell(0.55, 0, 0.28, 0.28)])]),
}


# ``class_colors``: one hue per class (in CLASSES order), far apart in RGB.
CLASS_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def _color(rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _place(pts, s, theta, flip, tx, ty):
    p = np.asarray(pts, np.float64) * [(-1.0 if flip else 1.0), 1.0]
    c, n = math.cos(theta), math.sin(theta)
    p = p @ np.array([[c, n], [-n, c]]) * s + [tx, ty]
    return [(float(x), float(y)) for x, y in p]


def _random_shape(rng, w, h, cx=None, cy=None, scale=None):
    cx = rng.uniform(0, w) if cx is None else cx
    cy = rng.uniform(0, h) if cy is None else cy
    r = rng.uniform(0.04, 0.15) * min(w, h) if scale is None else scale
    kind = rng.integers(3)
    if kind == 0:
        return _place(_ell(0, 0, 1, rng.uniform(0.3, 1)), r, rng.uniform(0, math.pi), False, cx, cy)
    if kind == 1:
        return _place(_rect(0, 0, 2, rng.uniform(0.2, 2)), r, rng.uniform(0, math.pi), False, cx, cy)
    return _place([tuple(rng.uniform(-1, 1, 2)) for _ in range(3)], r, 0.0, False, cx, cy)


def _class_color(rng, cls: str, part_index: int) -> tuple[int, int, int]:
    """``class_colors``: the class's hue from a fixed table, each part a different shade, slight jitter."""
    base = np.asarray(CLASS_PALETTE[list(CLASSES).index(cls) % len(CLASS_PALETTE)], np.float64)
    shade = 0.55 + 0.2 * (part_index % 4)
    return tuple(int(v) for v in np.clip(base * shade + rng.normal(0, 8, 3), 0, 255))


def render(seed: int, index: int, max_objects: int = 3, object_scale: tuple[float, float] = (0.16, 0.3),
           clutter: bool = True, class_colors: bool = False):
    """Draws image ``index`` of the set ``seed``: returns (RGB uint8 [H,W,3], objects) where each
    object is ``(class, {part: bool mask})`` of visible pixels. ``max_objects``: 1..max_objects objects;
    ``object_scale``: object half-size range as a fraction of the shorter image side (the defaults give
    the original set; 1 object makes part questions unambiguous, as the demo needs). ``clutter=False``:
    no background shapes or occluders; ``class_colors``: each class in its own hue (parts in shades of
    it) instead of random colours -- together an easy set a model trained from scratch on a CPU for a
    few minutes can learn (``make demo``)."""
    if not 1 <= max_objects or not 0 < object_scale[0] <= object_scale[1] < 0.5:
        raise ValueError(f"render: need max_objects >= 1 and 0 < object_scale lo <= hi < 0.5, "
                         f"got {max_objects}, {object_scale}")
    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(6, 11, 2) * 32)
    yy, xx = np.mgrid[0:h, 0:w]
    c0, c1 = np.array(_color(rng), np.float64), np.array(_color(rng), np.float64)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (w + h) + 0.5
    bg = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    label = Image.new("L", (w, h), 0)
    draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(label)
    for _ in range(rng.integers(3, 9) if clutter else 0):            # background clutter
        draw.polygon(_random_shape(rng, w, h), fill=_color(rng))
    names = list(CLASSES)
    objects, value, centres = [], 1, []
    for _ in range(rng.integers(1, max_objects + 1)):
        cls = names[rng.integers(len(names))]
        s = rng.uniform(*object_scale) * min(w, h)
        for _try in range(8):   # keep objects mostly apart: overlaps still happen, full hiding rarely
            tx, ty = rng.uniform(s, w - s), rng.uniform(s, h - s)
            if all(math.hypot(tx - a, ty - b) > 0.9 * (s + r) for a, b, r in centres):
                break
        centres.append((tx, ty, s))
        theta, flip = rng.uniform(-0.6, 0.6), bool(rng.integers(2))
        parts = {}
        for k, (part, polys) in enumerate(CLASSES[cls][1]):
            fill = _class_color(rng, cls, k) if class_colors else _color(rng)
            for poly in polys:
                xy = _place(poly, s, theta, flip, tx, ty)
                draw.polygon(xy, fill=fill)
                ldraw.polygon(xy, fill=value)
            parts[part] = value
            value += 1
        objects.append((cls, parts))
    for _ in range(rng.integers(0, 3) if clutter else 0):            # occluders in front
        tx, ty, s = centres[rng.integers(len(centres))]
        xy = _random_shape(rng, w, h, tx + rng.uniform(-s, s), ty + rng.uniform(-s, s), rng.uniform(0.2, 0.5) * s)
        draw.polygon(xy, fill=_color(rng))
        ldraw.polygon(xy, fill=255)
    lab = np.asarray(label)
    out = [(cls, {p: lab == v for p, v in parts.items()}) for cls, parts in objects]
    return np.asarray(img), out


def categories() -> tuple[list[dict], list[dict], dict[tuple[str, str | None], int]]:
    cats, part_cats, ids = [], [], {}
    for i, (cls, (sup, _)) in enumerate(CLASSES.items()):
        ids[(cls, None)] = i + 1
        cats.append({"id": i + 1, "name": cls, "supercategory": sup})
    part_names = sorted({p for _, parts in CLASSES.values() for p, _ in parts})
    part_cats = [{"id": i + 1, "name": p, "supercategory": "PART"} for i, p in enumerate(part_names)]
    nxt = len(cats) + 1
    for cls, (_, parts) in CLASSES.items():
        for p, _ in parts:
            ids[(cls, p)] = nxt
            cats.append({"id": nxt, "name": f"{cls}:{p}", "supercategory": "PART"})
            nxt += 1
    return cats, part_cats, ids


def _ann(ann_id, image_id, cat, mask, obj_ann_id):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": cat,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
            "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            "obj_ann_id": obj_ann_id}


def generate(out, num_images: int, seed: int = 0, *, quality: int = 90, min_part_pixels: int = 4,
             progress: bool = True, max_objects: int = 3, object_scale: tuple[float, float] = (0.16, 0.3),
             clutter: bool = True, class_colors: bool = False) -> Path:
    """Writes the dataset under ``out``; returns the annotation file path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cats, part_cats, cat_ids = categories()
    images, anns = [], []
    for idx in tqdm(range(num_images), desc="synthetic", disable=not progress):
        img, objects = render(seed, idx, max_objects, tuple(object_scale), clutter, class_colors)
        name = f"{idx:06d}.jpg"
        Image.fromarray(img).save(out / "images" / name, quality=quality)
        images.append({"id": idx + 1, "file_name": name, "height": int(img.shape[0]), "width": int(img.shape[1])})
        for cls, parts in objects:
            visible = {p: m for p, m in parts.items() if m.sum() >= min_part_pixels}
            if not visible:
                continue   # fully hidden
            obj_id = len(anns) + 1
            anns.append(_ann(obj_id, idx + 1, cat_ids[(cls, None)], np.logical_or.reduce(list(visible.values())),
                             obj_id))
            for p, m in visible.items():
                anns.append(_ann(len(anns) + 1, idx + 1, cat_ids[(cls, p)], m, obj_id))
    data = {"info": {"description": "calico_jax synthetic part dataset", "version": 1, "seed": seed,
                     "num_images": num_images, "max_objects": max_objects, "object_scale": list(object_scale),
                     "clutter": clutter, "class_colors": class_colors},
            "images": images, "annotations": anns, "categories": cats, "part_categories": part_cats}
    path = out / "annotations.json"
    path.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    return path


def build_pairs(ann, images_root, pair_seed: int, image_counts=(2,), per_task=()) -> dict:
    """The pairs of a synthetic set with samples of every N in ``image_counts``, in that order, drawn by one
    :class:`~calico_jax.data.pairs.PairBuilder` (so images and masks are shared). ``per_task``: samples per task
    for each N (0 = one attempt per anchor view, the builder's default); () = 0 for all. One N gives exactly the
    builder's file; several keep the first N's sample ids (so an N = 2 set stays the one a 2-only split had), tag
    the others' ids with ``-nN`` (ids must be unique) and add ``mix`` (the counts and caps asked for, which
    :func:`make_split` checks on reuse) and ``counts_by_images`` (N -> task -> samples)."""
    counts, per_task = tuple(image_counts), tuple(per_task) or (0,) * len(image_counts)
    if not counts or len(per_task) != len(counts) or min(counts) < 2 or min(per_task) < 0 or \
            len(set(counts)) != len(counts):
        raise ValueError(f"build_pairs: image_counts must be distinct ints >= 2 and per_task one int >= 0 each (or "
                         f"empty), got {counts}, {per_task}")
    report = Report(False)
    dataset = load_part_dataset(str(ann), "auto", report=report)
    base = pairs.PairConfig(check_images="none")
    builder = pairs.PairBuilder([(dataset, str(images_root))], base, pair_seed, report)
    out = None
    for n, cap in zip(counts, per_task, strict=True):
        # the drawing options are read per build, so one builder (one image and mask table) serves every N
        builder.cfg = dataclasses.replace(base, num_images=n, per_task=cap or None)
        data = builder.build()
        if out is None:
            out = data
            if len(counts) == 1:
                return out
            out["mix"] = {"image_counts": list(counts), "per_task": list(per_task)}
            out["counts_by_images"] = {}
        else:
            for s in data["samples"]:
                s["id"] = s["id"].replace("-", f"-n{n}-", 1)
            out["samples"] += data["samples"]
            out["counts"] = {t: out["counts"].get(t, 0) + c for t, c in data["counts"].items()}
        out["counts_by_images"][str(n)] = data["counts"]
    out["masks"], out["report"] = builder.masks, report.to_json()   # every N's masks (the list grew)
    return out


def recorded_mix(data: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A pairs file's (image counts, per-task caps): its ``mix``, or those of a single-N builder file."""
    if "mix" in data:
        return tuple(data["mix"]["image_counts"]), tuple(data["mix"]["per_task"])
    return (data["config"]["num_images"],), (data["config"]["per_task"] or 0,)


def make_split(root, num_images: int, seed: int, pair_seed: int, *, image_counts=(2,), per_task=(),
               progress: bool = False, **options) -> Path:
    """A synthetic dataset and its pairs file under ``root`` (``images/``, ``annotations.json``, ``pairs.json``),
    written atomically; an existing complete split is reused. ``options``: :func:`generate`'s keywords;
    ``image_counts`` / ``per_task``: :func:`build_pairs`'. Returns the pairs file. Used by the training task (no
    ``data.pairs``) and by ``make demo``. An existing split whose pairs were drawn for other image counts or caps
    is an error (reusing it would train on other data than the config says; its tokenizer and checkpoints would
    not match a rebuilt one either)."""
    root = Path(root)
    want = (tuple(image_counts), tuple(per_task) or (0,) * len(image_counts))
    if (root / "pairs.json").is_file():
        got = recorded_mix(json.loads((root / "pairs.json").read_text(encoding="utf-8")))
        if got != want:
            raise DataError(f"{root}: its pairs have image_counts {got[0]} and per_task {got[1]}, the config asks "
                            f"for {want[0]} and {want[1]}: remove the run's data/ (or the workdir) or use another "
                            "workdir")
    else:
        with atomic_directory(root, overwrite=root.exists()) as tmp:
            ann = generate(tmp, num_images, seed=seed, progress=progress, **options)
            pairs.write_pairs(build_pairs(ann, root / "images", pair_seed, *want), tmp / "pairs.json")
    return root / "pairs.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (images/ and annotations.json)")
    ap.add_argument("--num_images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--max_objects", type=int, default=3, help="objects per image: 1..max_objects")
    ap.add_argument("--object_scale", default="0.16,0.3",
                    help="LO,HI: object half-size as a fraction of the shorter image side")
    ap.add_argument("--no_clutter", dest="clutter", action="store_false", help="no background shapes/occluders")
    ap.add_argument("--class_colors", action="store_true", help="each class in its own hue (an easy set)")
    a = ap.parse_args(argv)
    if a.num_images < 1:
        ap.error("--num_images must be >= 1")
    if a.max_objects < 1:
        ap.error("--max_objects must be >= 1")
    try:
        scale = tuple(float(v) for v in a.object_scale.split(","))
    except ValueError:
        scale = ()
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] < 0.5:
        ap.error(f"--object_scale must be LO,HI with 0 < LO <= HI < 0.5, got {a.object_scale!r}")
    t0 = time.perf_counter()
    path = generate(a.out, a.num_images, a.seed, quality=a.quality, max_objects=a.max_objects, object_scale=scale,
                    clutter=a.clutter, class_colors=a.class_colors)
    data = json.loads(path.read_text())
    print(f"wrote {len(data['images'])} images, {len(data['annotations'])} annotations to {path} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
