"""The MixedParts authors' record format -> our pairs file: hand-made records (objects, parts, repeated mentions,
three images, every segmentation encoding), skips counted by reason, --strict, CLI errors; the converted samples
train the tiny CALICO and are scored by python -m calico_jax.evaluate."""
import json

import numpy as np
import pytest
from PIL import Image

from calico_jax.data import pairs
from calico_jax.data.mixed_parts import CODE_RE, display_name, infer_task, prompt_prefix
from calico_jax.data.pairs_io import read_pairs
from calico_jax.data.rle import encode

H, W = 48, 64
# boxes (x0, y0, x1, y1) per image file: the dog and its head
DOG = {"a.png": (4, 4, 40, 40), "b.png": (10, 8, 50, 44), "c.png": (20, 2, 60, 30)}
HEAD = {"a.png": (4, 4, 16, 14), "b.png": (10, 8, 22, 20), "c.png": (20, 2, 30, 12)}


def box(b):
    m = np.zeros((H, W), bool)
    m[b[1]:b[3], b[0]:b[2]] = True
    return m


def poly(b):
    x0, y0, x1, y1 = b
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed(m):
    flat = m.T.reshape(-1)   # column-major runs, starting with a run of zeros
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return {"size": [H, W], "counts": ([0] + runs) if flat[0] else runs}


def grounding(name, seg, obj_ann_id=None):
    g = {"segmentation": seg, "name": name}
    return g if obj_ann_id is None else {**g, "obj_ann_id": obj_ann_id}


def records():
    a, b, c = "a.png", "b.png", "c.png"
    good = [
        # 0: objects, 2 images, polygon + compressed RLE
        {"dataset_name": "paco_lvis", "img_ids": [1, 2], "q": "Can you segment the common object in these images?",
         "a": "The images show a dog_101 and a dog_201.",
         "groundings": {"img_1": [grounding("dog", poly(DOG[a]))], "img_2": [grounding("dog", encode(box(DOG[b])))]}},
        # 1: 3 images, objects and parts, repeated mentions, uncompressed RLE, ids as strings
        {"dataset_name": "paco_lvis", "img_ids": ["1", "2", "3"],
         "q": "What are the common parts of dog_101, dog_201 and dog_301?",
         "a": "The dog_101, dog_201 and dog_301 share head_10101, head_20101 and head_30101. "
              "The head_10101 of the dog_101 is the largest.",
         "groundings": {f"img_{k + 1}": [grounding("dog", uncompressed(box(DOG[f]))),
                                         grounding("dog:head", poly(HEAD[f]), obj_ann_id=10 + k)]
                        for k, f in enumerate((a, b, c))}},
        # 2: unique parts from another source (string image ids), part without obj_ann_id
        {"dataset_name": "ade20k_part234", "img_ids": ["ADE_1", "ADE_2"],
         "q": "Which parts are unique to the objects?", "a": "The door_handle_10101 is unique.",
         "groundings": {"img_1": [grounding("door_handle", poly(HEAD[a]))]}},
    ]
    bad = [
        {**good[0], "dataset_name": "pascal_part"},                                        # unknown_source
        {**good[0], "img_ids": [1, 999]},                                                  # unknown_image_id
        {**good[0], "a": "The images show a dog_101 and a dog_202 and a dog_201."},        # missing_grounding
        {**good[0], "groundings": {"img_1": [grounding("dog", poly((70, 50, 90, 60)))],
                                   "img_2": good[0]["groundings"]["img_2"]}},              # mask_outside_image
        {**good[0], "groundings": {"img_1": [grounding("dog", encode(np.ones((10, 10), bool)))],
                                   "img_2": good[0]["groundings"]["img_2"]}},              # RLE size != image
        {**good[0], "a": "The images show a dog_301."},                                    # bad_code
        {**good[0], "q": "Look at these."},                                                # unknown_task
        {**good[0], "q": 5},                                                               # bad_record
        {**good[0], "groundings": {"img_1": [grounding("dog", {"size": "a", "counts": "b"})],
                                   "img_2": good[0]["groundings"]["img_2"]}},              # bad_record
    ]
    return good, bad


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for f, b in DOG.items():
        px = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
        px[box(b)] = (200, 120, 40)
        px[box(HEAD[f])] = (240, 200, 160)
        Image.fromarray(px).save(root / "img" / f)
    paco = {"images": [{"id": i + 1, "file_name": f, "height": H, "width": W} for i, f in enumerate(DOG)],
            "annotations": [{"id": 10 + i, "image_id": i + 1, "category_id": 1, "segmentation": poly(DOG[f])}
                            for i, f in enumerate(DOG)],
            "categories": [{"id": 1, "name": "dog", "supercategory": "animal"},
                           {"id": 2, "name": "dog:head", "supercategory": "animal"}]}
    ade = {"images": [{"id": "ADE_1", "file_name": "a.png", "height": H, "width": W},
                      {"id": "ADE_2", "file_name": "b.png", "height": H, "width": W}],
           "annotations": [], "categories": [{"id": 1, "name": "door"}]}
    (root / "paco.json").write_text(json.dumps(paco))
    (root / "ade.json").write_text(json.dumps(ade))
    good, bad = records()
    (root / "good.json").write_text(json.dumps(good))
    (root / "all.json").write_text(json.dumps(good + bad))
    return root


def cli(root, records_file, *extra):
    return ["--from-mixed-parts", str(root / records_file), "--coco", f"paco_lvis={root / 'paco.json'}",
            "--coco", f"ade20k_part234={root / 'ade.json'}", "--images", str(root / "img"), *extra]


def test_codes_names_tasks_prompts():
    assert [m.group(0) for m in CODE_RE.finditer("a dog_101, front_wheel_20311 and x_1234 or y_12")] == [
        "dog_101", "front_wheel_20311"]
    assert display_name("car_(automobile)") == "car" and display_name("mug:handle") == "handle"
    assert infer_task("Which parts differ?") == "unique_parts" and infer_task("the common parts") == "common_parts"
    assert infer_task("the common object") == "common_object" and infer_task("hello") is None
    assert prompt_prefix(3, "author") == ("The <image> (IMAGE1), <image> (IMAGE2), and <image> (IMAGE3) provide an "
                                          "overview of the pictures.\n")
    assert prompt_prefix(1, "author") == "The <image> (IMAGE1) provides an overview of the picture.\n"
    assert prompt_prefix(2) == "The <image> (IMAGE1) and <image> (IMAGE2) provide an overview of the pictures. "


def test_convert_hand_made_records(files, tmp_path, capsys):
    out = tmp_path / "pairs.json"
    assert pairs.main(cli(files, "all.json", "--out", str(out))) == 0
    data = json.loads(out.read_text())
    p = read_pairs(out, images_root=None)   # validates every sample's [SEG] / identifier / mask references
    assert data["report"]["counts"] == {"bad_code": 1, "bad_record": 2, "mask_outside_image": 2,
                                        "missing_grounding": 1, "unknown_image_id": 1, "unknown_source": 1,
                                        "unknown_task": 1}
    assert "skipped: 9" in capsys.readouterr().out
    s0, s1, s2 = p.samples
    assert [s["task"] for s in p.samples] == ["common_object", "common_parts", "unique_parts"]
    assert s0["answer"] == "The images show a <p> dog </p> [SEG] (IMAGE1) and a <p> dog </p> [SEG] (IMAGE2)."
    assert s0["prompt"] == prompt_prefix(2) + "Can you segment the common object in these images?"
    assert s1["answer"] == ("The <p> dog </p> [SEG] (IMAGE1), <p> dog </p> [SEG] (IMAGE2) and <p> dog </p> [SEG] "
                            "(IMAGE3) share <p> head </p> [SEG] (IMAGE1), <p> head </p> [SEG] (IMAGE2) and "
                            "<p> head </p> [SEG] (IMAGE3). The <p> head </p> (IMAGE1) of the <p> dog </p> (IMAGE1) "
                            "is the largest.")
    assert s1["prompt"] == prompt_prefix(3) + "What are the common parts of dog, dog and dog?"
    assert [(g["image"], g["label"], g["kind"]) for g in s1["segs"]] == [
        (0, "dog", "object"), (1, "dog", "object"), (2, "dog", "object"),
        (0, "head", "part"), (1, "head", "part"), (2, "head", "part")]
    assert s1["objects"] == ["dog"] * 3 and s1["parts"] == [["head"]] * 3
    assert s1["original"]["a"].startswith("The dog_101, dog_201") and s1["original"]["img_ids"] == ["1", "2", "3"]
    # every encoding decodes to the box it was made from; masks shared across samples
    for s in (s0, s1):
        for g in s["segs"]:
            f = p.image_path(s, g["image"]).name
            assert np.array_equal(p.mask(g), box((DOG if g["kind"] == "object" else HEAD)[f]))
    assert s0["segs"][0]["mask"] == s1["segs"][0]["mask"] and len(data["images"]) == 5   # 3 paco + 2 ade
    masks = {(m["object"], m["part"]) for m in data["masks"]}
    assert ("dog", "head") in masks and (None, "door handle") in masks   # obj_ann_id -> "dog"; none -> null
    assert s2["answer"] == "The <p> door handle </p> [SEG] (IMAGE1) is unique."
    assert p.image_path(s2, 1) == files / "img" / "b.png"


def test_strict_stops_at_first_bad_record(files, tmp_path, capsys):
    out = tmp_path / "pairs.json"
    assert pairs.main(cli(files, "all.json", "--out", str(out), "--strict")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown_source: all.json record 3") and "pascal_part" in err
    assert not out.exists()
    assert pairs.main(cli(files, "good.json", "--out", str(out), "--strict")) == 0


@pytest.mark.parametrize("args, needle", [
    (["--coco", "paco.json"], "--coco 'paco.json': expected SOURCE=FILE"),
    (["--coco", "paco_lvis=nope.json"], "cannot read COCO annotation file"),
    (["--images", "ade=img"], "sources ['ade'] have no --coco file"),
    (["--records", "missing.json"], "cannot read MixedParts records"),
    (["--records", "paco.json"], "expected a JSON list of records"),
])
def test_cli_errors(files, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(files)
    argv = cli(files, "good.json", "--out", str(tmp_path / "p.json"))
    if args[0] == "--records":
        argv[1] = args[1]
    else:
        argv += args
    assert pairs.main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.fixture(scope="module")
def converted(files, tmp_path_factory):
    path = tmp_path_factory.mktemp("converted") / "pairs.json"
    assert pairs.main(cli(files, "good.json", "--out", str(path), "--task", "common_parts")) == 0
    return path


def test_converted_samples_make_training_batches(converted, tmp_path):
    """The training input path (grain pipeline: tokenizer, [SEG] routing, images, masks) on 2- and 3-image samples."""
    from calico_jax.core.preprocess import Preprocess
    from calico_jax.core.tokens import SEG_TOKEN
    from calico_jax.data.pipeline import Pipeline, PipelineConfig
    from calico_jax.data.tokenize import build_tiny_tokenizer

    p = read_pairs(converted)
    tok = build_tiny_tokenizer(tmp_path / "tok", [s["prompt"] + " " + s["answer"] for s in p.samples], 300)
    cfg = PipelineConfig(batch_size=3, max_images=3, max_segs=6, max_tokens=320, shuffle=False, hflip=0.0,
                         color_jitter=0.0, num_threads=1, prefetch_buffer_size=1,
                         preprocess=Preprocess(blip_size=28, dinov2_size=42, dinov2_crop=42, sam_size=32, mask_size=32))
    pipe = Pipeline(p, tok, cfg, 0, 1)
    assert len(pipe.report) == 0
    batch = next(iter(pipe.dataset()))
    seg_id = tok.convert_tokens_to_ids(SEG_TOKEN)
    for row, k in enumerate(batch["sample_index"].tolist()):
        s = p.samples[k]
        n_seg = int((batch["input_ids"][row] == seg_id).sum())
        assert n_seg == len(s["segs"]) == int(batch["mask_valid"][row].sum())
        assert batch["seg_image"][row, :n_seg].tolist() == [g["image"] for g in s["segs"]]
        assert batch["image_valid"][row].tolist() == [k < len(s["images"]) for k in range(3)]
        assert all(batch["masks"][row, j].any() for j in range(n_seg))


def test_converted_samples_evaluate(converted, tmp_path):
    """python -m calico_jax.evaluate on the converted file: ground-truth copies score 100 on every mask metric."""
    from calico_jax.inference.evaluate import main as evaluate_main

    data = json.loads(converted.read_text())
    preds = [{"id": s["id"], "masks": [{"label": g["label"], "image": g["image"],
                                        "rle": data["masks"][g["mask"]]["rle"]} for g in s["segs"]]}
             for s in data["samples"]]
    (tmp_path / "pred.json").write_text(json.dumps({"format": "calico_jax.predictions", "samples": preds}))
    assert evaluate_main(["--predictions", str(tmp_path / "pred.json"), "--pairs", str(converted),
                          "--out", str(tmp_path / "report.json")]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["per_task_samples"] == {"common_parts": 3}
    for metric in ("AP50", "mIoU", "Recall"):
        assert rep["per_task"]["common_parts"][metric] == pytest.approx(100.0), metric


def test_converted_samples_train_tiny_calico(converted, tmp_path):
    from calico_jax.train import config as config_lib
    from calico_jax.train.loop import train

    cfg = config_lib.load("configs/tiny.py", [
        ("total_steps", "2"), ("checkpoint_every", "100"), ("progress", "false"), ("batch_size", "2"),
        ("data.pairs", str(converted)), ("data.max_images", "3"), ("data.max_tokens", "256"),
        ("model.seg.max_seg", "6"), ("mesh", '{"data": 1, "fsdp": 1, "tensor": 1}'), ("num_devices", "1")])
    train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["loss"]) and r["num_masks"] > 0 for r in steps)
