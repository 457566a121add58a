"""The pairs schema's per-sample rules, shared by the JSON reader (:mod:`calico_jax.data.pairs_io`) and the packed
reader (:mod:`calico_jax.data.packed`): the task names, the ``[SEG] (IMAGEk)`` pattern and the sample check."""
from __future__ import annotations

import re

from calico_jax.data.skips import DataError

SEG_RE = re.compile(r"\[SEG\] \(IMAGE(\d+)\)")
TASKS = ("common_object", "common_parts", "unique_parts")


def task_name(name: str) -> str:
    """``common-parts`` or ``common_parts`` -> ``common_parts`` (both spellings work everywhere a task is named);
    anything else is a ValueError listing the tasks."""
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(t.replace('_', '-') for t in TASKS)}")
    return key


def validate_sample(s: dict, n_images: int, n_masks: int, masks) -> None:
    """Raises :class:`DataError` naming the sample unless its ``<image>`` count, ``[SEG]`` identifiers and mask
    references agree; ``masks[m]["image"]`` is the image a mask belongs to (a list or a lazy table)."""
    sid = s.get("id", "?")
    k = len(s["images"])
    if s["prompt"].count("<image>") != k:
        raise DataError(f"sample {sid}: prompt has {s['prompt'].count('<image>')} <image> for {k} images")
    ids = [int(i) - 1 for i in SEG_RE.findall(s["answer"])]
    if s["answer"].count("[SEG]") != len(ids) or len(ids) != len(s["segs"]):
        raise DataError(f"sample {sid}: {s['answer'].count('[SEG]')} [SEG] in the answer, {len(ids)} with an "
                        f"identifier, {len(s['segs'])} mask references")
    if any(not isinstance(i, int) or not 0 <= i < n_images for i in s["images"]):
        raise DataError(f"sample {sid}: image index out of range")
    for j, (i, seg) in enumerate(zip(ids, s["segs"])):
        if i != seg["image"] or not 0 <= i < k or not 0 <= seg["mask"] < n_masks:
            raise DataError(f"sample {sid}: [SEG] #{j} points at (IMAGE{i + 1}) / mask {seg['mask']} "
                            f"but its reference says image {seg['image'] + 1}")
        if masks[seg["mask"]]["image"] != s["images"][i]:
            raise DataError(f"sample {sid}: [SEG] #{j}'s mask belongs to another image")


__all__ = ["SEG_RE", "TASKS", "validate_sample"]
