"""CALICO's evaluation metrics (paper §5): AP50, mIoU, Recall, SS, S-IoU per task, and the protocol presets.

The paper's exact protocol (its Appendix C.2) is not public. Every open choice is a :class:`MetricConfig`
switch, and three presets (``MetricConfig.preset(name)``, ``python -m calico_jax.evaluate --protocol``) fix them:

* ``calico`` (default): our documented reading of the paper, close to the reference code it most plausibly
  adapted -- GLaMM's GCG evaluation (groundingLMM ``eval/gcg/evaluate.py``) for the mask metrics and
  Osprey's (``osprey/eval/lvis_paco_eval.py``) for the label metrics -- with our own choices where that
  code is ambiguous for multi-image samples (predicted scores rank AP50, images without GT are not
  averaged into mIoU, SS / S-IoU average per image, symmetric label cleaning).
* ``glamm``: GLaMM's GCG evaluation literally for AP50, mIoU and Recall: every prediction scores 1.0
  (``ap_score="one"``), mIoU averages over every image with 0 for one where nothing pairs
  (``miou_images="all"``), and Recall is GLaMM's ``find_best_matches`` loop: repeat the row-major first
  maximum of the GT x prediction IoU matrix, stop at the first pair that fails the IoU or the label test
  (``recall_order="gt_pred"``, ``recall_stop_at_first_miss``), raw labels (``recall_label_cleaning="none"``).
  SS / S-IoU, which GLaMM does not compute, keep the ``calico`` switches. Compare with GLaMM-style numbers
  (the paper's AP50 / mIoU / Recall columns for GLaMM-derived baselines).
* ``osprey``: Osprey's SS / S-IoU literally: pooled over every GT mask (``label_average="pooled"``) with
  Osprey's label cleaning (``label_cleaning="osprey"``, :mod:`calico_jax.eval.labels`). Which predicted label
  a GT mask is scored with stays ``label_pairing``: Osprey asks its model about each GT mask, which a model
  that grounds its own answer is not. The mask metrics keep the ``calico`` switches. Compare with
  Osprey-style SS / S-IoU numbers.

The metrics:

* **AP50**, **matching** (``matching``: ``greedy`` as GLaMM, or ``hungarian``) and **mIoU**
  (``miou_average``, ``miou_images``, ``scope``): mask-only, in :mod:`calico_jax.eval.masks` (its docstring
  has the definitions).
* **Recall** (GLaMM, micro-averaged): matched pairs with IoU >= ``iou_threshold`` and label similarity >=
  ``text_threshold``, over all GT masks. Pairs come from the mask matching (``matching``); with greedy
  matching, ``recall_order`` says which axis of the IoU matrix is read first, i.e. how exactly tied IoUs are
  ordered (``pred_gt``: ours; ``gt_pred``: GLaMM's). ``recall_stop_at_first_miss`` stops an image's walk at
  the first failing pair, as GLaMM's loop does. GLaMM's similarity is bert-base-uncased (mean of the last
  hidden states); here it is the injected ``similarity`` (all-MiniLM-L6-v2), under every preset.
* **SS / S-IoU** (Osprey): one item per GT mask (two instances of "wheel" are two items). Its predicted
  label is ``label_pairing="best"``: the best-scoring predicted label of the same image, taken separately for
  each metric (many predictions raise the chance of a good label, as the paper observes for PartGLEE), or
  ``"mask_match"``: the label of the mask matched to it (unmatched: 0). An image with GT but no predictions
  scores 0 for each item. ``label_average="unit"``: items are averaged per unit, then over units
  (``scope``); ``"pooled"``: over every GT mask at once (Osprey's ``all_sim / all_num``). SS is the raw
  cosine (Osprey does not clip; in practice 0..1); S-IoU is |words(p) & words(g)| / |words(p) | words(g)| on
  whitespace words (0 when both are empty, where Osprey would divide by zero).
* Labels are cleaned first (``label_cleaning`` for SS / S-IoU, ``recall_label_cleaning`` for Recall):
  ``calico``, ``osprey`` or ``none``, defined in :mod:`calico_jax.eval.labels`.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from calico_jax.core.config import Config, ConfigError
from calico_jax.data.pairs import TASKS
from calico_jax.eval.labels import CLEANINGS, cleaners
from calico_jax.eval.masks import ImageMasks, SampleResult, image_ap50, image_miou, match, mean_or_nan, prepare, units

Similarity = Callable[[str, str], float]
METRICS = ("AP50", "mIoU", "Recall", "SS", "S-IoU")

# The presets: each sets these switches over the field defaults (= "calico").
PROTOCOLS: dict[str, dict] = {
    "calico": {},
    "glamm": {"ap_score": "one", "miou_images": "all", "recall_order": "gt_pred",
              "recall_stop_at_first_miss": True, "recall_label_cleaning": "none"},
    "osprey": {"label_average": "pooled", "label_cleaning": "osprey"},
}
_CHOICES = {"matching": ("greedy", "hungarian"), "scope": ("image", "sample"), "miou_average": ("matched", "gt"),
            "miou_images": ("with_gt", "all"), "label_pairing": ("best", "mask_match"),
            "label_average": ("unit", "pooled"), "label_cleaning": CLEANINGS, "recall_label_cleaning": CLEANINGS,
            "recall_order": ("pred_gt", "gt_pred"), "ap_score": ("predicted", "one"),
            "ap_backend": ("numpy", "pycocotools"), "protocol": tuple(PROTOCOLS)}


@dataclasses.dataclass(frozen=True)
class MetricConfig(Config):
    """Evaluation protocol switches (module docstring); the defaults are the ``calico`` preset."""

    protocol: str = "calico"         # the preset these switches started from (recorded in report.json)
    iou_threshold: float = 0.5       # Recall: minimum IoU of a matched pair
    text_threshold: float = 0.5      # Recall: minimum label similarity of a matched pair
    matching: str = "greedy"         # "greedy" (GLaMM) | "hungarian"
    scope: str = "image"             # mIoU/SS/S-IoU unit: "image" | "sample"
    miou_average: str = "matched"    # "matched" (GLaMM: mean over matched pairs) | "gt" (over GT masks)
    miou_images: str = "with_gt"     # units averaged: "with_gt" | "all" (GLaMM: a unit without GT scores 0)
    label_pairing: str = "best"      # SS/S-IoU: "best" label of the image | "mask_match" (matched mask's label)
    label_average: str = "unit"      # SS/S-IoU: "unit" (per unit, then over units) | "pooled" (Osprey)
    label_cleaning: str = "calico"   # SS/S-IoU labels: "calico" | "osprey" | "none" (eval/labels.py)
    recall_label_cleaning: str = "calico"    # Recall's label test: "calico" | "osprey" | "none" (GLaMM)
    recall_order: str = "pred_gt"    # greedy walk over the [pred, gt] ("pred_gt") or [gt, pred] (GLaMM) matrix
    recall_stop_at_first_miss: bool = False  # GLaMM's literal loop: stop at the first failing pair
    ap_score: str = "predicted"      # AP50 ranking: "predicted" scores | "one" (GLaMM: 1.0 each, file order)
    ap_backend: str = "numpy"        # "numpy" (eval/masks.py) | "pycocotools" (COCOeval)
    ap_max_dets: int = 100           # COCO maxDets per image

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"MetricConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.ap_max_dets < 1:
            raise ConfigError(f"MetricConfig.ap_max_dets must be >= 1, got {self.ap_max_dets}")

    @classmethod
    def preset(cls, name: str, **overrides) -> MetricConfig:
        """The ``name`` protocol's switches, then ``overrides`` (recorded by :meth:`overrides`)."""
        if name not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {name!r}; expected one of {tuple(PROTOCOLS)}")
        return cls(**{**PROTOCOLS[name], **overrides, "protocol": name})

    def overrides(self) -> dict:
        """The switches that differ from this config's preset."""
        base = MetricConfig.preset(self.protocol).to_dict()
        return {k: v for k, v in self.to_dict().items() if base[k] != v}


# ------------------------------------------------------------------------------- label scores
def word_iou(a: str, b: str) -> float:
    """S-IoU of two (already cleaned) labels: word-set intersection over union; 0 if both empty."""
    wa, wb = set(a.split()), set(b.split())
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


class _LabelScore:
    """Memoised label score on cleaned labels (labels repeat a lot across samples)."""

    def __init__(self, fn: Callable[[str, str], float], cleaning: str, metric: str):
        self.fn, self.memo = fn, {}
        self.clean_pred, self.clean_gt = cleaners(cleaning, metric)

    def __call__(self, pred: str, gt: str) -> float:
        key = (pred, gt)
        if key not in self.memo:
            self.memo[key] = float(self.fn(self.clean_pred(pred), self.clean_gt(gt)))
        return self.memo[key]


def _label_metric(images: list[ImageMasks], score: _LabelScore, config: MetricConfig) -> float:
    unit_items = []
    for unit in units(images, config.scope):
        items = []
        for im in unit:
            if config.label_pairing == "best":
                items += [max((score(p.label, g.label) for p in im.pred), default=0.0) for g in im.gt]
            else:
                got = {gi: score(im.pred[pi].label, im.gt[gi].label) for pi, gi, _ in match(im.ious, config.matching)}
                items += [got.get(gi, 0.0) for gi in range(len(im.gt))]
        unit_items.append(items)
    if config.label_average == "pooled":   # Osprey: sum over every GT mask / their count
        return mean_or_nan([x for items in unit_items for x in items])
    return mean_or_nan([float(np.mean(items)) for items in unit_items])


# ------------------------------------------------------------------------------- the metrics
def _pairs(im: ImageMasks, config: MetricConfig) -> list[tuple[int, int, float]]:
    """Recall's walk: (pred, gt, iou) in visiting order; ``gt_pred`` matches on the transposed matrix."""
    if config.recall_order == "gt_pred":
        return [(pi, gi, iou) for gi, pi, iou in match(im.ious.T, config.matching)]
    return match(im.ious, config.matching)


def _recall(images: list[ImageMasks], score: _LabelScore, config: MetricConfig) -> float:
    hits, total = 0, 0
    for im in images:
        total += len(im.gt)
        for pi, gi, iou in _pairs(im, config):
            ok = iou >= config.iou_threshold and score(im.pred[pi].label, im.gt[gi].label) >= config.text_threshold
            if not ok and config.recall_stop_at_first_miss:
                break
            hits += ok
    return hits / total if total else float("nan")


def _miou(images: list[ImageMasks], config: MetricConfig) -> float:
    return image_miou(images, config.matching, config.scope, config.miou_average,
                      "zero" if config.miou_images == "all" else "skip")


def _ap50(images: list[ImageMasks], config: MetricConfig) -> float:
    return image_ap50(images, config.ap_backend, config.ap_max_dets, config.ap_score == "one")


def miou(results: Sequence[SampleResult], config: MetricConfig = MetricConfig()) -> float:
    return _miou(prepare(results), config)


def recall(results: Sequence[SampleResult], similarity: Similarity, config: MetricConfig = MetricConfig()) -> float:
    return _recall(prepare(results), _LabelScore(similarity, config.recall_label_cleaning, "recall"), config)


def semantic_similarity(results: Sequence[SampleResult], similarity: Similarity,
                        config: MetricConfig = MetricConfig()) -> float:
    return _label_metric(prepare(results), _LabelScore(similarity, config.label_cleaning, "ss"), config)


def semantic_iou(results: Sequence[SampleResult], config: MetricConfig = MetricConfig()) -> float:
    return _label_metric(prepare(results), _LabelScore(word_iou, config.label_cleaning, "siou"), config)


def _prefetch(similarity: Similarity, results: Sequence[SampleResult], scores: Sequence[_LabelScore]) -> None:
    """Batch-encodes every cleaned label once when ``similarity`` is a bound method of an encoder
    (``SentenceEncoder.similarity``): one jitted batch instead of one call per string."""
    encode = getattr(getattr(similarity, "__self__", None), "encode", None)
    if callable(encode):
        labels = set()
        for sc in scores:
            labels.update(sc.clean_pred(m.label) for s in results for m in s.pred)
            labels.update(sc.clean_gt(m.label) for s in results for m in s.gt)
        encode(sorted(labels))


def evaluate(results: Sequence[SampleResult], config: MetricConfig = MetricConfig(),
             similarity: Similarity | None = None, progress: bool | None = None) -> dict:
    """All five metrics per task (in percent), their unweighted mean over the tasks present, and counts.
    ``similarity(a, b)``: label similarity (None = a :class:`SentenceEncoder`); ``progress``: a bar
    over the samples (None = only for 200 samples or more)."""
    if similarity is None:
        from calico_jax.eval.sentence import SentenceEncoder  # JAX: only when labels are compared
        similarity = SentenceEncoder().similarity
    progress = len(results) >= 200 if progress is None else progress
    sim = _LabelScore(similarity, config.label_cleaning, "ss")
    rec = _LabelScore(similarity, config.recall_label_cleaning, "recall")
    words = _LabelScore(word_iou, config.label_cleaning, "siou")
    _prefetch(similarity, results, (sim, rec))
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
        values = {"AP50": _ap50(ims, config), "mIoU": _miou(ims, config),
                  "Recall": _recall(ims, rec, config), "SS": _label_metric(ims, sim, config),
                  "S-IoU": _label_metric(ims, words, config)}
        per_task[task] = {k: 100.0 * v for k, v in values.items()}
    mean = {k: float(np.mean([per_task[t][k] for t in per_task])) if per_task else float("nan") for k in METRICS}
    return {"per_task": per_task, "mean": mean, "mean_tasks": [t for t in TASKS if t in per_task],
            "num_samples": len(results), "per_task_samples": counts,
            "protocol": config.protocol, "protocol_overrides": config.overrides(), "config": config.to_dict()}


def by_image_count(results: Sequence[SampleResult], config: MetricConfig = MetricConfig(),
                   similarity: Similarity | None = None) -> dict[str, dict]:
    """:func:`evaluate` of each image count's samples on their own, keyed by N (a string: JSON keys), each with
    ``all_images_masked``: the percent of its samples in which every image got at least one predicted mask (a
    model trained on pairs answers N >= 3 with [SEG]s for images 1 and 2 only)."""
    groups: dict[int, list[SampleResult]] = defaultdict(list)
    for r in results:
        groups[r.num_images].append(r)
    out = {}
    for n in sorted(groups):
        rep = evaluate(groups[n], config, similarity, progress=False)
        covered = sum({m.image for m in r.pred} >= set(range(n)) for r in groups[n])
        out[str(n)] = {k: rep[k] for k in ("mean", "per_task", "num_samples", "per_task_samples")}
        out[str(n)]["all_images_masked"] = 100.0 * covered / len(groups[n])
    return out


__all__ = ["MetricConfig", "METRICS", "PROTOCOLS", "word_iou", "miou", "recall", "semantic_similarity",
           "semantic_iou", "evaluate", "by_image_count"]
