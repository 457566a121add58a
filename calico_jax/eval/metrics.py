"""CALICO's evaluation metrics (paper §5): AP50, mIoU, Recall, SS, S-IoU per task.

The paper's exact protocol (its Appendix C.2) is not public. The defaults follow the reference code
the paper most plausibly adapted -- GLaMM's GCG evaluation (groundingLMM eval/gcg/evaluate.py) for
the mask metrics and Osprey's (osprey/eval/lvis_paco_eval.py) for the label metrics -- and every
open choice is a :class:`MetricConfig` switch:

* **AP50**, **matching** (``matching``: ``greedy`` as GLaMM, or ``hungarian``) and **mIoU**
  (``miou_average``, ``scope``): mask-only, in :mod:`calico_jax.eval.masks` (its docstring has the
  definitions).
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

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from calico_jax.config import Config, ConfigError
from calico_jax.data.pairs import TASKS
from calico_jax.eval.masks import ImageMasks, SampleResult, image_ap50, image_miou, match, mean_or_nan, prepare, units
from calico_jax.eval.sentence import normalize_label

Similarity = Callable[[str, str], float]
METRICS = ("AP50", "mIoU", "Recall", "SS", "S-IoU")


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
    ap_backend: str = "numpy"        # "numpy" (eval/masks.py) | "pycocotools" (COCOeval)
    ap_max_dets: int = 100           # COCO maxDets per image

    def __post_init__(self):
        for name, allowed in (("matching", ("greedy", "hungarian")), ("scope", ("image", "sample")),
                              ("miou_average", ("matched", "gt")), ("label_pairing", ("best", "mask_match")),
                              ("ap_backend", ("numpy", "pycocotools"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"MetricConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.ap_max_dets < 1:
            raise ConfigError(f"MetricConfig.ap_max_dets must be >= 1, got {self.ap_max_dets}")


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


def _label_metric(images: list[ImageMasks], score: _LabelScore, config: MetricConfig) -> float:
    unit_scores = []
    for unit in units(images, config.scope):
        items = []
        for im in unit:
            if config.label_pairing == "best":
                items += [max((score(p.label, g.label) for p in im.pred), default=0.0) for g in im.gt]
            else:
                got = {gi: score(im.pred[pi].label, im.gt[gi].label) for pi, gi, _ in match(im.ious, config.matching)}
                items += [got.get(gi, 0.0) for gi in range(len(im.gt))]
        unit_scores.append(float(np.mean(items)))
    return mean_or_nan(unit_scores)


# ------------------------------------------------------------------------------- the metrics
def _recall(images: list[ImageMasks], score: _LabelScore, config: MetricConfig) -> float:
    hits, total = 0, 0
    for im in images:
        total += len(im.gt)
        for pi, gi, iou in match(im.ious, config.matching):
            ok = iou >= config.iou_threshold and score(im.pred[pi].label, im.gt[gi].label) >= config.text_threshold
            if not ok and config.recall_stop_at_first_miss:
                break
            hits += ok
    return hits / total if total else float("nan")


def _miou(images: list[ImageMasks], config: MetricConfig) -> float:
    return image_miou(images, config.matching, config.scope, config.miou_average)


def miou(results: Sequence[SampleResult], config: MetricConfig = MetricConfig()) -> float:
    return _miou(prepare(results), config)


def recall(results: Sequence[SampleResult], similarity: Similarity, config: MetricConfig = MetricConfig()) -> float:
    return _recall(prepare(results), _LabelScore(similarity, config.normalize_labels), config)


def semantic_similarity(results: Sequence[SampleResult], similarity: Similarity,
                        config: MetricConfig = MetricConfig()) -> float:
    return _label_metric(prepare(results), _LabelScore(similarity, config.normalize_labels), config)


def semantic_iou(results: Sequence[SampleResult], config: MetricConfig = MetricConfig()) -> float:
    return _label_metric(prepare(results), _LabelScore(word_iou, config.normalize_labels), config)


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
    images = prepare(results, progress)
    by_task: dict[str, list[ImageMasks]] = defaultdict(list)
    for im in images:
        by_task[results[im.sample].task].append(im)
    per_task, counts = {}, {}
    for task in TASKS:
        if task not in by_task:
            continue
        ims = by_task[task]
        counts[task] = len({im.sample for im in ims})
        values = {"AP50": image_ap50(ims, config.ap_backend, config.ap_max_dets), "mIoU": _miou(ims, config),
                  "Recall": _recall(ims, sim, config), "SS": _label_metric(ims, sim, config),
                  "S-IoU": _label_metric(ims, words, config)}
        per_task[task] = {k: 100.0 * v for k, v in values.items()}
    mean = {k: float(np.mean([per_task[t][k] for t in per_task])) if per_task else float("nan") for k in METRICS}
    return {"per_task": per_task, "mean": mean, "num_samples": len(results), "per_task_samples": counts,
            "config": config.to_dict()}


__all__ = ["MetricConfig", "METRICS", "word_iou", "miou", "recall", "semantic_similarity", "semantic_iou", "evaluate"]
