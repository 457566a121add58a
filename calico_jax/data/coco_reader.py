"""The generic half of the COCO part readers: the in-memory form (images -> objects -> named part
RLEs) and the raw COCO file read (id checks, category table, segmentation -> RLE), shared by every
dataset convention in :mod:`calico_jax.data.coco_conventions`."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

from tqdm import tqdm

from calico_jax.data.rle import rle_area, rle_intersection_area, to_rle
from calico_jax.data.skips import DataError, Report


@dataclass
class ObjectInst:
    """One object instance: class name, its mask and its parts (part name -> list of RLEs, since e.g.
    a bicycle has two ``wheel`` annotations)."""
    ann_id: int
    name: str
    rle: dict
    area: float
    supercategory: str = ""
    parts: dict[str, list[dict]] = field(default_factory=dict)
    part_ann_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class PartImage:
    image_id: int
    file_name: str
    height: int
    width: int
    objects: list[ObjectInst] = field(default_factory=list)


@dataclass
class PartDataset:
    path: str
    convention: str
    images: list[PartImage]
    report: Report

    def classes(self) -> dict[str, set[str]]:
        """Object class -> every part name seen on it (the class's part vocabulary)."""
        out: dict[str, set[str]] = defaultdict(set)
        for im in self.images:
            for ob in im.objects:
                out[ob.name].update(ob.parts)
        return dict(out)


@dataclass
class RawFile:
    """One COCO file as read by :func:`read_raw`: its valid records by id, before any part is linked."""
    path: str
    data: dict
    images: dict[int, dict]
    cats: dict[int, dict]
    anns: list[dict]                      # valid annotations, each with "_rle" and "_area"


def read_coco_json(path) -> dict:
    """The JSON object of a COCO annotation file (``images`` and ``annotations`` lists), or :class:`DataError`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read COCO annotation file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
    return data


_IMAGE_FIELDS = {"id": int, "file_name": str, "height": int, "width": int}
_CATEGORY_FIELDS = {"id": int, "name": str, "supercategory?": str}
_ANNOTATION_FIELDS = {"id": int, "image_id": int, "category_id": int, "obj_ann_id?": int}


def _bad_fields(rec, spec: dict[str, type]) -> list[str]:
    """The fields of a record that are missing or of the wrong type (``key?``: optional; sizes must be
    positive)."""
    if not isinstance(rec, dict):
        return [f"(a {type(rec).__name__}, not an object)"]
    bad = []
    for key, tp in spec.items():
        optional, key = key.endswith("?"), key.rstrip("?")
        if optional and rec.get(key) is None:
            continue
        v = rec.get(key)
        if not isinstance(v, tp) or isinstance(v, bool) or (key in ("height", "width") and v <= 0):
            bad.append(f"{key}={v!r}" if key in rec else f"{key} missing")
    return bad


def read_raw(path, report: Report, extra_cat_keys=("part_categories",)) -> RawFile:
    """Reads a COCO file: bad, duplicate or dangling records are skipped into ``report``; each kept annotation
    gets its mask as ``_rle`` (with ``_area`` and ``_rec``, the record's name for the report)."""
    data = read_coco_json(path)
    name = os.path.basename(str(path))
    if not isinstance(data.get("categories", []), list):
        raise DataError(f"{path}: 'categories' is a {type(data['categories']).__name__}, not a list")
    images: dict[int, dict] = {}
    for i, im in enumerate(data["images"]):
        bad = _bad_fields(im, _IMAGE_FIELDS)
        if bad:
            report.skip("bad_image_record", f"{name}: images[{i}]", ", ".join(bad))
            continue
        if im.get("id") in images:
            report.skip("duplicate_image_id", f"{name}: image id={im.get('id')}", "kept the first")
            continue
        images[im.get("id")] = im
    cats: dict[int, dict] = {}
    for i, c in enumerate(data.get("categories", [])):
        bad = _bad_fields(c, _CATEGORY_FIELDS)
        if bad:
            report.skip("bad_category_record", f"{name}: categories[{i}]", ", ".join(bad))
            continue
        if c.get("id") in cats:
            report.skip("duplicate_category_id", f"{name}: category id={c.get('id')}", "kept the first")
            continue
        cats[c["id"]] = dict(c)
    for key in extra_cat_keys:   # PACO's part-only list: used only for ids not already defined
        for c in data.get(key, []) or []:
            if isinstance(c, dict) and c.get("id") not in cats:
                cats[c["id"]] = dict(c, _part_only=True)
    seen, anns = set(), []
    for i, a in enumerate(tqdm(data["annotations"], desc=f"read {name}", leave=False,
                               disable=len(data["annotations"]) < 20000)):
        bad = _bad_fields(a, _ANNOTATION_FIELDS)
        if bad:
            report.skip("bad_annotation_record", f"{name}: annotations[{i}]", ", ".join(bad))
            continue
        rec = f"{name}: annotation id={a.get('id')} (image id={a.get('image_id')})"
        if a.get("id") in seen:
            report.skip("duplicate_annotation_id", rec, "kept the first")
            continue
        seen.add(a.get("id"))
        im = images.get(a.get("image_id"))
        if im is None:
            report.skip("unknown_image_id", rec)
            continue
        if a.get("category_id") not in cats:
            report.skip("unknown_category_id", rec, f"category_id={a.get('category_id')}")
            continue
        rle = to_rle(a.get("segmentation"), int(im["height"]), int(im["width"]), rec, report)
        if rle is None:
            continue
        anns.append(dict(a, _rle=rle, _area=rle_area(rle), _rec=rec))
    return RawFile(str(path), data, images, cats, anns)


def _image(im: dict) -> PartImage:
    return PartImage(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))


def make_object(a: dict, cat: dict) -> ObjectInst:
    """An object (no parts yet) from an annotation read by :func:`read_raw` and its category."""
    return ObjectInst(int(a["id"]), str(cat["name"]), a["_rle"], a["_area"], str(cat.get("supercategory", "")))


def add_part(ob: ObjectInst, part: str, rle: dict, ann_id: int) -> None:
    """Adds one mask of part ``part`` (annotation ``ann_id``) to ``ob``."""
    ob.parts.setdefault(part, []).append(rle)
    ob.part_ann_ids.setdefault(part, []).append(ann_id)


def best_object(rle: dict, candidates: list[ObjectInst]) -> ObjectInst | None:
    """The candidate the part mask ``rle`` overlaps most (the only one if none overlaps), else None."""
    best, best_area = None, 0.0
    for ob in candidates:
        inter = rle_intersection_area(rle, ob.rle)
        if inter > best_area:
            best, best_area = ob, inter
    if best is None and len(candidates) == 1:
        best = candidates[0]   # a part drawn slightly outside its only object still belongs to it
    return best


def build_dataset(raw: RawFile, convention: str, per_image: dict[int, list[ObjectInst]],
                  report: Report) -> PartDataset:
    """The :class:`PartDataset` of every image of ``raw`` with its linked objects (an image without any keeps none)."""
    images = []
    for iid, im in raw.images.items():
        pim = _image(im)
        pim.objects = per_image.get(iid, [])
        images.append(pim)
    return PartDataset(raw.path, convention, images, report)
