"""MixedParts-style pairs files: the JSON schema (tasks, prompt prefix), the writer, the (validating) reader and
the image check, shared by the pair builder (:mod:`calico_jax.data.pairs`) and the MixedParts converter
(:mod:`calico_jax.data.mixed_parts`).

JSON schema (``format: "calico_jax.pairs"``, ``version: 1``)::

    {"format", "version", "seed", "config": {...builder options...},
     "sources": [{"path", "convention", "images_root"}],
     "images":  [{"source": s, "image_id", "file": file_name, "height", "width"}],
     "masks":   [{"image": i, "object": "mug", "part": "handle" | null, "area", "rle": {"size", "counts"}}],
     "samples": [{"id": "common_parts-0000003", "task", "images": [i, ...], "prompt", "template",
                  "answer", "objects": [class per image], "parts": [[parts segmented in image k], ...],
                  "segs": [{"mask": m, "image": k, "label", "kind": "object" | "part"}, ...]}],
     "counts": {task: n}, "report": {"counts": {kind: n}, "records": [{"kind", "record", "detail"}]}}

``segs`` is in ``[SEG]`` order; ``image`` in a seg is the 0-based position in the sample (``(IMAGE{k+1})``
in the text); masks are COCO RLE at the original image size, shared between samples. An image path
is ``sources[images[i].source].images_root / images[i].file``. The MixedParts authors' own records
(``mixed_parts_{train,val,test}.json``, the first author's loader format) are converted into this schema by
:mod:`calico_jax.data.mixed_parts` (``python -m calico_jax.data.pairs --from-mixed-parts``); its samples also
carry ``original`` (the record's ``dataset_name``, ``img_ids``, ``q``, ``a``) and ``template: null``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from calico_jax.data.packed import PackedPairs, is_packed
from calico_jax.data.pairs_schema import SEG_RE, TASKS, validate_sample
from calico_jax.data.rle import decode
from calico_jax.data.skips import DataError, Report

PREFIX = "{images} provide an overview of the pictures. "   # the first user turn's start, before the question


def images_phrase(n: int) -> str:
    """The prompt's image preamble subject: ``"The <image> (IMAGE1) and <image> (IMAGE2)"`` for ``n = 2``."""
    tags = [f"<image> (IMAGE{k + 1})" for k in range(n)]
    return "The " + (tags[0] if n == 1 else ", ".join(tags[:-1]) + " and " + tags[-1])


def check_image(path: Path, hw: tuple[int, int], record: str, mode: str, report: Report) -> bool:
    """Whether the image of ``record`` is usable under ``mode`` (``none`` / ``exists`` / a full decode that checks
    its size ``hw``, EXIF rotation allowed); a bad one is skipped into ``report``."""
    if mode == "none":
        return True
    if not path.is_file():
        report.skip("missing_image", record, str(path))
        return False
    if mode == "exists":
        return True
    try:
        with Image.open(path) as im:
            size = (im.height, im.width)
            rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))   # fast JPEG decode, still full read
            im.load()
    except Exception as e:  # noqa: BLE001 -- PIL raises many types on corrupt files
        report.skip("corrupt_image", record, f"{path}: {type(e).__name__}: {e}")
        return False
    if tuple(hw) != size and not (rotated and tuple(hw) == size[::-1]):
        report.skip("image_size_mismatch", record, f"file {size} != annotation {tuple(hw)}")
        return False
    return True


def write_pairs(data: dict, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":"), ensure_ascii=False), encoding="utf-8")
    tmp.replace(out)
    return out


# ------------------------------------------------------------------------------------------ reader
class Pairs:
    """A pairs file in memory: samples plus image-path and mask look-ups."""

    def __init__(self, data: dict, roots: dict[int, str] | None = None):
        self.data, self.roots = data, roots or {}
        self.samples: list[dict] = data["samples"]
        self.images: list[dict] = data["images"]
        self.masks: list[dict] = data["masks"]
        self.sources: list[dict] = data["sources"]

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, sample: dict, k: int) -> Path:
        """Path of the sample's k-th image (a relative ``images_root`` is relative to the working
        directory, as given on the command line, unless ``read_pairs(images_root=...)`` overrides it)."""
        im = self.images[sample["images"][k]]
        root = self.roots.get(im["source"]) or Path(self.sources[im["source"]]["images_root"])
        return Path(root) / im["file"]

    def mask(self, seg: dict | int) -> np.ndarray:
        """bool [H, W] at the original image size."""
        m = self.masks[seg["mask"] if isinstance(seg, dict) else seg]
        return decode(m["rle"])


def read_pairs(path, validate: bool = True, images_root: str | dict[int, str] | None = None) -> Pairs:
    """Reads a pairs file written by :func:`write_pairs`; ``validate`` checks every sample's
    ``[SEG]``/identifier/mask consistency (raises :class:`DataError` naming the sample).
    ``images_root`` (one directory, or source index -> directory) overrides the stored roots.
    A packed directory (:mod:`calico_jax.data.pack`) opens as a :class:`~calico_jax.data.packed.PackedPairs`:
    the same interface, records read on demand (``validate`` then happens per record as it is read)."""
    path = Path(path)
    if is_packed(path):
        return PackedPairs(path, images_root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read pairs file {path}: {e}") from e
    if data.get("format") != "calico_jax.pairs" or data.get("version") != 1:
        raise DataError(f"{path}: not a calico_jax.pairs v1 file (format={data.get('format')!r}, "
                        f"version={data.get('version')!r}); adapt read_pairs for other schemas (MixedParts "
                        "records: python -m calico_jax.data.pairs --from-mixed-parts)")
    if validate:
        for s in data["samples"]:
            validate_sample(s, len(data["images"]), len(data["masks"]), data["masks"])
    if isinstance(images_root, (str, Path)):
        images_root = {i: str(images_root) for i in range(len(data["sources"]))}
    return Pairs(data, images_root)


__all__ = ["SEG_RE", "TASKS", "PREFIX", "Pairs", "read_pairs", "write_pairs", "validate_sample", "images_phrase",
           "check_image", "PackedPairs"]
