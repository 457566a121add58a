"""The split data modules: public names still importable from coco_parts / pairs (same objects), RLE
helpers on hand-computed boxes, the report, and the pairs writer/reader round trip."""
import numpy as np
import pytest

from calico_jax.data import coco_parts, pairs, pairs_io, rle
from calico_jax.data import skips as report


def test_reexports_are_the_same_objects():
    for name in ("DataError", "Report"):
        assert getattr(coco_parts, name) is getattr(report, name)
    for name in ("decode", "encode", "rle_union", "rle_area", "rle_intersection_area", "to_rle"):
        assert getattr(coco_parts, name) is getattr(rle, name)
    for name in ("SEG_RE", "Pairs", "read_pairs", "write_pairs", "validate_sample"):
        assert getattr(pairs, name) is getattr(pairs_io, name)
    assert set(coco_parts.__all__) <= set(dir(coco_parts)) and set(pairs.__all__) <= set(dir(pairs))


def box(x0, y0, x1, y1, h=20, w=30):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_rle_helpers_on_boxes():
    a, b = rle.encode(box(0, 0, 10, 10)), rle.encode(box(5, 5, 15, 12))
    assert rle.rle_area(a) == 100 and rle.rle_area(b) == 70
    assert rle.rle_intersection_area(a, b) == 25
    u = rle.rle_union([a, b])
    np.testing.assert_array_equal(rle.decode(u), box(0, 0, 10, 10) | box(5, 5, 15, 12))
    rep = report.Report()
    poly = rle.to_rle([[2, 3, 12, 3, 12, 8, 2, 8]], 20, 30, "r", rep)
    assert rle.rle_area(poly) == pytest.approx(50, abs=12) and len(rep) == 0
    assert rle.to_rle([[1, 1, 2, 2, 3, 3]], 20, 30, "colinear", rep) is None
    assert rle.to_rle({"size": [10, 10], "counts": "00"}, 20, 30, "size", rep) is None
    assert rep.counts() == {"degenerate_polygon": 1, "mask_outside_image": 1}
    with pytest.raises(report.DataError, match="degenerate_polygon: colinear"):
        rle.to_rle([[1, 1, 2, 2, 3, 3]], 20, 30, "colinear", report.Report(strict=True))


def test_pairs_file_round_trip(tmp_path):
    m = rle.encode(box(0, 0, 4, 4))
    data = {"format": "calico_jax.pairs", "version": 1, "seed": 0, "config": {},
            "sources": [{"path": "a.json", "convention": "paco", "images_root": "imgs"}],
            "images": [{"source": 0, "image_id": i, "file": f"{i}.jpg", "height": 20, "width": 30} for i in (1, 2)],
            "masks": [{"image": i, "object": "mug", "part": None, "area": 16, "rle": m} for i in (0, 1)],
            "samples": [{"id": "common_object-0000000", "task": "common_object", "images": [0, 1],
                         "prompt": "The <image> (IMAGE1) and <image> (IMAGE2) x", "template": 0,
                         "answer": "The images show a <p> mug </p> [SEG] (IMAGE1) [SEG] (IMAGE2).",
                         "objects": ["mug", "mug"], "parts": [[], []],
                         "segs": [{"mask": 0, "image": 0, "label": "mug", "kind": "object"},
                                  {"mask": 1, "image": 1, "label": "mug", "kind": "object"}]}],
            "counts": {"common_object": 1}, "report": {"counts": {}, "records": []}}
    p = pairs_io.read_pairs(pairs_io.write_pairs(data, tmp_path / "p.json"), images_root=tmp_path)
    assert len(p) == 1 and p.image_path(p.samples[0], 1) == tmp_path / "2.jpg"
    np.testing.assert_array_equal(p.mask(p.samples[0]["segs"][1]), box(0, 0, 4, 4))
    data["samples"][0]["segs"][1]["image"] = 0
    pairs_io.write_pairs(data, tmp_path / "bad.json")
    with pytest.raises(report.DataError, match="common_object-0000000"):
        pairs_io.read_pairs(tmp_path / "bad.json")
