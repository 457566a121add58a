"""CALICO's evaluation metrics (paper §5; paper-notes §5): AP50, mIoU, Recall, SS, S-IoU per task.

The paper's exact protocol (its Appendix C.2) is not public. The defaults follow the reference code
the paper most plausibly adapted -- GLaMM's GCG evaluation (groundingLMM eval/gcg/evaluate.py) for
the mask metrics and Osprey's (osprey/eval/lvis_paco_eval.py) for the label metrics -- and every
open choice is a :class:`MetricConfig` switch:

* **AP50**: COCO ``segm`` AP at IoU 0.5, one category, scores = ``Mask.score``, maxDets 100, area
  "all", one COCO image per (sample, image). Predictions on an image without ground truth are false
  positives. Undefined (NaN) when there is no ground truth at all.
* **Matching** of predicted to GT masks, always within one image: ``greedy`` (GLaMM: repeat the
  row-major first argmax IoU, remove its row and column, stop when the best IoU is 0) or
  ``hungarian`` (maximum total IoU; pairs with IoU 0 are dropped).
* **mIoU** (``miou_average``): per unit, the mean IoU of the matched pairs (``matched``, GLaMM: extra
  or missed masks do not lower it) or matched IoUs summed over the GT masks (``gt``: a missed GT
  counts 0). A unit is an image (``scope="image"``, GLaMM) or a sample (``scope="sample"``, pairs
  pooled over its images); the metric is the mean over units. Units without GT are skipped; a unit
  with GT but no predictions scores 0.
* **Recall** (GLaMM, micro-averaged): matched pairs with IoU >= ``iou_threshold`` and label
  similarity >= ``text_threshold``, over all GT masks. GLaMM breaks its loop at the first (highest
  IoU) pair that fails either test; ``recall_stop_at_first_miss`` reproduces that literally.
  GLaMM's similarity is bert-base-uncased; here it is the injected ``similarity`` (all-MiniLM-L6-v2).
* **SS / S-IoU** (Osprey): one item per GT mask (two instances of "wheel" are two items). Its
  predicted label is ``label_pairing="best"``: the best-scoring predicted label of the same image,
  taken separately for each metric (many predictions raise the chance of a good label, as the paper
  observes for PartGLEE), or ``"mask_match"``: the label of the mask matched to it (unmatched: 0).
  An image with GT but no predictions scores 0 for each item. Items are averaged per unit, then
  over units (``scope``). SS is the raw cosine (Osprey does not clip; in practice 0..1); S-IoU is
  |words(p) & words(g)| / |words(p) | words(g)| on whitespace words.
* Labels are normalised first (:func:`normalize_label`, Osprey's cleaning) unless
  ``normalize_labels=False``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from calico_jax.config import Config, ConfigError
from calico_jax.data.pairs import TASKS
from calico_jax.eval.sentence import normalize_label

Similarity = Callable[[str, str], float]
METRICS = ("AP50", "mIoU", "Recall", "SS", "S-IoU")


@dataclasses.dataclass
class Mask:
    """One mask of one image of a sample; ``rle`` is COCO RLE ``{"size": [h, w], "counts": ...}``."""

    image: int
    label: str
    rle: dict
    score: float = 1.0

    @classmethod
    def from_dict(cls, d: dict, where: str = "mask") -> "Mask":
        try:
            return cls(image=int(d["image"]), label=str(d["label"]), rle=d["rle"], score=float(d.get("score", 1.0)))
        except KeyError as e:
            raise ValueError(f"{where}: field {e} missing") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


@dataclasses.dataclass
class SampleResult:
    """Ground truth and predictions of one sample (an image pair/set and one task)."""

    id: str
    task: str
    num_images: int
    gt: list[Mask]
    pred: list[Mask]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SampleResult":
        sid = d.get("id", "?")
        try:
            return cls(id=str(d["id"]), task=str(d["task"]), num_images=int(d["num_images"]),
                       gt=[Mask.from_dict(m, f"sample {sid} gt[{i}]") for i, m in enumerate(d["gt"])],
                       pred=[Mask.from_dict(m, f"sample {sid} pred[{i}]") for i, m in enumerate(d["pred"])])
        except KeyError as e:
            raise ValueError(f"sample {sid}: field {e} missing") from None


@dataclasses.dataclass(frozen=True)
class MetricConfig(Config):
    """Evaluation protocol switches (module docstring); defaults = GLaMM mask metrics + Osprey text metrics."""

    iou_threshold: float = 0.5       # Recall: minimum IoU of a matched pair
    text_threshold: float = 0.5      # Recall: minimum label similarity of a matched pair
    matching: str = "greedy"         # "greedy" (GLaMM) | "hungarian"
    scope: str = "image"             # mIoU/SS/S-IoU unit: "image" | "sample"
    miou_average: str = "matched"    # "matched" (GLaMM: mean over matched pairs) | "gt" (over GT masks)
    label_pairing: str = "best"      # SS/S-IoU: "best" label of the image | "mask_match" (matched mask's label)
    recall_stop_at_first_miss: bool = False  # GLaMM's literal loop: stop at the first failing pair
    normalize_labels: bool = True    # Osprey's label cleaning before SS / S-IoU / Recall
    ap_backend: str = "numpy"        # "numpy" (this file) | "pycocotools" (COCOeval)
    ap_max_dets: int = 100           # COCO maxDets per image

    def __post_init__(self):
        for name, allowed in (("matching", ("greedy", "hungarian")), ("scope", ("image", "sample")),
                              ("miou_average", ("matched", "gt")), ("label_pairing", ("best", "mask_match")),
                              ("ap_backend", ("numpy", "pycocotools"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"MetricConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.ap_max_dets < 1:
            raise ConfigError(f"MetricConfig.ap_max_dets must be >= 1, got {self.ap_max_dets}")


# ------------------------------------------------------------------------------- per-image data
def _coco_rle(rle: Any, where: str) -> dict:
    """A pycocotools-ready RLE (bytes counts); uncompressed (list) counts are compressed."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"{where}: rle must be a COCO RLE dict with 'size' and 'counts'")
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}


@dataclasses.dataclass
class _Image:
    """One image of one sample: its masks (pycocotools RLEs) and the IoU matrix ``[n_pred, n_gt]``."""

    sample: int
    gt: list[Mask]
    pred: list[Mask]
    gt_rle: list[dict]
    pred_rle: list[dict]
    ious: np.ndarray
    size: tuple[int, int]


def _prepare(results: Sequence[SampleResult], progress: bool = False) -> list[_Image]:
    """Validates the samples and computes every image's IoU matrix once (pycocotools on RLEs)."""
    from tqdm import tqdm

    images = []
    for s_idx, s in enumerate(tqdm(results, desc="metrics", disable=not progress, dynamic_ncols=True)):
        if s.task not in TASKS:
            raise ValueError(f"sample {s.id}: unknown task {s.task!r}; expected one of {TASKS}")
        if s.num_images < 1:
            raise ValueError(f"sample {s.id}: num_images must be >= 1, got {s.num_images}")
        per: list[tuple[list, list, list, list]] = [([], [], [], []) for _ in range(s.num_images)]
        for kind, masks in (("gt", s.gt), ("pred", s.pred)):
            for i, m in enumerate(masks):
                where = f"sample {s.id} {kind}[{i}]"
                if not 0 <= m.image < s.num_images:
                    raise ValueError(f"{where}: image index {m.image} outside 0..{s.num_images - 1}")
                if not math.isfinite(m.score):
                    raise ValueError(f"{where}: score {m.score} is not finite")
                slot = per[m.image]
                (slot[0] if kind == "gt" else slot[1]).append(m)
                (slot[2] if kind == "gt" else slot[3]).append(_coco_rle(m.rle, where))
        for k, (gt, pred, gt_rle, pred_rle) in enumerate(per):
            sizes = {tuple(r["size"]) for r in gt_rle + pred_rle}
            if len(sizes) > 1:
                raise ValueError(f"sample {s.id} image {k}: masks of different sizes {sorted(sizes)}")
            ious = (np.asarray(mask_utils.iou(pred_rle, gt_rle, [0] * len(gt_rle)), np.float64).reshape(
                len(pred), len(gt)) if gt and pred else np.zeros((len(pred), len(gt))))
            images.append(_Image(s_idx, gt, pred, gt_rle, pred_rle, ious, sizes.pop() if sizes else (0, 0)))
    return images


def match(ious: np.ndarray, method: str = "greedy") -> list[tuple[int, int, float]]:
    """One-to-one (pred, gt, iou) pairs with IoU > 0, highest IoU first."""
    if ious.size == 0:
        return []
    if method == "greedy":
        left, pairs = np.array(ious, np.float64), []
        while True:
            p, g = np.unravel_index(np.argmax(left), left.shape)  # row-major first maximum, as GLaMM
            if left[p, g] <= 0:
                return pairs
            pairs.append((int(p), int(g), float(ious[p, g])))
            left[p, :] = -1.0
            left[:, g] = -1.0
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(ious, maximize=True)
        pairs = [(int(p), int(g), float(ious[p, g])) for p, g in zip(rows, cols) if ious[p, g] > 0]
        return sorted(pairs, key=lambda t: -t[2])
    raise ValueError(f"matching method {method!r}; expected 'greedy' or 'hungarian'")


def _units(images: list[_Image], scope: str) -> list[list[_Image]]:
    """Images grouped into averaging units (one per image or per sample) that have ground truth."""
    if scope == "image":
        groups = [[im] for im in images]
    else:
        by_sample: dict[int, list[_Image]] = defaultdict(list)
        for im in images:
            by_sample[im.sample].append(im)
        groups = list(by_sample.values())
    return [g for g in groups if any(im.gt for im in g)]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# ------------------------------------------------------------------------------- label scores
def word_iou(a: str, b: str) -> float:
    """S-IoU of two (already normalised) labels: word-set intersection over union; 0 if both empty."""
    wa, wb = set(a.split()), set(b.split())
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


class _LabelScore:
    """Memoised label score on normalised labels (labels repeat a lot across samples)."""

    def __init__(self, fn: Callable[[str, str], float], normalize: bool):
        self.fn, self.normalize, self.memo = fn, normalize, {}

    def __call__(self, pred: str, gt: str) -> float:
        if self.normalize:
            pred, gt = normalize_label(pred), normalize_label(gt)
        key = (pred, gt)
        if key not in self.memo:
            self.memo[key] = float(self.fn(pred, gt))
        return self.memo[key]


def _label_metric(images: list[_Image], score: _LabelScore, config: MetricConfig) -> float:
    unit_scores = []
    for unit in _units(images, config.scope):
        items = []
        for im in unit:
            if config.label_pairing == "best":
                items += [max((score(p.label, g.label) for p in im.pred), default=0.0) for g in im.gt]
            else:
                got = {gi: score(im.pred[pi].label, im.gt[gi].label) for pi, gi, _ in match(im.ious, config.matching)}
                items += [got.get(gi, 0.0) for gi in range(len(im.gt))]
        unit_scores.append(float(np.mean(items)))
    return _mean(unit_scores)


# ------------------------------------------------------------------------------- the metrics
def _miou(images: list[_Image], config: MetricConfig) -> float:
    unit_scores = []
    for unit in _units(images, config.scope):
        ious = [iou for im in unit for _, _, iou in match(im.ious, config.matching)]
        if config.miou_average == "matched":
            unit_scores.append(float(np.mean(ious)) if ious else 0.0)
        else:
            unit_scores.append(float(np.sum(ious)) / sum(len(im.gt) for im in unit))
    return _mean(unit_scores)


def _recall(images: list[_Image], score: _LabelScore, config: MetricConfig) -> float:
    hits, total = 0, 0
    for im in images:
        total += len(im.gt)
        for pi, gi, iou in match(im.ious, config.matching):
            ok = iou >= config.iou_threshold and score(im.pred[pi].label, im.gt[gi].label) >= config.text_threshold
            if not ok and config.recall_stop_at_first_miss:
                break
            hits += ok
    return hits / total if total else float("nan")


def _ap50_numpy(images: list[_Image], max_dets: int, iou_thr: float = 0.5) -> float:
    """COCOeval's segm AP at one IoU threshold, one category, area "all" (same ops, same ties)."""
    scores, matched, num_gt = [], [], 0
    for im in images:  # image-id order, as COCOeval concatenates its per-image results
        num_gt += len(im.gt)
        order = np.argsort([-p.score for p in im.pred], kind="mergesort")[:max_dets]
        taken = np.zeros(len(im.gt), bool)
        for d in order:
            best, m = min(iou_thr, 1 - 1e-10), -1
            for g in range(len(im.gt)):  # the last GT with the highest IoU >= threshold wins, as in COCOeval
                if taken[g] or im.ious[d, g] < best:
                    continue
                best, m = im.ious[d, g], g
            if m >= 0:
                taken[m] = True
            matched.append(m >= 0)
            scores.append(im.pred[d].score)
    if num_gt == 0:
        return float("nan")
    if not scores:
        return 0.0
    inds = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    tp = np.asarray(matched)[inds]
    tp_sum = np.cumsum(tp).astype(float)
    fp_sum = np.cumsum(~tp).astype(float)
    rc = tp_sum / num_gt
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope
    idx = np.searchsorted(rc, np.linspace(0.0, 1.0, 101), side="left")
    q = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0)
    return float(np.mean(q))


def _ap50_pycocotools(images: list[_Image], max_dets: int) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "mask"}]}
    dets = []
    for img_id, im in enumerate(images, start=1):
        gt["images"].append({"id": img_id, "height": im.size[0], "width": im.size[1]})
        for rle in im.gt_rle:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": img_id, "category_id": 1,
                                      "segmentation": rle, "area": float(mask_utils.area(rle)),
                                      "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
        dets += [{"image_id": img_id, "category_id": 1, "segmentation": rle, "score": p.score}
                 for p, rle in zip(im.pred, im.pred_rle)]
    if not gt["annotations"]:
        return float("nan")
    if not dets:  # COCO.loadRes cannot take an empty list
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # COCO/COCOeval print progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def ap50(results: Sequence[SampleResult], backend: str = "numpy", max_dets: int = 100) -> float:
    """COCO segm AP@0.5 over every image of ``results`` (fraction; NaN without any ground truth)."""
    return _ap50(_prepare(results), backend, max_dets)


def _ap50(images: list[_Image], backend: str, max_dets: int) -> float:
    if backend == "numpy":
        return _ap50_numpy(images, max_dets)
    if backend == "pycocotools":
        return _ap50_pycocotools(images, max_dets)
    raise ValueError(f"AP backend {backend!r}; expected 'numpy' or 'pycocotools'")


def miou(results: Sequence[SampleResult], config: MetricConfig = MetricConfig()) -> float:
    return _miou(_prepare(results), config)


def recall(results: Sequence[SampleResult], similarity: Similarity, config: MetricConfig = MetricConfig()) -> float:
    return _recall(_prepare(results), _LabelScore(similarity, config.normalize_labels), config)


def semantic_similarity(results: Sequence[SampleResult], similarity: Similarity,
                        config: MetricConfig = MetricConfig()) -> float:
    return _label_metric(_prepare(results), _LabelScore(similarity, config.normalize_labels), config)


def semantic_iou(results: Sequence[SampleResult], config: MetricConfig = MetricConfig()) -> float:
    return _label_metric(_prepare(results), _LabelScore(word_iou, config.normalize_labels), config)


def _prefetch(similarity: Similarity, results: Sequence[SampleResult], normalize: bool) -> None:
    """Batch-encodes every label once when ``similarity`` is a bound method of an encoder
    (``SentenceEncoder.similarity``): one jitted batch instead of one call per string."""
    encode = getattr(getattr(similarity, "__self__", None), "encode", None)
    if callable(encode):
        labels = {m.label for s in results for m in (*s.gt, *s.pred)}
        encode(sorted(normalize_label(x) if normalize else x for x in labels))


def evaluate(results: Sequence[SampleResult], config: MetricConfig = MetricConfig(),
             similarity: Similarity | None = None, progress: bool | None = None) -> dict:
    """All five metrics per task (in percent), their unweighted mean over the tasks present, and counts.
    ``similarity(a, b)``: label similarity (None = a :class:`SentenceEncoder`); ``progress``: a bar
    over the samples (None = only for 200 samples or more)."""
    if similarity is None:
        from calico_jax.eval.sentence import SentenceEncoder

        similarity = SentenceEncoder().similarity
    progress = len(results) >= 200 if progress is None else progress
    _prefetch(similarity, results, config.normalize_labels)
    sim = _LabelScore(similarity, config.normalize_labels)
    words = _LabelScore(word_iou, config.normalize_labels)
    images = _prepare(results, progress)
    by_task: dict[str, list[_Image]] = defaultdict(list)
    for im in images:
        by_task[results[im.sample].task].append(im)
    per_task, counts = {}, {}
    for task in TASKS:
        if task not in by_task:
            continue
        ims = by_task[task]
        counts[task] = len({im.sample for im in ims})
        values = {"AP50": _ap50(ims, config.ap_backend, config.ap_max_dets), "mIoU": _miou(ims, config),
                  "Recall": _recall(ims, sim, config), "SS": _label_metric(ims, sim, config),
                  "S-IoU": _label_metric(ims, words, config)}
        per_task[task] = {k: 100.0 * v for k, v in values.items()}
    mean = {k: float(np.mean([per_task[t][k] for t in per_task])) if per_task else float("nan") for k in METRICS}
    return {"per_task": per_task, "mean": mean, "num_samples": len(results), "per_task_samples": counts,
            "config": config.to_dict()}


__all__ = ["Mask", "SampleResult", "MetricConfig", "METRICS", "match", "word_iou", "ap50", "miou", "recall",
           "semantic_similarity", "semantic_iou", "evaluate"]
