"""Mask side of CALICO's evaluation: the sample records, per-image IoUs, mask matching, AP50 and mIoU.

Everything here works on masks alone; label similarity, the protocol switches
(:class:`~calico_jax.eval.metrics.MetricConfig`) and the per-task report live in :mod:`calico_jax.eval.metrics`,
which calls into this module.

* **Records**: a :class:`SampleResult` holds the ground-truth and predicted :class:`Mask` es (COCO RLE, the
  image index inside the sample, a label and a score) of one sample (an image pair/set and one task).
* **Per image**: :func:`prepare` validates the records and computes each image's ``[n_pred, n_gt]`` IoU
  matrix once with pycocotools.
* **Matching** of predicted to GT masks, always within one image (:func:`match`): ``greedy`` (GLaMM's GCG
  evaluation: repeat the row-major first argmax IoU, remove its row and column, stop when the best IoU is 0)
  or ``hungarian`` (maximum total IoU; pairs with IoU 0 are dropped).
* **AP50**: COCO ``segm`` AP at IoU 0.5, one category, scores = ``Mask.score`` (or 1.0 for every prediction,
  ``constant_score``: GLaMM's GCG evaluation, where the ranking is then the file order -- images in order, masks
  in order within an image, as COCOeval's stable sorts keep it), maxDets 100, area "all", one
  COCO image per (sample, image). Predictions on an image without ground truth are false positives.
  Undefined (NaN) when there is no ground truth at all. Two backends give the same number: a numpy
  re-implementation of COCOeval's matching and accumulation (default, fast) and pycocotools' ``COCOeval``.
* **mIoU** (:func:`image_miou`): per unit, the mean IoU of the matched pairs (``matched``, GLaMM: extra or
  missed masks do not lower it) or matched IoUs summed over the GT masks (``gt``: a missed GT counts 0). A
  unit is an image (``scope="image"``, GLaMM) or a sample (``scope="sample"``, pairs pooled over its images);
  the metric is the mean over units. A unit with GT but no predictions scores 0; units without GT are skipped
  (``empty="skip"``), or score 0 (``empty="zero"``: GLaMM's ``compute_miou`` returns 0.0 when nothing pairs, and
  its mean runs over every image).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from calico_jax.data.pairs import TASKS


@dataclasses.dataclass
class Mask:
    """One mask of one image of a sample; ``rle`` is COCO RLE ``{"size": [h, w], "counts": ...}``."""

    image: int
    label: str
    rle: dict
    score: float = 1.0

    @classmethod
    def from_dict(cls, d: dict, where: str = "mask") -> Mask:
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
    def from_dict(cls, d: dict) -> SampleResult:
        sid = d.get("id", "?")
        try:
            return cls(id=str(d["id"]), task=str(d["task"]), num_images=int(d["num_images"]),
                       gt=[Mask.from_dict(m, f"sample {sid} gt[{i}]") for i, m in enumerate(d["gt"])],
                       pred=[Mask.from_dict(m, f"sample {sid} pred[{i}]") for i, m in enumerate(d["pred"])])
        except KeyError as e:
            raise ValueError(f"sample {sid}: field {e} missing") from None


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
class ImageMasks:
    """One image of one sample: its masks (pycocotools RLEs) and the IoU matrix ``[n_pred, n_gt]``."""

    sample: int
    gt: list[Mask]
    pred: list[Mask]
    gt_rle: list[dict]
    pred_rle: list[dict]
    ious: np.ndarray
    size: tuple[int, int]


def prepare(results: Sequence[SampleResult], progress: bool = False) -> list[ImageMasks]:
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
            images.append(ImageMasks(s_idx, gt, pred, gt_rle, pred_rle, ious, sizes.pop() if sizes else (0, 0)))
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
        pairs = [(int(p), int(g), float(ious[p, g])) for p, g in zip(rows, cols, strict=True) if ious[p, g] > 0]
        return sorted(pairs, key=lambda t: -t[2])
    raise ValueError(f"matching method {method!r}; expected 'greedy' or 'hungarian'")


def units(images: list[ImageMasks], scope: str, keep_empty: bool = False) -> list[list[ImageMasks]]:
    """Images grouped into averaging units (one per image or per sample) that have ground truth
    (every unit with ``keep_empty``)."""
    if scope == "image":
        groups = [[im] for im in images]
    else:
        by_sample: dict[int, list[ImageMasks]] = defaultdict(list)
        for im in images:
            by_sample[im.sample].append(im)
        groups = list(by_sample.values())
    return [g for g in groups if keep_empty or any(im.gt for im in g)]


def mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# ------------------------------------------------------------------------------- mask metrics
def image_miou(images: list[ImageMasks], matching: str = "greedy", scope: str = "image",
               average: str = "matched", empty: str = "skip") -> float:
    """mIoU over prepared images (fraction; NaN without any unit); see the module docstring."""
    if empty not in ("skip", "zero"):
        raise ValueError(f"mIoU empty-unit rule {empty!r}; expected 'skip' or 'zero'")
    unit_scores = []
    for unit in units(images, scope, keep_empty=empty == "zero"):
        ious = [iou for im in unit for _, _, iou in match(im.ious, matching)]
        n_gt = sum(len(im.gt) for im in unit)
        if average == "matched":
            unit_scores.append(float(np.mean(ious)) if ious else 0.0)
        else:
            unit_scores.append(float(np.sum(ious)) / n_gt if n_gt else 0.0)
    return mean_or_nan(unit_scores)


def _scores(im: ImageMasks, constant: bool) -> list[float]:
    return [1.0] * len(im.pred) if constant else [p.score for p in im.pred]


def _ap50_numpy(images: list[ImageMasks], max_dets: int, constant: bool, iou_thr: float = 0.5) -> float:
    """COCOeval's segm AP at one IoU threshold, one category, area "all" (same ops, same ties)."""
    scores, matched, num_gt = [], [], 0
    for im in images:  # image-id order, as COCOeval concatenates its per-image results
        num_gt += len(im.gt)
        im_scores = _scores(im, constant)
        order = np.argsort([-sc for sc in im_scores], kind="mergesort")[:max_dets]
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
            scores.append(im_scores[d])
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


def _ap50_pycocotools(images: list[ImageMasks], max_dets: int, constant: bool) -> float:
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
        dets += [{"image_id": img_id, "category_id": 1, "segmentation": rle, "score": sc}
                 for sc, rle in zip(_scores(im, constant), im.pred_rle, strict=True)]
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


def ap50(results: Sequence[SampleResult], backend: str = "numpy", max_dets: int = 100,
         constant_score: bool = False) -> float:
    """COCO segm AP@0.5 over every image of ``results`` (fraction; NaN without any ground truth)."""
    return image_ap50(prepare(results), backend, max_dets, constant_score)


def image_ap50(images: list[ImageMasks], backend: str = "numpy", max_dets: int = 100,
               constant_score: bool = False) -> float:
    """AP50 over prepared images (fraction; NaN without any ground truth); ``constant_score``: every
    prediction scores 1.0 (GLaMM)."""
    if backend == "numpy":
        return _ap50_numpy(images, max_dets, constant_score)
    if backend == "pycocotools":
        return _ap50_pycocotools(images, max_dets, constant_score)
    raise ValueError(f"AP backend {backend!r}; expected 'numpy' or 'pycocotools'")


__all__ = ["Mask", "SampleResult", "ImageMasks", "prepare", "match", "units", "mean_or_nan", "image_miou", "image_ap50",
           "ap50"]
