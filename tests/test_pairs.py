"""MixedParts-style pair builder: task logic on a hand-made set, answer/[SEG] format, determinism, the CLI,
bad images, the reader."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from calico_jax.data import pairs, synthetic
from calico_jax.data.coco_parts import DataError, Report, load_part_dataset
from calico_jax.data.pairs import PairBuilder, PairConfig, read_pairs, write_pairs

# image id -> (class, {part: [x0, y0, x1, y1]})
HAND = {1: ("chair", {"back": (10, 5, 20, 30), "seat": (10, 30, 50, 40), "leg": (10, 40, 20, 60)}),
        2: ("stool", {"seat": (10, 20, 50, 30), "leg": (15, 30, 25, 60)}),
        3: ("chair", {"back": (30, 2, 44, 30), "seat": (20, 30, 60, 42), "leg": (40, 42, 50, 62)}),
        4: ("mug", {"body": (10, 10, 40, 50), "handle": (40, 20, 50, 40)}),
        5: ("mug", {"body": (5, 5, 45, 60)})}
PART_SETS = {i: set(p) for i, (_, p) in HAND.items()}


def box(x0, y0, x1, y1, h=64, w=64):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture()
def hand(tmp_path):
    cats = [{"id": 1, "name": "chair"}, {"id": 2, "name": "stool"}, {"id": 3, "name": "mug"}]
    cid = {c["name"]: c["id"] for c in cats}
    anns, images = [], []
    for iid, (cls, parts) in HAND.items():
        images.append({"id": iid, "file_name": f"{iid}.jpg", "height": 64, "width": 64})
        Image.fromarray(np.full((64, 64, 3), 40 * iid, np.uint8)).save(tmp_path / f"{iid}.jpg")
        obj = len(anns) + 1
        x0s, y0s, x1s, y1s = zip(*parts.values())
        anns.append({"id": obj, "image_id": iid, "category_id": cid[cls], "obj_ann_id": obj,
                     "segmentation": [[min(x0s), min(y0s), max(x1s), min(y0s),
                                       max(x1s), max(y1s), min(x0s), max(y1s)]]})
        for p, (x0, y0, x1, y1) in parts.items():
            name = f"{cls}:{p}"
            if name not in {c["name"] for c in cats}:
                cats.append({"id": len(cats) + 1, "name": name})
            anns.append({"id": len(anns) + 1, "image_id": iid,
                         "category_id": next(c["id"] for c in cats if c["name"] == name),
                         "obj_ann_id": obj, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    path = tmp_path / "hand.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, tmp_path


def build(path, root, **kw):
    seed = kw.pop("seed", 0)
    ds = load_part_dataset(path)
    return PairBuilder([(ds, root)], PairConfig(min_object_area=10, min_part_area=4, **kw), seed).build()


def image_id(data, s, k):
    return data["images"][s["images"][k]]["image_id"]


def test_task_logic_on_hand_made_set(hand):
    data = build(*hand)
    assert data["counts"] == {"common_object": 4, "common_parts": 5, "unique_parts": 5}
    for s in data["samples"]:
        ids = [image_id(data, s, k) for k in range(len(s["images"]))]
        assert len(set(ids)) == 2 and s["objects"] == [HAND[i][0] for i in ids]
        if s["task"] == "common_object":
            assert s["objects"][0] == s["objects"][1] and s["parts"] == [[], []]
        elif s["task"] == "common_parts":
            common = sorted(PART_SETS[ids[0]] & PART_SETS[ids[1]])
            assert common and s["parts"] == [common, common]
            assert set(s["objects"]) != {"mug", "chair"} and set(s["objects"]) != {"mug", "stool"}
        else:
            assert s["parts"] == [sorted(PART_SETS[ids[0]] - PART_SETS[ids[1]]),
                                  sorted(PART_SETS[ids[1]] - PART_SETS[ids[0]])]
            assert any(s["parts"])
        # every [SEG] -> the right mask in the right image
        for seg in s["segs"]:
            cls, parts = HAND[image_id(data, s, seg["image"])]
            want = box(*parts[seg["label"]]) if seg["kind"] == "part" else None
            got = pairs.decode(data["masks"][seg["mask"]]["rle"])
            if want is not None:
                assert np.array_equal(got, want), (s["id"], seg)
            else:
                assert seg["label"] == cls and got.sum() > 0


def test_answer_and_prompt_format(hand):
    data = build(*hand)
    by_task = {}
    for s in data["samples"]:
        by_task.setdefault(s["task"], []).append(s)
        assert s["prompt"].startswith("The <image> (IMAGE1) and <image> (IMAGE2) provide an overview of the pictures. ")
        assert s["prompt"][len(pairs.PREFIX.format(images=pairs.images_phrase(2))):] in pairs.QUESTIONS[s["task"]]
        pairs.validate_sample(s, len(data["images"]), len(data["masks"]), data["masks"])
    co = by_task["common_object"][0]
    assert re.fullmatch(r"The images show an? <p> (chair|mug) </p> \[SEG\] \(IMAGE1\) \[SEG\] \(IMAGE2\)\.",
                        co["answer"])
    cp = next(s for s in by_task["common_parts"] if set(s["objects"]) == {"chair", "stool"})
    first = cp["objects"][0]
    other = "stool" if first == "chair" else "chair"
    assert cp["answer"] == (f"The images show a <p> {first} </p> [SEG] (IMAGE1) and a <p> {other} </p> [SEG] (IMAGE2). "
                            "The common parts are <p> leg </p> [SEG] (IMAGE1) [SEG] (IMAGE2) and "
                            "<p> seat </p> [SEG] (IMAGE1) [SEG] (IMAGE2).")
    up = next(s for s in by_task["unique_parts"] if s["objects"] == ["mug", "mug"])
    k = 0 if up["parts"][0] else 1
    assert up["answer"].endswith(f"The unique part is <p> handle </p> [SEG] (IMAGE{k + 1}).")
    assert "The images show a <p> mug </p> [SEG] (IMAGE1) [SEG] (IMAGE2)." in up["answer"]
    assert len({s["template"] for s in data["samples"]}) > 1        # several templates in use


def test_pair_table_without_auto_rule(hand):
    data = build(*hand, auto_pairs=False, pair_table=(("Chair", "mug"),))
    cross = [set(s["objects"]) for s in data["samples"] if len(set(s["objects"])) > 1]
    assert cross and all(c == {"chair", "mug"} for c in cross)
    assert all(s["task"] != "common_parts" or len(set(s["objects"])) == 1 for s in data["samples"])
    none = build(*hand, auto_pairs=False, same_class_parts=False)
    assert none["counts"]["common_parts"] == none["counts"]["unique_parts"] == 0


def test_per_task_and_seed(hand):
    a = build(*hand, per_task=7)
    assert a["counts"] == {"common_object": 7, "common_parts": 7, "unique_parts": 7}
    b = build(*hand, per_task=7)
    c = build(*hand, per_task=7, seed=1)
    assert json.dumps(a) == json.dumps(b) and json.dumps(a) != json.dumps(c)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return synthetic.generate(out, 36, seed=1, progress=False), out / "images"


def run_cli(capsys, *argv):
    rc = pairs.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_all_tasks_and_byte_identical(syn, tmp_path, capsys):
    ann, images = syn
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        rc, out, _ = run_cli(capsys, "--coco", ann, "--images", images, "--out", tmp_path / f"{name}.json",
                             "--seed", seed)
        assert rc == 0
        outs.append((tmp_path / f"{name}.json").read_bytes())
    for task in pairs.TASKS:
        n = int(re.search(rf"{task}: (\d+) samples", out).group(1))
        assert n > 0
    assert "skipped: 0" in out
    assert outs[0] == outs[1] and outs[0] != outs[2]
    p = read_pairs(tmp_path / "a.json")
    s = p.samples[0]
    assert p.image_path(s, 0).is_file() and p.mask(s["segs"][0]).shape == Image.open(p.image_path(s, 0)).size[::-1]


def test_three_images_per_sample(syn, tmp_path, capsys):
    ann, images = syn
    rc, _, _ = run_cli(capsys, "--coco", ann, "--images", images, "--out", tmp_path / "p.json", "--num_images", 3,
                       "--per_task", 10)
    assert rc == 0
    p = read_pairs(tmp_path / "p.json")
    assert {s["task"] for s in p.samples} == set(pairs.TASKS)
    for s in p.samples:
        assert len(s["images"]) == 3 and "(IMAGE3) provide" in s["prompt"] and len(set(s["images"])) == 3
        assert {seg["image"] for seg in s["segs"] if seg["kind"] == "object"} == {0, 1, 2}


def test_bad_images_are_skipped_and_named(syn, tmp_path, capsys):
    ann, images = syn
    import shutil
    work = tmp_path / "imgs"
    shutil.copytree(images, work)
    (work / "000001.jpg").unlink()                                       # missing
    (work / "000002.jpg").write_bytes(b"not a jpeg at all")              # corrupt header
    raw = (work / "000003.jpg").read_bytes()
    (work / "000003.jpg").write_bytes(raw[: len(raw) // 2])              # truncated
    Image.new("RGB", (7, 9)).save(work / "000004.jpg")                   # wrong size
    rc, out, _ = run_cli(capsys, "--coco", ann, "--images", work, "--out", tmp_path / "p.json")
    assert rc == 0
    assert "missing_image: 1 (annotations.json: image id=2 (000001.jpg))" in out
    assert "corrupt_image: 2" in out and "000002.jpg" in out and "000003.jpg" in out
    assert "image_size_mismatch: 1 (annotations.json: image id=5 (000004.jpg))" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["report"]["counts"] == {"corrupt_image": 2, "image_size_mismatch": 1, "missing_image": 1}
    assert not {im["file"] for im in data["images"]} & {"000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg"}
    rc, out, err = run_cli(capsys, "--coco", ann, "--images", work, "--out", tmp_path / "q.json", "--strict")
    assert rc == 2 and "missing_image: annotations.json: image id=2 (000001.jpg)" in err
    assert not (tmp_path / "q.json").exists()


def test_bad_annotations_counted_through_cli(hand, tmp_path, capsys):
    path, root = hand
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 999, "image_id": 1, "category_id": 12345, "segmentation": [[0, 0, 5, 0, 5, 5]]})
    path.write_text(json.dumps(data))
    rc, out, _ = run_cli(capsys, "--coco", f"{path},convention=paco", "--images", root, "--out", tmp_path / "p.json")
    assert rc == 0 and "unknown_category_id: 1 (hand.json: annotation id=999 (image id=1))" in out
    rc, _, err = run_cli(capsys, "--coco", path, "--images", root, "--out", tmp_path / "p.json", "--strict")
    assert rc == 2 and "annotation id=999" in err


def test_reader_rejects_inconsistent_samples(hand, tmp_path):
    data = build(*hand)
    write_pairs(data, tmp_path / "ok.json")
    assert len(read_pairs(tmp_path / "ok.json")) == len(data["samples"])
    bad = json.loads(json.dumps(data))
    s = next(s for s in bad["samples"] if s["task"] == "common_parts")
    s["answer"] = s["answer"].replace(" [SEG] (IMAGE2).", ".", 1)
    write_pairs(bad, tmp_path / "bad.json")
    with pytest.raises(DataError, match=s["id"]):
        read_pairs(tmp_path / "bad.json")
    bad = json.loads(json.dumps(data))
    bad["samples"][0]["segs"][0]["image"] = 1
    write_pairs(bad, tmp_path / "bad2.json")
    with pytest.raises(DataError, match=bad["samples"][0]["id"]):
        read_pairs(tmp_path / "bad2.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "mixed_parts"}))
    with pytest.raises(DataError, match="adapt read_pairs"):
        read_pairs(tmp_path / "other.json")


def test_builder_rejects_single_image_samples(hand):
    with pytest.raises(ValueError):
        PairBuilder([], PairConfig(num_images=1), 0, Report())


def test_task_names_take_dash_or_underscore():
    from calico_jax.data.pairs_schema import task_name

    assert task_name("common-parts") == task_name("common_parts") == "common_parts"
    assert task_name(" Unique-Parts ") == "unique_parts"
    with pytest.raises(ValueError, match="unknown task 'parts'; known: common-object, common-parts, unique-parts"):
        task_name("parts")
