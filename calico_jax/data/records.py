"""Per-record stages of the grain pipeline (:mod:`calico_jax.data.pipeline`): the sample check and tokenization,
the on-demand reading of a packed pairs directory inside the grain map, and the counting of skipped records.

A record that cannot be used at read time does not stop the epoch: the stage that finds the fault returns a
*skip marker* ``{"skip": kind, ...}`` that the later maps pass through; :class:`CountSkips` (just before batching,
so inside a grain worker when there are workers) drops markers and adds ``skips`` (int32 per kind of
:data:`SKIP_KINDS`) to the next element it yields; the pipeline sums the batch's ``skips`` into its report in the
main process and removes the key. ``strict`` raises :class:`~calico_jax.data.skips.DataError` at the first
fault instead. Counts of markers after the last yielded element of a finite stream are lost (nothing carries them).
"""
from __future__ import annotations

import json
import logging
from collections import Counter

import grain
import numpy as np

from calico_jax.data.packed import PackedPairs
from calico_jax.data.pairs_schema import TASKS, validate_sample
from calico_jax.data.skips import DataError, Report
from calico_jax.data.tokenize import SampleTokenizer

log = logging.getLogger(__name__)

SKIP_KINDS = ("bad_record", "bad_sample", "too_many_images", "too_many_segs", "too_long_prompt", "too_long_seg",
              "bad_seg_identifier", "image_unreadable")
_LOGGED_PER_KIND = 20   # warnings per kind and process; the counts go on


def skip_marker(kind: str, record: str, detail: str = "") -> dict:
    return {"skip": kind, "record": record, "detail": detail}


def tokenize_sample(s: dict, i: int, st: SampleTokenizer, max_images: int, max_segs: int):
    """-> ``(record, None, "")`` with ``index``, ``input_ids``, ``labels``, or ``(None, kind, detail)``."""
    if len(s["images"]) > max_images:
        return None, "too_many_images", f"{len(s['images'])} > max_images {max_images}"
    if len(s["segs"]) > max_segs:
        return None, "too_many_segs", f"{len(s['segs'])} > max_segs {max_segs}"
    tok, kind, detail = st(s["prompt"], s["answer"])
    if tok is None:
        return None, kind, detail
    # The batch's seg_image comes from the pairs file's mask references; keeping only samples where they
    # equal the token identifiers (read by seg_routing.parse_identifier, as the predictor reads them) ties
    # training routing to the convention inference uses.
    if list(tok.seg_images) != [g["image"] for g in s["segs"]] or tok.num_images != len(s["images"]):
        return None, "bad_seg_identifier", "token identifiers disagree with the mask references"
    return {"index": i, "input_ids": tok.input_ids, "labels": tok.labels}, None, ""


class LoadPacked(grain.transforms.Map):
    """sample index -> the tokenized record of a packed pairs directory, with its sample, image paths and sizes
    and mask RLEs (what :class:`~calico_jax.data.pipeline.Decode` needs), or a skip marker. Pickles as the
    directory's paths and the tokenizer; the readers open in the process that reads."""

    def __init__(self, pairs: PackedPairs, tokenizer, max_tokens: int, use_im_start_end: bool, max_images: int,
                 max_segs: int, strict: bool = False):
        self.pairs, self.tokenizer, self.strict = pairs, tokenizer, strict
        self.max_tokens, self.use_im_start_end = max_tokens, use_im_start_end
        self.max_images, self.max_segs = max_images, max_segs
        self._st, self._logged = None, Counter()

    def __getstate__(self):
        return {**self.__dict__, "_st": None, "_logged": Counter()}

    def _skip(self, kind: str, record: str, detail: str) -> dict:
        if self.strict:
            raise DataError(f"{self.pairs.path}: {kind}: {record}: {detail}")
        self._logged[kind] += 1
        if self._logged[kind] <= _LOGGED_PER_KIND:
            log.warning("skipping %s: %s: %s", record, kind, detail)
        return skip_marker(kind, record, detail)

    def map(self, i) -> dict:
        i, p = int(i), self.pairs
        if self._st is None:
            self._st = SampleTokenizer(self.tokenizer, self.max_tokens, self.use_im_start_end)
        rec = f"sample record {i}"
        try:
            s = json.loads(p.samples.raw(i))
            rec = f"sample {s.get('id', i)}" if isinstance(s, dict) else rec
            if not isinstance(s, dict) or s.get("task") not in TASKS:
                raise TypeError(f"not a sample of a known task: {str(s)[:80]}")
            masks = {g["mask"]: p.masks[g["mask"]] for g in s["segs"]
                     if isinstance(g, dict) and isinstance(g.get("mask"), int) and 0 <= g["mask"] < len(p.masks)}
            validate_sample(s, len(p.images), len(p.masks), masks)
            images = [p.images[j] for j in s["images"]]
        except DataError as e:
            return self._skip("bad_sample", rec, str(e))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            return self._skip("bad_record", rec, f"{type(e).__name__}: {e}")
        out, kind, detail = tokenize_sample(s, i, self._st, self.max_images, self.max_segs)
        if out is None:
            return self._skip(kind, rec, detail)
        roots = p.roots
        out["sample"] = s
        out["paths"] = [str(roots.get(m["source"]) or p.sources[m["source"]]["images_root"]) + "/" + m["file"]
                        for m in images]
        out["hw"] = [(m["height"], m["width"]) for m in images]
        out["rles"] = [masks[g["mask"]]["rle"] for g in s["segs"]]
        return out


class _CountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)

    def __next__(self):
        counts = np.zeros(len(SKIP_KINDS), np.int32)
        while True:
            ex = next(self._parent)   # StopIteration ends the stream
            if "skip" not in ex:
                return {**ex, "skips": counts}
            counts[SKIP_KINDS.index(ex["skip"])] += 1

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class CountSkips(grain.IterDataset):
    """Drops skip markers; the next element carries ``skips``: how many of each kind came just before it.
    Its iterator's state is its parent's (the markers leave no position of their own)."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self):
        return _CountSkipsIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "CountSkips"


class ReportSkips:
    """Batch map (main process): removes ``skips`` and adds its sums to ``report`` (one entry per skip)."""

    def __init__(self, report: Report):
        self.report = report

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        counts = np.asarray(batch.pop("skips")).reshape(-1, len(SKIP_KINDS)).sum(0)
        for kind, n in zip(SKIP_KINDS, counts):
            for _ in range(int(n)):
                self.report.skip(kind, "(read time: names in the log)")
        return batch


__all__ = ["SKIP_KINDS", "skip_marker", "tokenize_sample", "LoadPacked", "CountSkips", "ReportSkips"]
