"""Readers for COCO-format part datasets -> one in-memory form: images -> objects -> named part masks.

Every reader returns a :class:`PartDataset`; masks are kept as compressed COCO RLE (pycocotools), so
big files stay small in memory and any consumer decodes only what it uses.

Conventions supported (``convention=``; ``"auto"`` picks one from the file's content):

``paco``  PACO-LVIS (``paco_lvis_v1_{train,val,test}.json``; also our synthetic set).
    ``categories`` holds the 75 objects plus the object-part categories named ``"<object>:<part>"``
    (e.g. ``"mug:handle"``). Every annotation has ``obj_ann_id``: an object has ``obj_ann_id == id``,
    a part points at its object's annotation id. Segmentation: RLE or polygons. Part annotations whose
    category is only listed in ``part_categories`` (the paper-version file) are accepted too.
``partimagenet``  PartImageNet part files (``annotations/{split}/...json``): every annotation is a
    part; categories are parts (``{"name": "head", "supercategory": "quadruped"}``; original files
    say ``"Quadruped Head"``: a leading supercategory word is stripped). The object comes from the
    ``*_whole`` file (``whole=``; object categories such as ``"antelope"``), matched by image
    ``file_name`` (image ids may differ between the two files): each part goes to the object of its
    image it overlaps most. Without a whole file, each image gets one object per part supercategory,
    named by it and covering the union of its parts. ``auto`` looks for the sibling
    ``{split}_whole/`` directory (``train/train_x.json`` -> ``train_whole/train_whole_x.json``).
``ade20k_part``  ADE20K-Part-234 (OV-PARTS ``ade20k_instance_{train,val}.json``): annotations are
    object instances (44 classes, RLE) whose ``part_category_id`` lists the part classes they contain.
    Part masks live in semantic PNGs (``part_maps=`` directory, file = image stem + ``.png``, pixel value
    = 0-based part class index; any value outside the part list is background); a part mask is that
    PNG's class pixels inside the object's mask. Part names (``"chair's leg"``, the text after
    ``"'s "`` is the part) come from ``part_names=`` (list or a file, one per line) or a
    ``part_categories`` key in the JSON. Part annotations stored in the JSON itself (categories
    ``"<object>'s <part>"``) are linked by ``obj_ann_id`` when present, else to the most-overlapping
    object of that class in the image.
``objects``  plain COCO objects without parts (also what a ``*_whole`` file is read as).

Bad input never crashes a load: each bad record is skipped and counted in a :class:`Report` naming
it; ``strict=True`` raises :class:`DataError` on the first. Kinds: ``duplicate_image_id``,
``duplicate_annotation_id``, ``duplicate_category_id``, ``unknown_image_id``, ``unknown_category_id``,
``empty_segmentation``, ``degenerate_polygon``, ``mask_outside_image``, ``orphan_part``,
``missing_part_map``; the pair
builder adds ``missing_image``, ``corrupt_image``, ``image_size_mismatch``.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

CONVENTIONS = ("auto", "paco", "partimagenet", "ade20k_part", "objects")


class DataError(ValueError):
    """A bad record under ``strict=True`` (message names the file and record), or an unreadable file."""


class Report:
    """Skipped records: ``(kind, record, detail)``; ``strict`` raises on the first one instead."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.entries: list[tuple[str, str, str]] = []

    def skip(self, kind: str, record: str, detail: str = "") -> None:
        if self.strict:
            raise DataError(f"{kind}: {record}" + (f": {detail}" if detail else ""))
        self.entries.append((kind, record, detail))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for kind, _, _ in self.entries:
            out[kind] += 1
        return dict(sorted(out.items()))

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self, max_names: int = 3) -> str:
        if not self.entries:
            return "skipped: 0"
        lines = [f"skipped: {len(self.entries)}"]
        for kind, n in self.counts().items():
            names = [r for k, r, _ in self.entries if k == kind][:max_names]
            more = f", ... (+{n - len(names)})" if n > len(names) else ""
            lines.append(f"  {kind}: {n} ({'; '.join(names)}{more})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"counts": self.counts(),
                "records": [{"kind": k, "record": r, "detail": d} for k, r, d in self.entries]}


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


# ----------------------------------------------------------------------------------------- masks
def to_rle(seg, h: int, w: int, record: str, report: Report) -> dict | None:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE with str counts.
    Returns None (after reporting) for empty, degenerate or out-of-image masks."""
    if isinstance(seg, dict):
        size = [int(s) for s in seg.get("size", ())]
        if size != [h, w]:
            report.skip("mask_outside_image", record, f"RLE size {size} != image size {[h, w]}")
            return None
        counts = seg.get("counts")
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        if mask_utils.area(rle) == 0:
            report.skip("empty_segmentation", record, "RLE has no foreground pixel")
            return None
        return {"size": size, "counts": rle["counts"].decode()}
    if not isinstance(seg, list) or not seg:
        report.skip("empty_segmentation", record, "no polygon")
        return None
    good, outside = [], 0
    for poly in seg:
        xy = np.asarray(poly, np.float64).reshape(-1) if isinstance(poly, list) else np.zeros(0)
        if xy.size < 6 or xy.size % 2 or not np.all(np.isfinite(xy)):
            continue
        x, y = xy[0::2], xy[1::2]
        if abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) < 1e-9:  # shoelace: zero area
            continue
        if x.max() <= 0 or y.max() <= 0 or x.min() >= w or y.min() >= h:
            outside += 1
            continue
        good.append(xy.tolist())
    if not good:
        kind = "mask_outside_image" if outside else "degenerate_polygon"
        report.skip(kind, record, f"{len(seg)} polygon(s), none usable")
        return None
    rle = mask_utils.merge(mask_utils.frPyObjects(good, h, w))
    if mask_utils.area(rle) == 0:
        report.skip("mask_outside_image", record, "polygon covers no pixel of the image")
        return None
    return {"size": [h, w], "counts": rle["counts"].decode()}


def _c(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode()}


def rle_area(rle: dict) -> float:
    return float(mask_utils.area(_c(rle)))


def rle_union(rles: list[dict]) -> dict:
    if len(rles) == 1:
        return rles[0]
    m = mask_utils.merge([_c(r) for r in rles], intersect=0)
    return {"size": list(rles[0]["size"]), "counts": m["counts"].decode()}


def rle_intersection_area(a: dict, b: dict) -> float:
    return float(mask_utils.area(mask_utils.merge([_c(a), _c(b)], intersect=1)))


def decode(rle: dict) -> np.ndarray:
    """Compressed RLE -> bool [H, W]."""
    return mask_utils.decode(_c(rle)).astype(bool)


def encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}


# ------------------------------------------------------------------------------------ raw COCO
@dataclass
class _Raw:
    path: str
    data: dict
    images: dict[int, dict]
    cats: dict[int, dict]
    anns: list[dict]                      # valid annotations, each with "_rle" and "_area"


def _read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read COCO annotation file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
    return data


def _read_raw(path, report: Report, extra_cat_keys=("part_categories",)) -> _Raw:
    data = _read_json(path)
    name = os.path.basename(str(path))
    images: dict[int, dict] = {}
    for im in data["images"]:
        if im.get("id") in images:
            report.skip("duplicate_image_id", f"{name}: image id={im.get('id')}", "kept the first")
            continue
        images[im.get("id")] = im
    cats: dict[int, dict] = {}
    for c in data.get("categories", []):
        if c.get("id") in cats:
            report.skip("duplicate_category_id", f"{name}: category id={c.get('id')}", "kept the first")
            continue
        cats[c["id"]] = dict(c)
    for key in extra_cat_keys:   # PACO's part-only list: used only for ids not already defined
        for c in data.get(key, []) or []:
            if isinstance(c, dict) and c.get("id") not in cats:
                cats[c["id"]] = dict(c, _part_only=True)
    seen, anns = set(), []
    for a in tqdm(data["annotations"], desc=f"read {name}", leave=False, disable=len(data["annotations"]) < 20000):
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
    return _Raw(str(path), data, images, cats, anns)


def _image(im: dict) -> PartImage:
    return PartImage(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))


def _object(a: dict, cat: dict) -> ObjectInst:
    return ObjectInst(int(a["id"]), str(cat["name"]), a["_rle"], a["_area"], str(cat.get("supercategory", "")))


def _add_part(ob: ObjectInst, part: str, rle: dict, ann_id: int) -> None:
    ob.parts.setdefault(part, []).append(rle)
    ob.part_ann_ids.setdefault(part, []).append(ann_id)


def _best_object(rle: dict, candidates: list[ObjectInst]) -> ObjectInst | None:
    best, best_area = None, 0.0
    for ob in candidates:
        inter = rle_intersection_area(rle, ob.rle)
        if inter > best_area:
            best, best_area = ob, inter
    if best is None and len(candidates) == 1:
        best = candidates[0]   # a part drawn slightly outside its only object still belongs to it
    return best


def _finish(raw: _Raw, convention: str, per_image: dict[int, list[ObjectInst]], report: Report) -> PartDataset:
    images = []
    for iid, im in raw.images.items():
        pim = _image(im)
        pim.objects = per_image.get(iid, [])
        images.append(pim)
    return PartDataset(raw.path, convention, images, report)


# ----------------------------------------------------------------------------------- conventions
def _is_part_cat(c: dict) -> bool:
    return ":" in str(c.get("name", "")) or bool(c.get("_part_only"))


def _load_paco(raw: _Raw, report: Report) -> PartDataset:
    objects: dict[int, ObjectInst] = {}
    per_image: dict[int, list[ObjectInst]] = defaultdict(list)
    parts = []
    for a in raw.anns:
        cat = raw.cats[a["category_id"]]
        if _is_part_cat(cat) and a.get("obj_ann_id", a["id"]) != a["id"]:
            parts.append(a)
        else:
            ob = _object(a, cat)
            objects[ob.ann_id] = ob
            per_image[a["image_id"]].append(ob)
    for a in parts:
        ob = objects.get(a.get("obj_ann_id"))
        if ob is None or ob not in per_image[a["image_id"]]:
            report.skip("orphan_part", a["_rec"], f"obj_ann_id={a.get('obj_ann_id')} is no object of this image")
            continue
        _add_part(ob, str(raw.cats[a["category_id"]]["name"]).split(":", 1)[-1], a["_rle"], a["id"])
    return _finish(raw, "paco", per_image, report)


def _part_name(cat: dict) -> str:
    name, sup = str(cat["name"]).strip(), str(cat.get("supercategory", "")).strip()
    if sup and name.lower().startswith(sup.lower() + " "):   # "Quadruped Head" -> "Head"
        name = name[len(sup) + 1:]
    return name.lower()


def _load_partimagenet(raw: _Raw, report: Report, whole) -> PartDataset:
    per_image: dict[int, list[ObjectInst]] = defaultdict(list)
    if whole is not None:
        wraw = _read_raw(whole, report)
        by_file = {im["file_name"]: iid for iid, im in raw.images.items()}
        for a in wraw.anns:
            wim = wraw.images[a["image_id"]]
            iid = by_file.get(wim["file_name"])
            if iid is None:
                continue   # an object image with no part annotation file entry: nothing to link
            if [wim["height"], wim["width"]] != [raw.images[iid]["height"], raw.images[iid]["width"]]:
                report.skip("mask_outside_image", a["_rec"], "whole-file image size differs from the part file")
                continue
            per_image[iid].append(_object(a, wraw.cats[a["category_id"]]))
    pseudo: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for a in raw.anns:
        cat = raw.cats[a["category_id"]]
        if whole is None:
            pseudo[(a["image_id"], str(cat.get("supercategory") or "object").lower())].append(a)
            continue
        ob = _best_object(a["_rle"], per_image.get(a["image_id"], []))
        if ob is None:
            report.skip("orphan_part", a["_rec"], "no object of the whole file overlaps this part")
            continue
        _add_part(ob, _part_name(cat), a["_rle"], a["id"])
    for (iid, sup), anns in pseudo.items():
        rle = rle_union([a["_rle"] for a in anns])
        ob = ObjectInst(-int(anns[0]["id"]) - 1, sup, rle, rle_area(rle), sup)
        for a in anns:
            _add_part(ob, _part_name(raw.cats[a["category_id"]]), a["_rle"], a["id"])
        per_image[iid].append(ob)
    return _finish(raw, "partimagenet", per_image, report)


def _read_part_names(part_names, raw: _Raw) -> list[str] | None:
    if part_names is None:
        pc = raw.data.get("part_categories")
        if not pc:
            return None
        return [str(c["name"]) for c in sorted(pc, key=lambda c: c["id"])]
    if isinstance(part_names, (str, os.PathLike)):
        return [ln.strip() for ln in Path(part_names).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [str(n) for n in part_names]


def _ade_part(name: str) -> str:
    return name.split("'s ", 1)[-1].strip()


def _load_ade(raw: _Raw, report: Report, part_maps, part_names) -> PartDataset:
    per_image: dict[int, list[ObjectInst]] = defaultdict(list)
    json_parts = []
    for a in raw.anns:
        cat = raw.cats[a["category_id"]]
        if "'s " in str(cat["name"]):
            json_parts.append(a)
        else:
            per_image[a["image_id"]].append(_object(a, cat))
    by_id = {ob.ann_id: ob for obs in per_image.values() for ob in obs}
    for a in json_parts:
        name = str(raw.cats[a["category_id"]]["name"])
        ob = by_id.get(a.get("obj_ann_id", -1))
        if ob is None:
            owner = name.split("'s ", 1)[0]
            ob = _best_object(a["_rle"], [o for o in per_image.get(a["image_id"], []) if o.name == owner])
        if ob is None:
            report.skip("orphan_part", a["_rec"], f"no {name.split(chr(39))[0]!r} object overlaps this part")
            continue
        _add_part(ob, _ade_part(name), a["_rle"], a["id"])
    names = _read_part_names(part_names, raw)
    if part_maps is not None:
        if names is None:
            raise DataError(f"{raw.path}: part_maps given but no part names (pass part_names= or a "
                            "'part_categories' key)")
        anns_by_id = {a["id"]: a for a in raw.anns}
        for iid, obs in tqdm(per_image.items(), desc="ADE part maps", leave=False, disable=len(per_image) < 500):
            im = raw.images[iid]
            wanted = [ob for ob in obs if anns_by_id[ob.ann_id].get("part_category_id")]
            if not wanted:
                continue
            png = Path(part_maps) / (Path(im["file_name"]).stem + ".png")
            rec = f"{os.path.basename(raw.path)}: image id={iid} part map {png}"
            try:
                pmap = np.asarray(Image.open(png))
            except (OSError, ValueError) as e:
                report.skip("missing_part_map", rec, str(e))
                continue
            if pmap.shape[:2] != (im["height"], im["width"]):
                report.skip("image_size_mismatch", rec, f"{pmap.shape[:2]} != {(im['height'], im['width'])}")
                continue
            for ob in wanted:
                inside = decode(ob.rle)
                for pid in anns_by_id[ob.ann_id]["part_category_id"]:
                    if not 0 <= int(pid) < len(names):
                        report.skip("unknown_category_id", f"{rec} object ann id={ob.ann_id}", f"part id {pid}")
                        continue
                    m = inside & (pmap == int(pid))
                    if m.any():
                        _add_part(ob, _ade_part(names[int(pid)]), encode(m), ob.ann_id)
    return _finish(raw, "ade20k_part", per_image, report)


def _guess_whole(path: Path) -> Path | None:
    d = path.parent.name
    if not d or d.endswith("_whole"):
        return None
    cand = path.parent.parent / f"{d}_whole" / path.name.replace(d, f"{d}_whole", 1)
    return cand if cand.is_file() else None


def detect_convention(raw: _Raw, path: Path) -> str:
    names = [str(c.get("name", "")) for c in raw.cats.values()]
    if path.parent.name.endswith("_whole") or path.stem.endswith("_whole") or "_whole_" in path.name:
        return "objects"
    if any("obj_ann_id" in a for a in raw.anns[:1000]) or any(":" in n for n in names):
        return "paco"
    if any("part_category_id" in a for a in raw.anns[:1000]) or any("'s " in n for n in names):
        return "ade20k_part"
    return "partimagenet"


def load_part_dataset(path, convention: str = "auto", *, whole=None, part_maps=None, part_names=None,
                      strict: bool = False, report: Report | None = None) -> PartDataset:
    """Reads one COCO-format part annotation file (see the module docstring for ``convention``).
    ``report`` collects skipped records (a new one is made if None); ``strict`` raises instead."""
    if convention not in CONVENTIONS:
        raise DataError(f"unknown convention {convention!r}; one of {CONVENTIONS}")
    report = report if report is not None else Report(strict)
    path = Path(path)
    raw = _read_raw(path, report)
    if convention == "auto":
        convention = detect_convention(raw, path)
        if convention == "partimagenet" and whole is None:
            whole = _guess_whole(path)
    if convention == "paco":
        return _load_paco(raw, report)
    if convention == "partimagenet":
        return _load_partimagenet(raw, report, whole)
    if convention == "ade20k_part":
        return _load_ade(raw, report, part_maps, part_names)
    per_image: dict[int, list[ObjectInst]] = defaultdict(list)
    for a in raw.anns:
        per_image[a["image_id"]].append(_object(a, raw.cats[a["category_id"]]))
    return _finish(raw, "objects", per_image, report)


def clean_name(name: str) -> str:
    """Display form of a dataset label: ``"car_(automobile)"`` -> ``"car"``, ``"door_handle"`` ->
    ``"door handle"``, ``"Quadruped Head"`` -> ``"quadruped head"``."""
    name = str(name)
    if "(" in name and name.rstrip().endswith(")"):
        name = name[: name.index("(")]
    return " ".join(name.replace("_", " ").lower().split())


__all__ = ["DataError", "Report", "ObjectInst", "PartImage", "PartDataset", "load_part_dataset", "clean_name",
           "decode", "encode", "rle_union", "rle_area", "to_rle", "detect_convention", "CONVENTIONS"]
