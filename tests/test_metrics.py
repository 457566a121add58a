"""CALICO metrics on hand-computed cases; numpy AP50 against pycocotools COCOeval; the report file."""
import json
import math

import numpy as np
import pytest

from calico_jax.core.config import ConfigError
from calico_jax.data.rle import encode
from calico_jax.eval.masks import Mask, SampleResult, ap50, match
from calico_jax.eval.metrics import MetricConfig, evaluate, miou, recall, semantic_iou, semantic_similarity, word_iou
from calico_jax.eval.report import format_table, read_report, write_report

W = 20


def strip(lo, hi, w=W, h=2):
    """Columns [lo, hi) of an h x w image: IoUs of strips are interval IoUs."""
    m = np.zeros((h, w), bool)
    m[:, lo:hi] = True
    return encode(m)


def mk(image, label, lo, hi, score=1.0, w=W):
    return Mask(image, label, strip(lo, hi, w), score)


def sample(gt, pred, num_images=1, task="common_parts", sid="s"):
    return SampleResult(sid, task, num_images, gt, pred)


# Similarity for tests: identical labels 1, listed pairs their value, anything else 0.
SIMS = {frozenset(("tire", "wheel")): 0.6, frozenset(("seat", "seat cushion")): 0.8}


def fake_sim(a, b):
    return 1.0 if a == b else SIMS.get(frozenset((a, b)), 0.0)


# Crafted so greedy and Hungarian disagree: IoU(p0,g0)=8/14, IoU(p0,g1)=4/18, IoU(p1,g0)=5/10, IoU(p1,g1)=0.
CRAFTED = sample([mk(0, "a", 0, 10), mk(0, "b", 10, 20)], [mk(0, "a", 2, 14), mk(0, "b", 0, 5)])


def test_match_greedy_vs_hungarian():
    ious = np.array([[8 / 14, 4 / 18], [5 / 10, 0.0]])
    assert match(ious, "greedy") == [(0, 0, pytest.approx(8 / 14))]
    assert match(ious, "hungarian") == [(1, 0, 0.5), (0, 1, pytest.approx(4 / 18))]
    assert match(np.zeros((0, 3))) == [] and match(np.zeros((2, 2))) == []
    # GLaMM: the row-major first maximum wins a tie
    assert match(np.array([[0.5, 0.5], [0.5, 0.0]]), "greedy") == [(0, 0, 0.5)]


def test_miou_greedy_hungarian_and_average():
    assert miou([CRAFTED]) == pytest.approx(8 / 14)
    hung = MetricConfig(matching="hungarian")
    assert miou([CRAFTED], hung) == pytest.approx((0.5 + 4 / 18) / 2)
    assert miou([CRAFTED], MetricConfig(miou_average="gt")) == pytest.approx(8 / 14 / 2)
    assert miou([CRAFTED], hung.replace(miou_average="gt")) == pytest.approx((0.5 + 4 / 18) / 2)


def test_miou_scope_and_empty_images():
    s1 = sample([mk(0, "a", 0, 10), mk(0, "b", 10, 20), mk(1, "c", 0, 5)],
                [mk(0, "b", 10, 15), mk(0, "a", 0, 8), mk(1, "c", 0, 5)], num_images=2, sid="s1")
    # s2: image 0 has GT but no prediction (scores 0); image 1 has only a prediction (skipped: no GT)
    s2 = sample([mk(0, "a", 0, 10)], [mk(1, "a", 0, 10)], num_images=2, sid="s2")
    assert miou([s1]) == pytest.approx((0.65 + 1.0) / 2)  # image 0: pairs 0.8 and 0.5; image 1: 1.0
    assert miou([s1, s2]) == pytest.approx((0.65 + 1.0 + 0.0) / 3)
    assert miou([s1, s2], MetricConfig(scope="sample")) == pytest.approx(((0.8 + 0.5 + 1.0) / 3 + 0.0) / 2)
    assert math.isnan(miou([sample([], [mk(0, "a", 0, 5)])]))  # no GT anywhere: undefined


def test_recall_needs_iou_and_label():
    gt = [mk(0, "wheel", 0, 10), mk(0, "seat", 10, 20)]
    # p0 IoU 0.8 right label -> hit; p1 IoU 0.5, label "dog" -> miss
    assert recall([sample(gt, [mk(0, "wheel", 0, 8), mk(0, "dog", 10, 15)])], fake_sim) == 0.5
    # right label but IoU 0.4 -> miss, unless the IoU threshold is 0.4
    low_iou = [sample(gt, [mk(0, "wheel", 0, 8), mk(0, "seat", 10, 14)])]
    assert recall(low_iou, fake_sim) == 0.5
    assert recall(low_iou, fake_sim, MetricConfig(iou_threshold=0.4)) == 1.0
    # "Tire" ~ "wheel" at 0.6 (after normalisation): a hit at text threshold 0.5, a miss at 0.7
    tire = [sample(gt, [mk(0, "Tire.", 0, 8)])]
    assert recall(tire, fake_sim) == 0.5
    assert recall(tire, fake_sim, MetricConfig(text_threshold=0.7)) == 0.0
    # GT masks of an image without predictions still count
    assert recall([sample(gt + [mk(1, "x", 0, 5)], [mk(0, "wheel", 0, 8)], num_images=2)], fake_sim) == 1 / 3


def test_recall_stop_at_first_miss():
    gt = [mk(0, "wheel", 0, 10), mk(0, "seat", 10, 20)]
    s = [sample(gt, [mk(0, "dog", 0, 8), mk(0, "seat", 10, 15)])]  # best-IoU pair has a wrong label
    assert recall(s, fake_sim) == 0.5
    assert recall(s, fake_sim, MetricConfig(recall_stop_at_first_miss=True)) == 0.0


def test_word_iou_and_semantic_iou():
    assert word_iou("seat cushion", "seat") == 0.5
    assert word_iou("left front wheel", "front wheel arch") == 2 / 4
    assert word_iou("dog", "cat") == 0.0 and word_iou("", "") == 0.0
    gt = [mk(0, "Seat_Cushion", 0, 10)]
    preds = [mk(0, "dog", 0, 9), mk(0, "seat", 15, 20)]
    assert semantic_iou([sample(gt, preds)]) == 0.5                        # best label of the image
    assert semantic_iou([sample(gt, preds)], MetricConfig(label_pairing="mask_match")) == 0.0  # matched: "dog"
    assert semantic_iou([sample(gt, preds)], MetricConfig(label_cleaning="none")) == 0.0


def test_semantic_similarity_pairing_and_empty():
    s = sample([mk(0, "wheel", 0, 10), mk(0, "seat", 10, 20), mk(1, "seat cushion", 0, 10)],
               [mk(0, "tire", 0, 9), mk(0, "wheel", 15, 20), mk(1, "seat", 0, 3)], num_images=2)
    # best: image 0 wheel->1 (the "wheel" label), seat->0; image 1: 0.8 -> mean(0.5, 0.8)
    assert semantic_similarity([s], fake_sim) == pytest.approx((0.5 + 0.8) / 2)
    # mask_match: wheel matched to "tire" (0.6), seat to "wheel" (0); image 1 "seat" (0.8)
    mm = MetricConfig(label_pairing="mask_match")
    assert semantic_similarity([s], fake_sim, mm) == pytest.approx((0.3 + 0.8) / 2)
    assert semantic_similarity([s], fake_sim, mm.replace(scope="sample")) == pytest.approx((0.6 + 0 + 0.8) / 3)
    # an image with GT but no predictions contributes 0 (both pairings)
    empty = sample([mk(0, "wheel", 0, 10)], [])
    assert semantic_similarity([empty], fake_sim) == 0.0 == semantic_similarity([empty], fake_sim, mm)
    # mask_match: an unmatched GT (no overlap) is 0
    assert semantic_iou([sample([mk(0, "wheel", 0, 5)], [mk(0, "wheel", 10, 15)])], mm) == 0.0


def test_ap50_hand_computed():
    gt = [mk(0, "a", 0, 10), mk(0, "b", 10, 20)]
    preds = [mk(0, "a", 0, 10, 0.9), mk(0, "x", 5, 15, 0.8), mk(0, "b", 10, 20, 0.7)]  # TP, FP (IoU 1/3), TP
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    for backend in ("numpy", "pycocotools"):
        assert ap50([sample(gt, preds)], backend) == pytest.approx(expected, abs=1e-12)
    # a duplicate of a matched mask is a false positive; no predictions -> 0; no GT -> NaN
    assert ap50([sample(gt[:1], [mk(0, "a", 0, 10, 0.9), mk(0, "a", 0, 10, 0.95)])]) == pytest.approx(1.0)
    assert ap50([sample(gt[:1], [mk(0, "a", 0, 10, 0.95), mk(0, "a", 0, 10, 0.99)])]) == pytest.approx(1.0)
    assert ap50([sample(gt, [])]) == 0.0 == ap50([sample(gt, [])], "pycocotools")
    assert math.isnan(ap50([sample([], [mk(0, "a", 0, 5)])]))
    # predictions on an image without GT are false positives ranked above the TP
    fp_elsewhere = sample(gt[:1], [mk(0, "a", 0, 10, 0.5), mk(1, "a", 0, 10, 0.9)], num_images=2)
    assert ap50([fp_elsewhere]) == pytest.approx(0.5, abs=1e-12)


def random_samples(seed, n=25, size=(12, 16), many=False):
    rng = np.random.default_rng(seed)
    h, w = size

    def rect():
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        m = np.zeros((h, w), bool)
        m[y0:rng.integers(y0 + 1, h + 1), x0:rng.integers(x0 + 1, w + 1)] = True
        return m

    def jitter(m):
        m = m.copy()
        m ^= rng.random(m.shape) < 0.03
        return m

    out = []
    for i in range(n):
        gt, pred = [], []
        for k in range(2):
            gts = [rect() for _ in range(rng.integers(0, 4))]  # some images have no GT
            gt += [Mask(k, "g", encode(m)) for m in gts]
            ms = []
            for m in gts:
                if rng.random() < 0.8:                         # some GT are missed
                    ms.append(jitter(m))
                if rng.random() < 0.3:                         # duplicates
                    ms.append(jitter(m))
            ms += [rect() for _ in range(rng.integers(0, 3))]  # false positives
            if many and i == 0:
                ms += [jitter(gts[0]) if gts else rect() for _ in range(120)]  # beyond maxDets
            scores = np.round(rng.random(len(ms)), 1)        # coarse scores: many ties
            pred += [Mask(k, "p", encode(m), float(sc)) for m, sc in zip(ms, scores, strict=True)]
        out.append(SampleResult(f"r{i}", "common_parts", 2, gt, pred))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_ap50_numpy_matches_pycocotools(seed):
    results = random_samples(seed, many=seed == 4)
    a = ap50(results, "numpy")
    b = ap50(results, "pycocotools")
    assert 0.05 < b < 0.999
    assert a == pytest.approx(b, abs=1e-12)


def test_ap50_all_ties_matches_pycocotools():
    results = random_samples(7)
    for s in results:
        for p in s.pred:
            p.score = 1.0  # GLaMM's protocol: every prediction scores 1.0 -> order decides
    assert ap50(results, "numpy") == pytest.approx(ap50(results, "pycocotools"), abs=1e-12)


def test_evaluate_report_round_trip(tmp_path):
    obj = sample([mk(0, "dog", 0, 10), mk(1, "dog", 0, 10)], [mk(0, "dog", 0, 8), mk(1, "cat", 0, 10)],
                 num_images=2, task="common_object", sid="o")
    parts = sample([mk(0, "seat cushion", 0, 10)], [mk(0, "seat", 0, 4)], task="unique_parts", sid="u")  # IoU 0.4
    rep = evaluate([obj, parts, parts], MetricConfig(), fake_sim, progress=False)
    assert set(rep["per_task"]) == {"common_object", "unique_parts"}  # common_parts: no samples, omitted
    assert rep["num_samples"] == 3 and rep["per_task_samples"] == {"common_object": 1, "unique_parts": 2}
    o, u = rep["per_task"]["common_object"], rep["per_task"]["unique_parts"]
    assert o["mIoU"] == pytest.approx(90.0) and o["Recall"] == pytest.approx(50.0)
    assert o["SS"] == pytest.approx(50.0) and o["S-IoU"] == pytest.approx(50.0)
    assert u["mIoU"] == pytest.approx(40.0) and u["Recall"] == 0.0 and u["AP50"] == 0.0
    assert u["SS"] == pytest.approx(80.0) and u["S-IoU"] == pytest.approx(50.0)
    for m in o:
        assert rep["mean"][m] == pytest.approx((o[m] + u[m]) / 2)
    path = write_report(tmp_path / "sub" / "report.json", rep)
    assert read_report(path) == json.loads(json.dumps(rep))
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left
    table = format_table(rep).splitlines()
    assert table[0].split() == ["Task", "AP50", "mIoU", "Recall", "SS", "S-IoU"]
    assert table[2].startswith("Common objects") and table[3].startswith("Unique parts")
    assert table[-1].split()[0] == "Mean" and table[3].split()[2:] == ["0.0", "40.0", "0.0", "80.0", "50.0"]
    # two of the paper's three tasks: the mean row says it is not the paper's three-task mean
    assert table[-1].startswith("Mean of 2 of 3 tasks (common objects, unique parts)")
    assert rep["mean_tasks"] == ["common_object", "unique_parts"]


def test_report_nan_is_null(tmp_path):
    rep = evaluate([sample([], [mk(0, "a", 0, 5)], task="common_parts")], MetricConfig(), fake_sim)
    assert math.isnan(rep["per_task"]["common_parts"]["AP50"])
    back = read_report(write_report(tmp_path / "r.json", rep))
    assert back["per_task"]["common_parts"]["AP50"] is None
    assert format_table(back).splitlines()[2].split()[2] == "-"


def test_bad_inputs():
    with pytest.raises(ValueError, match="sample s gt\\[0\\]: image index 2"):
        miou([sample([mk(2, "a", 0, 5)], [])])
    with pytest.raises(ValueError, match="different sizes"):
        miou([sample([mk(0, "a", 0, 5)], [mk(0, "a", 0, 5, w=30)])])
    with pytest.raises(ValueError, match="unknown task 'parts'"):
        miou([sample([], [], task="parts")])
    with pytest.raises(ValueError, match="pred\\[0\\]: rle must be"):
        miou([sample([], [Mask(0, "a", {"counts": "x"})])])
    with pytest.raises(ConfigError, match="matching='best'"):
        MetricConfig(matching="best")
    assert MetricConfig.from_dict(MetricConfig(scope="sample").to_dict()) == MetricConfig(scope="sample")
    s = sample([mk(0, "a", 0, 5)], [mk(0, "b", 0, 4, 0.5)], sid="x")
    assert SampleResult.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="sample x pred\\[0\\]: field 'rle' missing"):
        SampleResult.from_dict({"id": "x", "task": "common_parts", "num_images": 1, "gt": [],
                                "pred": [{"image": 0, "label": "a"}]})
