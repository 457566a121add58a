"""COCO masks: any COCO segmentation -> compressed RLE (str counts, so JSON-serialisable), and the
few RLE operations the readers and the pair builder need (area, union, intersection, decode, encode)."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from calico_jax.data.skips import Report


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


__all__ = ["to_rle", "rle_area", "rle_union", "rle_intersection_area", "decode", "encode"]
