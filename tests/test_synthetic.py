"""The embedded synthetic part dataset: content rules, format, determinism, speed."""
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from calico_jax.data import synthetic
from calico_jax.data.coco_parts import decode, load_part_dataset


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, synthetic.generate(out, 30, seed=3, progress=False)


def test_class_table_rules():
    assert len(synthetic.CLASSES) >= 8
    uses = Counter()
    for _sup, parts in synthetic.CLASSES.values():
        names = [p for p, _ in parts]
        assert 2 <= len(set(names)) <= 5 and len(names) == len(set(names))
        uses.update(names)
    shared = {p for p, n in uses.items() if n >= 2}
    assert {"wheel", "handle", "leg", "seat", "head", "body"} <= shared


def test_format_reads_as_paco_and_masks_are_consistent(gen):
    out, path = gen
    ds = load_part_dataset(path)
    assert ds.convention == "paco" and len(ds.report) == 0 and len(ds.images) == 30
    n_obj = 0
    for im in ds.images:
        assert Image.open(out / "images" / im.file_name).size == (im.width, im.height)
        for ob in im.objects:
            n_obj += 1
            assert ob.name in synthetic.CLASSES and ob.parts
            assert set(ob.parts) <= {p for p, _ in synthetic.CLASSES[ob.name][1]}
            om = decode(ob.rle)
            union = np.zeros_like(om)
            for rles in ob.parts.values():
                assert len(rles) == 1                  # one annotation per (object, part name), as PACO
                pm = decode(rles[0])
                assert not (pm & union).any()          # visible part masks are disjoint
                union |= pm
            assert np.array_equal(union, om)           # object = union of its visible parts
    assert n_obj >= 30


def test_masks_match_rendered_pixels():
    img, objects = synthetic.render(5, 0)
    for _, parts in objects:
        for m in parts.values():
            if m.any():   # a part is drawn in one flat colour: its visible mask holds exactly that colour
                assert len(np.unique(img[m], axis=0)) == 1


def test_byte_identical_for_a_seed_and_different_for_another(gen, tmp_path):
    out, path = gen
    again = synthetic.generate(tmp_path / "a", 30, seed=3, progress=False)
    assert again.read_bytes() == path.read_bytes()
    for f in sorted((out / "images").iterdir()):
        assert (tmp_path / "a" / "images" / f.name).read_bytes() == f.read_bytes()
    other = synthetic.generate(tmp_path / "b", 30, seed=4, progress=False)
    assert other.read_bytes() != path.read_bytes()


def test_variety():
    sizes, counts, classes = set(), Counter(), set()
    for i in range(40):
        img, objects = synthetic.render(0, i)
        assert img.dtype == np.uint8 and img.ndim == 3
        sizes.add(img.shape[:2])
        counts[len(objects)] += 1
        classes.update(c for c, _ in objects)
    assert len(sizes) > 3 and sorted(counts) == [1, 2, 3] and len(classes) >= 10


def test_speed_extrapolates_to_1000_images_under_60s(tmp_path):
    t0 = time.perf_counter()
    synthetic.generate(tmp_path, 100, seed=0, progress=False)
    dt = time.perf_counter() - t0
    assert dt * 10 < 60, f"100 images took {dt:.1f}s"


def test_cli(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--num_images", "4", "--seed", "1"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 4


def test_easy_set_options_single_object_class_hue_no_clutter():
    """``make demo``'s set: one object, its class's hue (nearest palette entry by direction in RGB), and
    with no clutter every pixel off the object follows the smooth background (no shapes drawn there)."""
    names = list(synthetic.CLASSES)
    pal = np.asarray(synthetic.CLASS_PALETTE, np.float64)
    pal /= np.linalg.norm(pal, axis=1, keepdims=True)
    for i in range(12):
        img, objects = synthetic.render(7, i, max_objects=1, object_scale=(0.25, 0.4), clutter=False,
                                        class_colors=True)
        assert len(objects) == 1
        cls, parts = objects[0]
        on = np.logical_or.reduce(list(parts.values()))
        rgb = np.median(img[on].astype(np.float64), axis=0)
        assert names[int(np.argmax(pal @ (rgb / np.linalg.norm(rgb))))] == cls
        # background: neighbouring off-object pixels differ only by the gradient + noise (sigma 6)
        assert _off_object_edges(img, on) < 60
    # the default set does draw shapes off the objects
    edges = []
    for i in range(4):
        img, objects = synthetic.render(7, i)
        edges.append(_off_object_edges(img, np.logical_or.reduce([m for _, ps in objects for m in ps.values()])))
    assert max(edges) > 60


def _off_object_edges(img, on):
    """99.9th percentile of horizontal neighbour differences between two off-object pixels."""
    off = ~on
    both = off[:, 1:] & off[:, :-1]
    return np.percentile(np.abs(np.diff(img.astype(np.float64), axis=1)).max(-1)[both], 99.9)
