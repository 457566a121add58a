"""Readers for COCO-format part datasets -> one in-memory form: images -> objects -> named part masks.

Every reader returns a :class:`PartDataset`; masks are kept as compressed COCO RLE (pycocotools), so
big files stay small in memory and any consumer decodes only what it uses.

Conventions supported (``convention=``; ``"auto"`` picks one from the file's content):

``paco``  PACO-LVIS (``paco_lvis_v1_{train,val,test}.json``; also our synthetic set).
    ``categories`` holds the 75 objects plus the object-part categories named ``"<object>:<part>"``
    (e.g. ``"mug:handle"``). Every annotation has ``obj_ann_id``: an object has ``obj_ann_id == id``,
    a part points at its object's annotation id. Segmentation: RLE or polygons. Part annotations whose
    category is only listed in ``part_categories`` (the paper-version file) are accepted too.
``partimagenet``  PartImageNet part files (``annotations/{split}/...json``): every annotation is a
    part; categories are parts (``{"name": "head", "supercategory": "quadruped"}``; original files
    say ``"Quadruped Head"``: a leading supercategory word is stripped). The object comes from the
    ``*_whole`` file (``whole=``; object categories such as ``"antelope"``), matched by image
    ``file_name`` (image ids may differ between the two files): each part goes to the object of its
    image it overlaps most. Without a whole file, each image gets one object per part supercategory,
    named by it and covering the union of its parts. ``auto`` looks for the sibling
    ``{split}_whole/`` directory (``train/train_x.json`` -> ``train_whole/train_whole_x.json``).
``ade20k_part``  ADE20K-Part-234 (OV-PARTS ``ade20k_instance_{train,val}.json``): annotations are
    object instances (44 classes, RLE) whose ``part_category_id`` lists the part classes they contain.
    Part masks live in semantic PNGs (``part_maps=`` directory, file = image stem + ``.png``, pixel value
    = 0-based part class index; any value outside the part list is background); a part mask is that
    PNG's class pixels inside the object's mask. Part names (``"chair's leg"``, the text after
    ``"'s "`` is the part) come from ``part_names=`` (list or a file, one per line) or a
    ``part_categories`` key in the JSON. Part annotations stored in the JSON itself (categories
    ``"<object>'s <part>"``) are linked by ``obj_ann_id`` when present, else to the most-overlapping
    object of that class in the image.
``objects``  plain COCO objects without parts (also what a ``*_whole`` file is read as).

Bad input never crashes a load: each bad record is skipped and counted in a :class:`Report` naming
it; ``strict=True`` raises :class:`DataError` on the first. Kinds: ``duplicate_image_id``,
``duplicate_annotation_id``, ``duplicate_category_id``, ``unknown_image_id``, ``unknown_category_id``,
``empty_segmentation``, ``degenerate_polygon``, ``mask_outside_image``, ``orphan_part``,
``missing_part_map``; the pair
builder adds ``missing_image``, ``corrupt_image``, ``image_size_mismatch``.

The generic file reading is :mod:`calico_jax.data.coco_reader`, each convention's linking rule is in
:mod:`calico_jax.data.coco_conventions`, masks are :mod:`calico_jax.data.rle`, the skip report is
:mod:`calico_jax.data.skips`; their public names are re-exported here.
"""
from __future__ import annotations

from pathlib import Path

from calico_jax.data.coco_conventions import detect_convention, link_parts
from calico_jax.data.coco_reader import ObjectInst, PartDataset, PartImage, read_raw
from calico_jax.data.rle import decode, encode, rle_area, rle_intersection_area, rle_union, to_rle
from calico_jax.data.skips import DataError, Report

CONVENTIONS = ("auto", "paco", "partimagenet", "ade20k_part", "objects")


def load_part_dataset(path, convention: str = "auto", *, whole=None, part_maps=None, part_names=None,
                      strict: bool = False, report: Report | None = None) -> PartDataset:
    """Reads one COCO-format part annotation file (see the module docstring for ``convention``).
    ``report`` collects skipped records (a new one is made if None); ``strict`` raises instead."""
    if convention not in CONVENTIONS:
        raise DataError(f"unknown convention {convention!r}; one of {CONVENTIONS}")
    report = report if report is not None else Report(strict)
    path = Path(path)
    return link_parts(read_raw(path, report), path, convention, report, whole=whole, part_maps=part_maps,
                      part_names=part_names)


def clean_name(name: str) -> str:
    """Display form of a dataset label: ``"car_(automobile)"`` -> ``"car"``, ``"door_handle"`` ->
    ``"door handle"``, ``"Quadruped Head"`` -> ``"quadruped head"``."""
    name = str(name)
    if "(" in name and name.rstrip().endswith(")"):
        name = name[: name.index("(")]
    return " ".join(name.replace("_", " ").lower().split())


__all__ = ["DataError", "Report", "ObjectInst", "PartImage", "PartDataset", "load_part_dataset", "clean_name",
           "decode", "encode", "rle_union", "rle_area", "rle_intersection_area", "to_rle", "detect_convention",
           "CONVENTIONS"]
