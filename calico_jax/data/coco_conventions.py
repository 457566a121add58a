"""Per-dataset conventions of the COCO part readers: how each released file links a part to its
object (documented in :mod:`calico_jax.data.coco_parts`), :func:`detect_convention` and :func:`link_parts`, which
applies the detected or given one."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from calico_jax.data.coco_reader import (
    ObjectInst,
    PartDataset,
    RawFile,
    add_part,
    best_object,
    build_dataset,
    make_object,
    read_raw,
)
from calico_jax.data.rle import decode, encode, rle_area, rle_union
from calico_jax.data.skips import DataError, Report


def _is_part_cat(c: dict) -> bool:
    return ":" in str(c.get("name", "")) or bool(c.get("_part_only"))


def _load_paco(raw: RawFile, report: Report) -> PartDataset:
    objects: dict[int, ObjectInst] = {}
    per_image: dict[int, list[ObjectInst]] = defaultdict(list)
    parts = []
    for a in raw.anns:
        cat = raw.cats[a["category_id"]]
        if _is_part_cat(cat) and a.get("obj_ann_id", a["id"]) != a["id"]:
            parts.append(a)
        else:
            ob = make_object(a, cat)
            objects[ob.ann_id] = ob
            per_image[a["image_id"]].append(ob)
    for a in parts:
        ob = objects.get(a.get("obj_ann_id"))
        if ob is None or ob not in per_image[a["image_id"]]:
            report.skip("orphan_part", a["_rec"], f"obj_ann_id={a.get('obj_ann_id')} is no object of this image")
            continue
        add_part(ob, str(raw.cats[a["category_id"]]["name"]).split(":", 1)[-1], a["_rle"], a["id"])
    return build_dataset(raw, "paco", per_image, report)


def _part_name(cat: dict) -> str:
    name, sup = str(cat["name"]).strip(), str(cat.get("supercategory", "")).strip()
    if sup and name.lower().startswith(sup.lower() + " "):   # "Quadruped Head" -> "Head"
        name = name[len(sup) + 1:]
    return name.lower()


def _load_partimagenet(raw: RawFile, report: Report, whole) -> PartDataset:
    per_image: dict[int, list[ObjectInst]] = defaultdict(list)
    if whole is not None:
        wraw = read_raw(whole, report)
        by_file = {im["file_name"]: iid for iid, im in raw.images.items()}
        for a in wraw.anns:
            wim = wraw.images[a["image_id"]]
            iid = by_file.get(wim["file_name"])
            if iid is None:
                continue   # an object image with no part annotation file entry: nothing to link
            if [wim["height"], wim["width"]] != [raw.images[iid]["height"], raw.images[iid]["width"]]:
                report.skip("mask_outside_image", a["_rec"], "whole-file image size differs from the part file")
                continue
            per_image[iid].append(make_object(a, wraw.cats[a["category_id"]]))
    pseudo: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for a in raw.anns:
        cat = raw.cats[a["category_id"]]
        if whole is None:
            pseudo[(a["image_id"], str(cat.get("supercategory") or "object").lower())].append(a)
            continue
        ob = best_object(a["_rle"], per_image.get(a["image_id"], []))
        if ob is None:
            report.skip("orphan_part", a["_rec"], "no object of the whole file overlaps this part")
            continue
        add_part(ob, _part_name(cat), a["_rle"], a["id"])
    for (iid, sup), anns in pseudo.items():
        rle = rle_union([a["_rle"] for a in anns])
        ob = ObjectInst(-int(anns[0]["id"]) - 1, sup, rle, rle_area(rle), sup)
        for a in anns:
            add_part(ob, _part_name(raw.cats[a["category_id"]]), a["_rle"], a["id"])
        per_image[iid].append(ob)
    return build_dataset(raw, "partimagenet", per_image, report)


def _read_part_names(part_names, raw: RawFile) -> list[str] | None:
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


def _load_ade(raw: RawFile, report: Report, part_maps, part_names) -> PartDataset:
    per_image: dict[int, list[ObjectInst]] = defaultdict(list)
    json_parts = []
    for a in raw.anns:
        cat = raw.cats[a["category_id"]]
        if "'s " in str(cat["name"]):
            json_parts.append(a)
        else:
            per_image[a["image_id"]].append(make_object(a, cat))
    by_id = {ob.ann_id: ob for obs in per_image.values() for ob in obs}
    for a in json_parts:
        name = str(raw.cats[a["category_id"]]["name"])
        ob = by_id.get(a.get("obj_ann_id", -1))
        if ob is None:
            owner = name.split("'s ", 1)[0]
            ob = best_object(a["_rle"], [o for o in per_image.get(a["image_id"], []) if o.name == owner])
        if ob is None:
            report.skip("orphan_part", a["_rec"], f"no {name.split(chr(39))[0]!r} object overlaps this part")
            continue
        add_part(ob, _ade_part(name), a["_rle"], a["id"])
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
                        add_part(ob, _ade_part(names[int(pid)]), encode(m), ob.ann_id)
    return build_dataset(raw, "ade20k_part", per_image, report)


def _guess_whole(path: Path) -> Path | None:
    d = path.parent.name
    if not d or d.endswith("_whole"):
        return None
    cand = path.parent.parent / f"{d}_whole" / path.name.replace(d, f"{d}_whole", 1)
    return cand if cand.is_file() else None


def detect_convention(raw: RawFile, path: Path) -> str:
    """The convention (:data:`calico_jax.data.coco_parts.CONVENTIONS`) of a file, from its path and content."""
    names = [str(c.get("name", "")) for c in raw.cats.values()]
    if path.parent.name.endswith("_whole") or path.stem.endswith("_whole") or "_whole_" in path.name:
        return "objects"
    if any("obj_ann_id" in a for a in raw.anns[:1000]) or any(":" in n for n in names):
        return "paco"
    if any("part_category_id" in a for a in raw.anns[:1000]) or any("'s " in n for n in names):
        return "ade20k_part"
    return "partimagenet"


def link_parts(raw: RawFile, path: Path, convention: str, report: Report, *, whole=None, part_maps=None,
               part_names=None) -> PartDataset:
    """Links the parts of ``raw`` (read from ``path``) to their objects by ``convention``; ``"auto"`` detects it
    (and, for PartImageNet without ``whole``, looks for the sibling ``*_whole`` file)."""
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
        per_image[a["image_id"]].append(make_object(a, raw.cats[a["category_id"]]))
    return build_dataset(raw, "objects", per_image, report)
