"""COCO part readers: PACO, PartImageNet (+ *_whole), ADE20K-Part-234 fixtures, and each bad-input class."""
import json

import numpy as np
import pytest
from PIL import Image

from calico_jax.data.coco_parts import DataError, Report, clean_name, decode, encode, load_part_dataset


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def box_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def paco_fixture(tmp_path):
    m = box_mask(40, 50, 5, 5, 20, 30)
    rle = encode(m)
    unc = {"size": [40, 50], "counts": [5 * 40 + 5, 10, 30, 10, 40 * 50 - 5 * 40 - 5 - 50]}   # two col runs
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 50},
                   {"id": 2, "file_name": "b.jpg", "height": 40, "width": 50}],
        "categories": [{"id": 1, "name": "mug", "supercategory": "OBJECT"},
                       {"id": 2, "name": "mug:handle", "supercategory": "PART"},
                       {"id": 3, "name": "mug:body", "supercategory": "PART"},
                       {"id": 4, "name": "car_(automobile)", "supercategory": "OBJECT"}],
        "part_categories": [{"id": 50, "name": "wheel", "supercategory": "PART"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": rle, "obj_ann_id": 10},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": rect(5, 5, 10, 30), "obj_ann_id": 10},
            {"id": 12, "image_id": 1, "category_id": 3, "segmentation": unc, "obj_ann_id": 10},
            {"id": 13, "image_id": 1, "category_id": 2, "segmentation": rect(15, 5, 20, 10), "obj_ann_id": 10},
            {"id": 20, "image_id": 2, "category_id": 4, "segmentation": rect(0, 0, 50, 20), "obj_ann_id": 20},
            {"id": 21, "image_id": 2, "category_id": 50, "segmentation": rect(0, 10, 10, 20), "obj_ann_id": 20},
        ]}
    return write(tmp_path / "paco_lvis_v1_val.json", data), m


def test_paco_reader_links_parts_and_decodes_all_mask_encodings(tmp_path):
    path, m = paco_fixture(tmp_path)
    ds = load_part_dataset(path)
    assert ds.convention == "paco" and len(ds.report) == 0
    (mug,), (car,) = ds.images[0].objects, ds.images[1].objects
    assert mug.name == "mug" and np.array_equal(decode(mug.rle), m)
    assert sorted(mug.parts) == ["body", "handle"]
    assert len(mug.parts["handle"]) == 2 and mug.part_ann_ids["handle"] == [11, 13]   # same name kept together
    assert np.array_equal(decode(mug.parts["handle"][0]), box_mask(40, 50, 5, 5, 10, 30))
    body = decode(mug.parts["body"][0])                       # uncompressed RLE (column-major runs)
    assert body.sum() == 20 and body[5:15, 5].all() and body[5:15, 6].all()
    assert car.name == "car_(automobile)" and list(car.parts) == ["wheel"]   # part_categories-only id
    assert clean_name(car.name) == "car"


def partimagenet_fixture(tmp_path, with_whole=True):
    part = {"images": [{"id": 7, "file_name": "n0001_1.JPEG", "height": 30, "width": 60}],
            "categories": [{"id": 0, "name": "Quadruped Head", "supercategory": "Quadruped"},
                           {"id": 1, "name": "body", "supercategory": "quadruped"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 0, "segmentation": rect(0, 0, 10, 10)},
                            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": rect(10, 0, 25, 20)},
                            {"id": 3, "image_id": 7, "category_id": 0, "segmentation": rect(35, 0, 45, 10)},
                            {"id": 4, "image_id": 7, "category_id": 1, "segmentation": rect(45, 0, 60, 25)}]}
    whole = {"images": [{"id": 99, "file_name": "n0001_1.JPEG", "height": 30, "width": 60}],
             "categories": [{"id": 5, "name": "antelope", "supercategory": "quadruped"},
                            {"id": 6, "name": "dog", "supercategory": "quadruped"}],
             "annotations": [{"id": 1, "image_id": 99, "category_id": 5, "segmentation": rect(0, 0, 28, 22)},
                             {"id": 2, "image_id": 99, "category_id": 6, "segmentation": rect(33, 0, 60, 27)}]}
    p = write(tmp_path / "annotations" / "train" / "train_mixed_parts.json", part)
    if with_whole:
        write(tmp_path / "annotations" / "train_whole" / "train_whole_mixed_parts.json", whole)
    return p


def test_partimagenet_whole_file_found_and_parts_go_to_overlapping_object(tmp_path):
    ds = load_part_dataset(partimagenet_fixture(tmp_path))
    assert ds.convention == "partimagenet" and len(ds.report) == 0
    objs = {o.name: o for o in ds.images[0].objects}
    assert sorted(objs) == ["antelope", "dog"]
    assert objs["antelope"].part_ann_ids == {"head": [1], "body": [2]}      # "Quadruped Head" -> "head"
    assert objs["dog"].part_ann_ids == {"head": [3], "body": [4]}
    whole = load_part_dataset(tmp_path / "annotations" / "train_whole" / "train_whole_mixed_parts.json")
    assert whole.convention == "objects" and [o.parts for o in whole.images[0].objects] == [{}, {}]


def test_partimagenet_without_whole_uses_supercategory_object(tmp_path):
    ds = load_part_dataset(partimagenet_fixture(tmp_path, with_whole=False))
    (ob,) = ds.images[0].objects
    assert ob.name == "quadruped" and sorted(ob.parts) == ["body", "head"]
    assert decode(ob.rle).sum() == 100 + 300 + 100 + 375


def test_ade20k_part_maps_and_json_parts(tmp_path):
    h, w = 20, 30
    pmap = np.full((h, w), 255, np.uint8)
    pmap[0:10, 0:10] = 1      # chair's leg
    pmap[10:20, 0:10] = 0     # chair's back
    pmap[0:10, 20:30] = 1     # outside the chair object -> not its part
    (tmp_path / "parts").mkdir()
    Image.fromarray(pmap).save(tmp_path / "parts" / "ADE_train_1.png")
    (tmp_path / "names.txt").write_text("chair's back\nchair's leg\nsofa's arm\n")
    data = {"images": [{"id": 1, "file_name": "ADE_train_1.jpg", "height": h, "width": w}],
            "categories": [{"id": 8, "name": "chair"}, {"id": 300, "name": "chair's seat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 8,
                             "segmentation": encode(box_mask(h, w, 0, 0, 15, 20)),
                             "part_category_id": [0, 1]},
                            {"id": 2, "image_id": 1, "category_id": 300, "segmentation": rect(10, 5, 14, 9)}]}
    path = write(tmp_path / "ade20k_instance_train.json", data)
    ds = load_part_dataset(path, part_maps=tmp_path / "parts", part_names=tmp_path / "names.txt")
    assert ds.convention == "ade20k_part" and len(ds.report) == 0
    (chair,) = ds.images[0].objects
    assert sorted(chair.parts) == ["back", "leg", "seat"]
    assert np.array_equal(decode(chair.parts["leg"][0]), box_mask(h, w, 0, 0, 10, 10))
    assert np.array_equal(decode(chair.parts["back"][0]), box_mask(h, w, 0, 10, 10, 20))
    with pytest.raises(DataError, match="part names"):
        load_part_dataset(path, part_maps=tmp_path / "parts")


def bad_fixture(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 20},
                       {"id": 1, "file_name": "dup.jpg", "height": 20, "width": 20}],
            "categories": [{"id": 1, "name": "mug"}, {"id": 2, "name": "mug:handle"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rect(0, 0, 10, 10), "obj_ann_id": 1},
                {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rect(0, 0, 5, 5), "obj_ann_id": 1},
                {"id": 2, "image_id": 1, "category_id": 77, "segmentation": rect(0, 0, 5, 5), "obj_ann_id": 2},
                {"id": 3, "image_id": 42, "category_id": 1, "segmentation": rect(0, 0, 5, 5), "obj_ann_id": 3},
                {"id": 4, "image_id": 1, "category_id": 2, "segmentation": [[1, 1, 5, 5]], "obj_ann_id": 1},
                {"id": 5, "image_id": 1, "category_id": 2, "segmentation": [[0, 0, 5, 5, 10, 10]], "obj_ann_id": 1},
                {"id": 6, "image_id": 1, "category_id": 2, "segmentation": rect(30, 30, 40, 40), "obj_ann_id": 1},
                {"id": 7, "image_id": 1, "category_id": 2, "segmentation": {"size": [10, 10], "counts": "PP1"},
                 "obj_ann_id": 1},
                {"id": 8, "image_id": 1, "category_id": 2, "segmentation": [], "obj_ann_id": 1},
                {"id": 9, "image_id": 1, "category_id": 2, "segmentation": rect(2, 2, 6, 6), "obj_ann_id": 555},
                {"id": 10, "image_id": 1, "category_id": 2, "segmentation": rect(2, 2, 6, 6), "obj_ann_id": 1},
            ]}
    return write(tmp_path / "bad_paco.json", data)


EXPECTED = {"duplicate_image_id": "image id=1", "duplicate_annotation_id": "annotation id=1 ",
            "unknown_category_id": "annotation id=2 ", "unknown_image_id": "annotation id=3 ",
            "degenerate_polygon": "annotation id=4 ", "mask_outside_image": "annotation id=6 ",
            "empty_segmentation": "annotation id=8 ", "orphan_part": "annotation id=9 "}


def test_bad_records_are_skipped_counted_and_named(tmp_path):
    ds = load_part_dataset(bad_fixture(tmp_path))
    counts = ds.report.counts()
    assert counts == {"degenerate_polygon": 2, "duplicate_annotation_id": 1, "duplicate_image_id": 1,
                      "empty_segmentation": 1, "mask_outside_image": 2, "orphan_part": 1,
                      "unknown_category_id": 1, "unknown_image_id": 1}
    for kind, name in EXPECTED.items():
        assert any(k == kind and name in r for k, r, _ in ds.report.entries), kind
    (mug,) = ds.images[0].objects
    assert mug.part_ann_ids == {"handle": [10]}                   # only the good part survives
    assert "orphan_part: 1 (bad_paco.json: annotation id=9" in ds.report.summary()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_strict_raises_on_first_bad_record_naming_it(tmp_path, kind):
    path = bad_fixture(tmp_path)
    data = json.loads(path.read_text())
    # keep only the one bad record of this kind (plus the good object it may need)
    if kind != "duplicate_image_id":
        data["images"] = data["images"][:1]
    wanted = {"duplicate_image_id": [], "duplicate_annotation_id": [0, 1], "unknown_category_id": [0, 2],
              "unknown_image_id": [0, 3], "degenerate_polygon": [0, 4], "mask_outside_image": [0, 6],
              "empty_segmentation": [0, 8], "orphan_part": [0, 9]}[kind]
    data["annotations"] = [data["annotations"][i] for i in wanted]
    write(path, data)
    with pytest.raises(DataError, match=kind) as e:
        load_part_dataset(path, strict=True)
    assert "bad_paco.json" in str(e.value) and EXPECTED[kind].strip() in str(e.value)


def test_unreadable_file_and_unknown_convention(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="x.json"):
        load_part_dataset(tmp_path / "x.json")
    write(tmp_path / "y.json", {"images": []})
    with pytest.raises(DataError, match="not a COCO"):
        load_part_dataset(tmp_path / "y.json")
    with pytest.raises(DataError, match="convention"):
        load_part_dataset(tmp_path / "y.json", convention="lvis")


def test_report_accumulates_across_files(tmp_path):
    rep = Report()
    load_part_dataset(bad_fixture(tmp_path), report=rep)
    n = len(rep)
    load_part_dataset(bad_fixture(tmp_path), report=rep)
    assert len(rep) == 2 * n > 0


def test_clean_name():
    assert clean_name("glass_(drink_container)") == "glass"
    assert clean_name("door_handle") == "door handle"
    assert clean_name("Quadruped  Head") == "quadruped head"
