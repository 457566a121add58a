"""The MixedParts authors' multi-image sample format -> our pairs file (:mod:`calico_jax.data.pairs_io`).

    python -m calico_jax.data.pairs --from-mixed-parts mixed_parts_val.json \\
        --coco paco_lvis=paco_lvis_v1_val.json --coco ade20k_part234=ade20k_instance_val_mixed_parts.json \\
        --images paco_lvis=coco_2017 --images ade20k_part234=ADE20KPart234/images/validation --out pairs.json

Records, as the first author's public loader reads them (GitHub ``kanguyen-vn/LISA``,
``dataset/multi_image_datasets/MultiImage_8Q_single_turn_ds.py``)::

    {"dataset_name": "paco_lvis", "img_ids": [id1, id2, ...], "q": "...", "a": "...",
     "groundings": {"img_1": [{"segmentation": ..., "name": "dog", "obj_ann_id": 17}, ...], "img_2": [...]}}

* ``dataset_name`` names the source; its COCO files (``--coco SRC=FILE``, repeatable: PartImageNet's part and
  ``*_whole`` files are one source) resolve ``img_ids`` to file name and size (an id is looked up as
  written, then as int / str, since the loader casts PACO and PASCAL-Part ids to int); ``--images SRC=DIR``
  (or one ``DIR`` for all) is the image root. The loader knows ``paco_lvis``, ``ade20k_part234``,
  ``pascal_part`` and PartImageNet; any name given with ``--coco`` works here.
* In ``q`` and ``a`` an object is written ``name_KJJ`` (image K, object JJ) and a part ``name_KJJPP``
  (image K, object JJ, part PP) -- the loader's pattern ``\\b(\\w+)_\\d{3}\\b|\\b(\\w+)_\\d{5}\\b``. Walking the
  answer, the first mention of a code takes the next unused grounding of image K (objects and parts share
  that counter, in order of first mention) and becomes ``<p> name </p> [SEG] (IMAGEK)``; a repeated mention
  becomes ``<p> name </p> (IMAGEK)`` (no ``[SEG]``: the loader's ``img_tokens`` without the ``[SEG]``). The
  phrase is the grounding's ``name`` in our display form (:func:`display_name`: ``door_handle`` -> ``door
  handle``, ``car_(automobile)`` -> ``car``, ``mug:handle`` -> ``handle``), a part's phrase the part name
  alone, as our pair builder writes answers; the loader writes ``dog_1`` / ``dog_1's head_1`` instead (and,
  for a repeated mention, the previous grounding's name, and one ``)`` too many), which we do not copy. In
  ``q`` a code becomes its name.
* Segmentations: polygons, uncompressed or compressed RLE (:func:`~calico_jax.data.rle.to_rle`), at the
  image's size from the COCO file. A part's object class comes from ``obj_ann_id`` (the first COCO file of
  the source whose annotation with that id lies in the same image), else from the object ``name_KJJ`` of
  the same image and index, else it is null.
* The prompt is our pair builder's (``"The <image> (IMAGE1) and <image> (IMAGE2) provide an overview of the
  pictures. "`` + question) or, with ``prompt="author"``, the loader's first turn (``", and"`` before the last
  of three or more images, ``"provides an overview of the picture.\\n"`` for one).
* The task is given (``task=``) or inferred from the question: "unique" / "distinct" / "differ" / "only one"
  -> ``unique_parts``, else "part" -> ``common_parts``, else "object" / "common" / "share" / "same" ->
  ``common_object``.
* Each sample keeps ``original``: the record's ``dataset_name``, ``img_ids``, ``q`` and ``a``.

A record that does not fit is skipped and counted by kind (``unknown_source``, ``unknown_image_id``,
``missing_grounding``, ``bad_code``, ``unknown_task``, ``no_codes``, ``bad_record``, the mask kinds of
:func:`~calico_jax.data.rle.to_rle` such as ``mask_outside_image``, and the image checks of the pair builder);
``strict`` raises :class:`~calico_jax.data.skips.DataError` on the first, naming the record and field.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from calico_jax.data.coco_parts import clean_name
from calico_jax.data.coco_reader import read_coco_json
from calico_jax.data.pairs_io import PREFIX, TASKS, check_image, images_phrase, validate_sample
from calico_jax.data.rle import rle_area, to_rle
from calico_jax.data.skips import DataError, Report

CODE_RE = re.compile(r"\b(\w+)_(\d{3})\b|\b(\w+)_(\d{5})\b")   # the loader's pattern, digits captured
_TASK_WORDS = (("unique_parts", ("unique", "distinct", "differ", "only one")), ("common_parts", ("part",)),
               ("common_object", ("object", "common", "share", "same")))
PROMPTS = ("ours", "author")


@dataclass
class Source:
    """One ``dataset_name``: its COCO files (images by id, annotations by id, categories) and image root."""
    name: str
    index: int
    paths: list[str]
    root: str
    images: dict = field(default_factory=dict)
    anns: list[dict] = field(default_factory=list)    # per file: annotation id -> annotation
    cats: dict = field(default_factory=dict)

    def image(self, iid):
        for key in (iid, _as_int(iid), str(iid)):
            if key is not None and key in self.images:
                return self.images[key]
        return None

    def object_class(self, ann_id, image_id) -> str | None:
        if not isinstance(ann_id, (int, str)):
            return None
        for anns in self.anns:
            a = anns.get(ann_id, anns.get(_as_int(ann_id)))
            if a is not None and a.get("image_id") == image_id and a.get("category_id") in self.cats:
                return display_name(self.cats[a["category_id"]].get("name", ""))
        return None


def display_name(name: str) -> str:
    """A grounding / category name in our display form; ``"car:wheel"`` -> ``"wheel"`` (the part after a colon)."""
    return clean_name(str(name).rsplit(":", 1)[-1])


def _as_int(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def load_sources(coco: list[tuple[str, str]], images: dict[str, str]) -> dict[str, Source]:
    """``[(source, COCO file)]`` (a source may repeat) and ``{source: image root}`` (key ``""``: every source)."""
    out: dict[str, Source] = {}
    for name, path in coco:
        root = images.get(name, images.get(""))
        if root is None:
            raise DataError(f"--images: no image root for source {name!r} (give --images {name}=DIR or one DIR)")
        src = out.setdefault(name, Source(name, len(out), [], str(root)))
        data = read_coco_json(path)
        src.paths.append(str(path))
        for im in data["images"]:   # entries without a usable id are unreachable, not an error
            if isinstance(im, dict) and isinstance(im.get("id"), (int, str)):
                src.images.setdefault(im["id"], im)
        src.anns.append({a["id"]: a for a in data["annotations"]
                         if isinstance(a, dict) and isinstance(a.get("id"), (int, str))})
        cats = data.get("categories")
        for c in cats if isinstance(cats, list) else []:
            if isinstance(c, dict) and isinstance(c.get("id"), (int, str)):
                src.cats.setdefault(c["id"], c)
    unknown = sorted(set(images) - set(out) - {""})
    if unknown:
        raise DataError(f"--images: sources {unknown} have no --coco file")
    return out


def infer_task(question: str) -> str | None:
    q = question.lower()
    for task, words in _TASK_WORDS:
        if any(w in q for w in words):
            return task
    return None


def prompt_prefix(n: int, style: str = "ours") -> str:
    if style == "ours":
        return PREFIX.format(images=images_phrase(n))
    tags = [f"<image> (IMAGE{k + 1})" for k in range(n)]
    listed = tags[0] if n == 1 else " and ".join(tags) if n == 2 else ", ".join(tags[:-1]) + f", and {tags[-1]}"
    return "The " + listed + (" provide an overview of the pictures.\n" if n > 1 else
                              " provides an overview of the picture.\n")


class _Skip(Exception):
    """A record does not fit (already reported)."""


class MixedPartsConverter:
    """Turns records into pairs-file samples; images and masks are shared across samples."""

    def __init__(self, sources: dict[str, Source], task: str | None = None, prompt: str = "ours",
                 check_images: str = "none", report: Report | None = None):
        if task is not None and task not in TASKS:
            raise DataError(f"task {task!r}; expected one of {TASKS}")
        if prompt not in PROMPTS:
            raise DataError(f"prompt style {prompt!r}; expected one of {PROMPTS}")
        self.sources, self.task, self.prompt, self.check = sources, task, prompt, check_images
        self.report = report if report is not None else Report()
        self.images: list[dict] = []
        self.masks: list[dict] = []
        self._image_index: dict[tuple, int] = {}
        self._image_ok: dict[tuple, bool] = {}
        self._mask_index: dict[tuple, int] = {}

    def _skip(self, kind: str, rec: str, detail: str):
        self.report.skip(kind, rec, detail)
        raise _Skip

    def _image(self, src: Source, iid, k: int, rec: str) -> dict:
        if not isinstance(iid, (int, str)) or isinstance(iid, bool):
            self._skip("bad_record", rec, f"img_ids[{k}]={iid!r}: expected an int or string id")
        im = src.image(iid)
        if im is None:
            self._skip("unknown_image_id", rec, f"img_ids[{k}]={iid!r} is not an image of {', '.join(src.paths)}")
        try:
            info = {"source": src.index, "image_id": im["id"], "file": str(im["file_name"]),
                    "height": int(im["height"]), "width": int(im["width"])}
        except (KeyError, TypeError, ValueError) as e:
            self._skip("bad_record", rec, f"img_ids[{k}]={iid!r}: its COCO image entry lacks or mistypes {e}")
        if info["height"] <= 0 or info["width"] <= 0:
            self._skip("bad_record", rec, f"img_ids[{k}]={iid!r}: COCO image size {info['height']}x{info['width']}")
        key = (src.index, info["image_id"])
        if key not in self._image_ok:   # each image checked once, reported once
            self._image_ok[key] = check_image(Path(src.root) / info["file"], (info["height"], info["width"]),
                                              f"{rec} img_ids[{k}]={iid!r}", self.check, self.report)
        if not self._image_ok[key]:
            raise _Skip
        return info

    def _ground(self, src: Source, groundings: dict, infos: list[dict], answer: str, rec: str):
        """Walks the answer's codes -> (new answer, [(seg, (object class, part name, rle))] in [SEG] order)."""
        n_img = len(infos)
        used = [0] * n_img
        seen: dict[str, tuple[str, int]] = {}   # code -> (phrase, image)
        objects: dict[tuple[int, str], str] = {}
        out, segs, pos = [], [], 0
        for m in CODE_RE.finditer(answer):
            name, digits = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            code, img = m.group(0), int(digits[0])
            if not 1 <= img <= n_img:
                self._skip("bad_code", rec, f"a: {code!r} names image {img} of {n_img}")
            out.append(answer[pos:m.start()])
            pos = m.end()
            if code in seen:
                out.append(f"<p> {seen[code][0]} </p> (IMAGE{img})")
                continue
            items = groundings.get(f"img_{img}")
            j = used[img - 1]
            where = f"groundings['img_{img}'][{j}]"
            if not isinstance(items, list) or j >= len(items):
                self._skip("missing_grounding", rec, f"a: {code!r} needs {where}")
            g = items[j]
            used[img - 1] += 1
            if not isinstance(g, dict) or "segmentation" not in g or not isinstance(g.get("name"), str):
                self._skip("bad_record", rec, f"{where}: needs 'segmentation' and a string 'name'")
            info = infos[img - 1]
            try:
                rle = to_rle(g["segmentation"], info["height"], info["width"], f"{rec} {where}", self.report)
            except DataError:   # --strict: to_rle's own report of a mask outside the image, an empty one, ...
                raise
            except (TypeError, ValueError, OverflowError) as e:   # malformed counts / coordinates
                self._skip("bad_record", rec, f"{where}.segmentation: {type(e).__name__}: {e}"[:300])
            if rle is None:
                raise _Skip
            phrase, kind = display_name(g["name"]), "object" if len(digits) == 3 else "part"
            if kind == "object":
                objects[(img, digits[1:3])] = phrase
                obj = phrase
            else:
                obj = src.object_class(g.get("obj_ann_id"), info["image_id"]) if "obj_ann_id" in g else None
                obj = obj or objects.get((img, digits[1:3]))
            seen[code] = (phrase, img)
            part = phrase if kind == "part" else None
            segs.append(({"image": img - 1, "label": phrase, "kind": kind}, (obj, part, rle)))
            out.append(f"<p> {phrase} </p> [SEG] (IMAGE{img})")
        out.append(answer[pos:])
        if not segs:
            self._skip("no_codes", rec, "a: no name_DDD / name_DDDDD code")
        return "".join(out), segs

    def _record(self, r, n: int, where: str) -> dict:
        rec = f"{where} record {n}"
        if not isinstance(r, dict):
            self._skip("bad_record", rec, f"expected an object, got {type(r).__name__}")
        for key, kind in (("dataset_name", str), ("img_ids", list), ("q", str), ("a", str), ("groundings", dict)):
            if not isinstance(r.get(key), kind):
                self._skip("bad_record", rec, f"field {key!r} missing or not a {kind.__name__}")
        rec = f"{rec} ({r['dataset_name']} {r['img_ids']})"
        if r["dataset_name"] not in self.sources:
            self._skip("unknown_source", rec, f"dataset_name {r['dataset_name']!r}; sources given: "
                                              f"{sorted(self.sources)}")
        n_img = len(r["img_ids"])
        if not 1 <= n_img <= 9:
            self._skip("bad_record", rec, f"img_ids: {n_img} images (a code's image is one digit, 1..9)")
        src = self.sources[r["dataset_name"]]
        infos = [self._image(src, iid, k, rec) for k, iid in enumerate(r["img_ids"])]
        question = CODE_RE.sub(lambda m: display_name(m.group(1) or m.group(3)), r["q"])
        task = self.task or infer_task(question)
        if task is None:
            self._skip("unknown_task", rec, f"q: no task word in {question!r} (give the task)")
        answer, segs = self._ground(src, r["groundings"], infos, r["a"], rec)
        idx = []
        for info in infos:   # commit the images only now: a skipped record leaves none behind
            key = (info["source"], info["image_id"])
            if key not in self._image_index:
                self._image_index[key] = len(self.images)
                self.images.append(info)
            idx.append(self._image_index[key])
        out_segs, parts = [], [[] for _ in infos]
        objects: list[str | None] = [None] * n_img
        for seg, (obj, part, rle) in segs:
            key = (idx[seg["image"]], rle["counts"])
            if key not in self._mask_index:
                self._mask_index[key] = len(self.masks)
                self.masks.append({"image": idx[seg["image"]], "object": obj, "part": part,
                                   "area": int(rle_area(rle)), "rle": rle})
            out_segs.append({"mask": self._mask_index[key], **seg})
            if seg["kind"] == "part":
                parts[seg["image"]].append(seg["label"])
            elif objects[seg["image"]] is None:
                objects[seg["image"]] = seg["label"]
        return {"id": f"{task}-{n:07d}", "task": task, "images": idx,
                "prompt": prompt_prefix(n_img, self.prompt) + question, "template": None, "answer": answer,
                "objects": objects, "parts": parts, "segs": out_segs,
                "original": {k: r[k] for k in ("dataset_name", "img_ids", "q", "a")}}

    def convert(self, records: list, where: str = "records") -> list[dict]:
        samples = []
        for n, r in enumerate(records):
            try:
                samples.append(self._record(r, n, where))
            except _Skip:
                continue
        for s in samples:   # by construction; a failure here is a bug in this module
            validate_sample(s, len(self.images), len(self.masks), self.masks)
        return samples


def read_records(path) -> list:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read MixedParts records {path}: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def convert_file(path, sources: dict[str, Source], task: str | None = None, prompt: str = "ours",
                 check_images: str = "none", report: Report | None = None) -> dict:
    """A records file -> a pairs-file dict (``write_pairs`` writes it)."""
    conv = MixedPartsConverter(sources, task, prompt, check_images, report)
    samples = conv.convert(read_records(path), Path(path).name)
    counts = {t: sum(s["task"] == t for s in samples) for t in TASKS}
    return {"format": "calico_jax.pairs", "version": 1, "seed": None,
            "config": {"from_mixed_parts": str(path), "task": task, "prompt": prompt, "check_images": check_images},
            "sources": [{"path": s.paths[0], "paths": s.paths, "name": s.name, "convention": "mixed_parts",
                         "images_root": s.root} for s in sources.values()],
            "images": conv.images, "masks": conv.masks, "samples": samples, "counts": counts,
            "report": conv.report.to_json()}


def parse_specs(values: list[str], flag: str, need_source: bool) -> list[tuple[str, str]]:
    """``SRC=VALUE`` items (or a bare ``VALUE`` -> ``("", VALUE)`` where ``need_source`` is False)."""
    out = []
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep:
            if need_source:
                raise DataError(f"{flag} {v!r}: expected SOURCE=FILE with --from-mixed-parts")
            name, rest = "", v
        if not rest or (sep and not name):
            raise DataError(f"{flag} {v!r}: expected SOURCE=PATH")
        out.append((name, rest))
    return out


def from_args(a, report: Report) -> dict:
    """``python -m calico_jax.data.pairs --from-mixed-parts`` (its parsed arguments) -> the pairs dict."""
    sources = load_sources(parse_specs(a.coco, "--coco", True), dict(parse_specs(a.images, "--images", False)))
    return convert_file(a.from_mixed_parts, sources, a.task, a.prompt, a.check_images, report)


__all__ = ["CODE_RE", "PROMPTS", "Source", "display_name", "load_sources", "infer_task", "prompt_prefix",
           "MixedPartsConverter", "read_records", "convert_file", "parse_specs", "from_args"]
