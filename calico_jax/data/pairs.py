"""MixedParts-style multi-image samples from COCO part datasets, their JSON schema, and its reader.

Recipe (paper §1, §5: curated pairs of comparable classes that share a part, from PACO-LVIS, PartImageNet and
ADE20K-Part-234; the construction details are not public, so each choice below is a documented default):

* A *view* is one object class in one image: the union of all its instances there (semantic
  co-segmentation: "segment the common object" means every instance), with each part name's union.
  Objects under ``min_object_area`` pixels and parts under ``min_part_area`` are left out.
* Class pairings that are comparable and share a part: an editable table (``pair_table``: groups of
  class names, every two classes of a group are paired) plus the automatic rule "the two classes'
  part vocabularies share >= ``min_shared_parts`` names". Pairs are made within one source file
  (``cross_dataset=False``) since part vocabularies differ between datasets.
* Tasks, N images each (``num_images``, default 2, N >= 3 supported):
  ``common_object`` -- all N views are of one class; ``common_parts`` -- views of paired (or, with
  ``same_class_parts``, equal) classes whose annotated parts intersect; the answer segments every
  common part in every image; ``unique_parts`` -- parts present in exactly one of the N objects,
  each segmented in its image. Part-level tasks first name and segment the objects (Fig. 3).
* Each anchor view (shuffled) starts one sample per task; ``per_task`` caps, or by cycling extends,
  that count. Deterministic: ``random.Random(f"{seed}:{task}")``, no set iteration, fixed JSON order.

Prompt (paper §3.2): ``"The <image> (IMAGE1) and <image> (IMAGE2) provide an overview of the
pictures. " + question`` (several questions per task, :data:`QUESTIONS`). Answer (GLaMM grounding):
``"The images show a <p> snake </p> [SEG] (IMAGE1) and a <p> dog </p> [SEG] (IMAGE2). The common
parts are <p> body </p> [SEG] (IMAGE1) [SEG] (IMAGE2) and <p> head </p> [SEG] (IMAGE1) [SEG] (IMAGE2)."``
-- every ``[SEG]`` is followed by the identifier of the image it segments.

The output file's JSON schema, its writer and its reader are :mod:`calico_jax.data.pairs_io`
(re-exported here).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from calico_jax.data.coco_parts import (
    DataError,
    PartDataset,
    Report,
    clean_name,
    decode,  # noqa: F401 (re-exported: readers of a pairs file decode its masks with pairs.decode)
    load_part_dataset,
    rle_area,
    rle_union,
)
from calico_jax.data.mixed_parts import from_args
from calico_jax.data.pairs_io import (
    PREFIX,
    SEG_RE,
    TASKS,
    Pairs,
    check_image,
    images_phrase,
    read_pairs,
    validate_sample,
    write_pairs,
)
from calico_jax.data.pairs_schema import task_name

QUESTIONS = {
    "common_object": ["Can you segment the common object in these images?",
                      "What object appears in all of these images? Please output segmentation masks.",
                      "Please segment the object that these images have in common.",
                      "Which object do these images share? Please segment it in each image."],
    "common_parts": ["Can you segment the common parts of the objects in these images?",
                     "What are the common parts of the objects in these images? Please output segmentation masks.",
                     "Which parts do the objects in these images share? Please segment them.",
                     "Please segment the parts that the objects in these images have in common."],
    "unique_parts": ["Can you segment the unique parts of the objects in these images?",
                     "What are the unique parts of the objects in these images? Please output segmentation masks.",
                     "Which parts appear in only one of the objects in these images? Please segment them.",
                     "Please segment the parts that only one of the objects in these images has."],
}



@dataclass(frozen=True)
class PairConfig:
    num_images: int = 2
    per_task: int | None = None          # None: one attempt per anchor view
    min_object_area: float = 256.0
    min_part_area: float = 16.0
    min_shared_parts: int = 1
    auto_pairs: bool = True
    pair_table: tuple = ()               # groups of class names
    same_class_parts: bool = True
    cross_dataset: bool = False
    check_images: str = "decode"         # "none" | "exists" | "decode"
    max_tries: int = 20


@dataclass
class _View:
    image: int
    key: tuple            # (source, class)
    parts: dict           # part -> list of RLEs (sorted by name)
    rles: list


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


class PairBuilder:
    """Collects views from part datasets and draws the three tasks' samples."""

    def __init__(self, datasets: list[tuple[PartDataset, str]], config: PairConfig = PairConfig(),
                 seed: int = 0, report: Report | None = None):
        if config.num_images < 2:
            raise ValueError("num_images must be >= 2")
        self.cfg, self.seed = config, seed
        self.report = report if report is not None else Report()
        self.sources = [{"path": str(ds.path), "convention": ds.convention, "images_root": str(root)}
                        for ds, root in datasets]
        self.images: list[dict] = []
        self.views: list[_View] = []
        for s, (ds, root) in enumerate(datasets):
            self._collect(s, ds, Path(root))
        self.by_class: dict[tuple, list[int]] = defaultdict(list)
        for v, view in enumerate(self.views):
            self.by_class[view.key].append(v)
        self.partners = self._pairings()
        self.masks: list[dict] = []
        self._mask_index: dict[tuple, int] = {}

    # -------------------------------------------------------------------------------- collection
    def _collect(self, s: int, ds: PartDataset, root: Path) -> None:
        cfg = self.cfg
        for im in tqdm(ds.images, desc=f"check images {Path(ds.path).name}", leave=False,
                       disable=len(ds.images) < 200):
            groups: dict[str, list] = defaultdict(list)
            for ob in im.objects:
                groups[clean_name(ob.name)].append(ob)
            cand = []
            for cls in sorted(groups):
                rles = [ob.rle for ob in groups[cls]]
                if rle_area(rle_union(rles)) < cfg.min_object_area:
                    continue
                parts: dict[str, list] = defaultdict(list)
                for ob in groups[cls]:
                    for p, prles in ob.parts.items():
                        parts[clean_name(p)].extend(prles)
                parts = {p: parts[p] for p in sorted(parts) if rle_area(rle_union(parts[p])) >= cfg.min_part_area}
                cand.append((cls, parts, rles))
            if not cand:
                continue
            record = f"{Path(ds.path).name}: image id={im.image_id} ({im.file_name})"
            if not check_image(root / im.file_name, (im.height, im.width), record, cfg.check_images, self.report):
                continue
            idx = len(self.images)
            self.images.append({"source": s, "image_id": im.image_id, "file": im.file_name,
                                "height": im.height, "width": im.width})
            for cls, parts, rles in cand:
                self.views.append(_View(idx, (s if not cfg.cross_dataset else 0, cls), parts, rles))

    def _pairings(self) -> dict[tuple, list[tuple]]:
        vocab: dict[tuple, set] = defaultdict(set)
        for v in self.views:
            vocab[v.key].update(v.parts)
        keys = sorted(vocab)
        pairs: set[tuple] = set()
        if self.cfg.auto_pairs:
            for i, a in enumerate(keys):
                for b in keys[i + 1:]:
                    if a[0] == b[0] and len(vocab[a] & vocab[b]) >= self.cfg.min_shared_parts:
                        pairs.add((a, b))
        for group in self.cfg.pair_table:
            names = {clean_name(n) for n in group}
            members = [k for k in keys if k[1] in names]
            pairs.update((a, b) for i, a in enumerate(members) for b in members[i + 1:] if a[0] == b[0])
        out: dict[tuple, list[tuple]] = defaultdict(list)
        for a, b in sorted(pairs):
            out[a].append(b)
            out[b].append(a)
        return {k: sorted(v) for k, v in out.items()}

    # ---------------------------------------------------------------------------------- sampling
    def _mask(self, view: _View, part: str | None) -> int:
        key = (view.image, view.key[1], part)
        if key not in self._mask_index:
            rle = rle_union(view.rles if part is None else view.parts[part])
            self._mask_index[key] = len(self.masks)
            self.masks.append({"image": view.image, "object": view.key[1], "part": part,
                               "area": int(rle_area(rle)), "rle": rle})
        return self._mask_index[key]

    def _partner_classes(self, key: tuple) -> list[tuple]:
        cands = list(self.partners.get(key, []))
        return cands + [key] if self.cfg.same_class_parts else cands

    def _draw(self, task: str, anchor: int, rng: random.Random) -> list[int] | None:
        a = self.views[anchor]
        chosen, used = [anchor], {a.image}
        for _ in range(self.cfg.num_images - 1):
            classes = [a.key] if task == "common_object" else self._partner_classes(a.key)
            if not classes:
                return None
            for _try in range(self.cfg.max_tries):
                pool = self.by_class[rng.choice(classes)]
                v = pool[rng.randrange(len(pool))]
                if self.views[v].image in used:
                    continue
                trial = chosen + [v]
                if task == "common_parts" and not self._common(trial):
                    continue
                if task == "unique_parts" and len(trial) == self.cfg.num_images and not any(self._unique(trial)):
                    continue
                chosen.append(v)
                used.add(self.views[v].image)
                break
            else:
                return None
        if task == "unique_parts" and not any(self._unique(chosen)):
            return None
        rng.shuffle(chosen)
        return chosen

    def _common(self, vs: list[int]) -> list[str]:
        common = set(self.views[vs[0]].parts)
        for v in vs[1:]:
            common &= set(self.views[v].parts)
        return sorted(common)

    def _unique(self, vs: list[int]) -> list[list[str]]:
        out = []
        for i, v in enumerate(vs):
            others = set().union(*(set(self.views[w].parts) for j, w in enumerate(vs) if j != i))
            out.append(sorted(set(self.views[v].parts) - others))
        return out

    def _sample(self, task: str, vs: list[int], n: int, rng: random.Random) -> dict:
        views = [self.views[v] for v in vs]
        classes = [v.key[1] for v in views]
        segs, phrases = [], []
        for cls in dict.fromkeys(classes):   # object groups in order of first appearance
            ks = [k for k, c in enumerate(classes) if c == cls]
            segs += [{"mask": self._mask(views[k], None), "image": k, "label": cls, "kind": "object"} for k in ks]
            phrases.append(f"{_article(cls)} <p> {cls} </p> " + " ".join(f"[SEG] (IMAGE{k + 1})" for k in ks))
        answer = f"The images show {_join(phrases)}."
        parts = [[] for _ in views]
        if task == "common_parts":
            phrases = []
            for p in self._common(vs):
                segs += [{"mask": self._mask(v, p), "image": k, "label": p, "kind": "part"}
                         for k, v in enumerate(views)]
                phrases.append(f"<p> {p} </p> " + " ".join(f"[SEG] (IMAGE{k + 1})" for k in range(len(views))))
                for k in range(len(views)):
                    parts[k].append(p)
            answer += f" The common part{'s are' if len(phrases) > 1 else ' is'} {_join(phrases)}."
        elif task == "unique_parts":
            phrases = []
            for k, (v, ps) in enumerate(zip(views, self._unique(vs), strict=True)):
                for p in ps:
                    segs.append({"mask": self._mask(v, p), "image": k, "label": p, "kind": "part"})
                    phrases.append(f"<p> {p} </p> [SEG] (IMAGE{k + 1})")
                    parts[k].append(p)
            answer += f" The unique part{'s are' if len(phrases) > 1 else ' is'} {_join(phrases)}."
        t = rng.randrange(len(QUESTIONS[task]))
        prompt = PREFIX.format(images=images_phrase(len(views))) + QUESTIONS[task][t]
        return {"id": f"{task}-{n:07d}", "task": task, "images": [v.image for v in views], "prompt": prompt,
                "template": t, "answer": answer, "objects": classes, "parts": parts, "segs": segs}

    def build(self, tasks=TASKS) -> dict:
        samples, counts = [], {}
        for task in tasks:
            rng = random.Random(f"{self.seed}:{task}")
            if task == "common_object":
                anchors = [v for v, view in enumerate(self.views)
                           if len({self.views[w].image for w in self.by_class[view.key]}) >= self.cfg.num_images]
            else:
                anchors = [v for v, view in enumerate(self.views) if view.parts and self._partner_classes(view.key)]
            rng.shuffle(anchors)
            target = self.cfg.per_task if self.cfg.per_task is not None else len(anchors)
            n, attempts, limit = 0, 0, max(len(anchors), 1) * (1 if self.cfg.per_task is None else 20)
            bar = tqdm(total=target, desc=task, leave=False, disable=target < 2000)
            while anchors and n < target and attempts < limit:
                vs = self._draw(task, anchors[attempts % len(anchors)], rng)
                attempts += 1
                if vs is not None:
                    samples.append(self._sample(task, vs, n, rng))
                    n += 1
                    bar.update()
            bar.close()
            counts[task] = n
        return {"format": "calico_jax.pairs", "version": 1, "seed": self.seed,
                "config": {k: (list(map(list, v)) if k == "pair_table" else v) for k, v in asdict(self.cfg).items()},
                "sources": self.sources, "images": self.images, "masks": self.masks, "samples": samples,
                "counts": counts, "report": self.report.to_json()}


# --------------------------------------------------------------------------------------------- CLI
def _parse_spec(spec: str) -> tuple[str, dict]:
    """``PATH[,key=value...]`` with keys convention, whole, part_maps, part_names, images."""
    path, *opts = spec.split(",")
    kw = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or k not in ("convention", "whole", "part_maps", "part_names", "images"):
            raise DataError(f"--coco {spec!r}: bad option {o!r} (convention|whole|part_maps|part_names|images=...)")
        kw[k] = v
    return path, kw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.data.pairs", description=__doc__.split("\n")[0])
    ap.add_argument("--coco", action="append", default=[],
                    help="COCO part file, optionally PATH,convention=paco,whole=W.json,part_maps=DIR,images=DIR; "
                         "with --from-mixed-parts: SOURCE=FILE (repeatable per source)")
    ap.add_argument("--images", action="append", default=[],
                    help="image directory (once for all files, or once per --coco in order); with "
                         "--from-mixed-parts: SOURCE=DIR or one DIR")
    ap.add_argument("--from-mixed-parts", dest="from_mixed_parts", default=None, metavar="FILE",
                    help="convert the MixedParts authors' records (calico_jax/data/mixed_parts.py) instead")
    ap.add_argument("--task", type=task_name, default=None, metavar="|".join(TASKS),
                    help="--from-mixed-parts: task of every record (- or _ both work; default: inferred from the "
                         "question)")
    ap.add_argument("--prompt", choices=("ours", "author"), default="ours",
                    help="--from-mixed-parts: our prompt prefix or the author loader's first turn")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per_task", type=int, default=None)
    ap.add_argument("--num_images", type=int, default=2)
    ap.add_argument("--pair_table", default=None, help="JSON: list of class-name groups")
    ap.add_argument("--no_auto_pairs", action="store_true")
    ap.add_argument("--check_images", choices=("none", "exists", "decode"), default="decode")
    ap.add_argument("--strict", action="store_true")
    a = ap.parse_args(argv)
    if not a.coco or not a.images:
        ap.error("--coco and --images are required")
    if not a.from_mixed_parts and len(a.images) not in (1, len(a.coco)):
        ap.error("give --images once, or once per --coco")
    report = Report(a.strict)
    try:
        if a.from_mixed_parts:
            data = from_args(a, report)
        else:
            data = _build(a, report)
        write_pairs(data, a.out)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, n in data["counts"].items():
        print(f"{task}: {n} samples")
    print(f"images: {len(data['images'])}, masks: {len(data['masks'])}")
    print(report.summary())
    return 0


def _build(a, report: Report) -> dict:
    try:
        table = tuple(tuple(g) for g in json.loads(Path(a.pair_table).read_text())) if a.pair_table else ()
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"--pair_table {a.pair_table}: {e}") from None
    cfg = PairConfig(num_images=a.num_images, per_task=a.per_task, pair_table=table,
                     auto_pairs=not a.no_auto_pairs, check_images=a.check_images)
    datasets = []
    for i, spec in enumerate(a.coco):
        path, kw = _parse_spec(spec)
        root = kw.pop("images", a.images[i if len(a.images) > 1 else 0])
        datasets.append((load_part_dataset(path, kw.pop("convention", "auto"), report=report, **kw), root))
    return PairBuilder(datasets, cfg, a.seed, report).build()


__all__ = ["TASKS", "PREFIX", "QUESTIONS", "PairConfig", "PairBuilder", "main",
           "SEG_RE", "Pairs", "read_pairs", "write_pairs", "validate_sample"]


if __name__ == "__main__":
    sys.exit(main())
