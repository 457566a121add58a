"""Overlays: the mask colour contrasts with what is under and around it; outline and label stay legible."""
import numpy as np

from calico_jax.core import viz

FLOOR, TABLE = (110, 120, 140), (40, 60, 170)   # a blue table on a blue-grey floor


def _scene(h=48, w=64):
    im = np.empty((h, w, 3), np.uint8)
    im[:] = FLOOR
    m = np.zeros((h, w), bool)
    m[10:30, 12:50] = True
    im[m] = TABLE
    return im, m


def _delta_e(a, b):
    return float(np.linalg.norm(viz._lab(np.asarray(a, float)) - viz._lab(np.asarray(b, float))))


def test_colour_contrasts_with_object_and_background():
    im, m = _scene()
    c = viz.contrast_colour(im, m)
    assert _delta_e(c, TABLE) > 60 and _delta_e(c, FLOOR) > 60, c
    # the old fill (45 % of the first tab10 colour, a blue) barely changed the table's colour
    assert _delta_e(0.55 * np.asarray(TABLE) + 0.45 * np.asarray(viz.PALETTE[0]), TABLE) < 25


def test_second_mask_gets_another_colour():
    im, m = _scene()
    first = viz.contrast_colour(im, m)
    assert viz.contrast_colour(im, m, taken=[first]) != first


def test_overlay_fill_outline_and_label():
    im, m = _scene()
    out = np.asarray(viz.overlay(im, [(m, "table")], min_side=192))
    scale = 192 // 48
    assert out.shape == (48 * scale, 64 * scale, 3)
    c = viz.contrast_colour(im, m)
    # inside (away from the label at the centre) the fill moved towards the chosen colour
    inside = out[12 * scale + 8, 14 * scale + 8].astype(float)
    assert _delta_e(inside, TABLE) > 25
    # the outline on the mask's border carries the colour itself; just outside it is the halo
    assert tuple(out[10 * scale, 30 * scale]) == c
    halo = tuple(out[10 * scale - 1, 30 * scale])
    assert halo in ((0, 0, 0), (255, 255, 255))
    # the label box (opaque black with white text) sits inside the mask's deepest region
    centre = out[20 * scale - 6: 20 * scale + 6, 31 * scale - 20: 31 * scale + 20].reshape(-1, 3)
    assert (centre == 0).all(-1).any() and (centre == 255).all(-1).any()


def test_label_point_stays_inside_a_curved_shape():
    yy, xx = np.mgrid[:64, :64]
    ring = (np.hypot(yy - 32, xx - 32) < 28) & (np.hypot(yy - 32, xx - 32) > 20)   # centroid is outside
    x, y = viz._label_point(ring)
    assert ring[y, x]
    assert not ring[32, 32]


def test_label_box_is_kept_inside_the_picture():
    im = np.full((32, 32, 3), 200, np.uint8)
    m = np.zeros((32, 32), bool)
    m[0:3, 0:3] = True
    out = np.asarray(viz.overlay(im, [(m, "corner label")], min_side=128))
    ys, xs = np.nonzero((out == 0).all(-1))     # the label's black box ...
    assert len(ys) and ys.min() >= 2 and xs.min() >= 2   # ... is moved in whole, its 2 px outline too


def test_labels_at_one_spot_do_not_cover_each_other():
    boxes = viz.place_labels((256, 256), [(128.0, 128.0)] * 6, [(40, 12)] * 6)
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= 256 and 0 <= a[1] and a[3] <= 256, a
        for b in boxes[:i]:
            assert viz._overlaps(a, b) == 0, (a, b)
    assert boxes[0][0] < 128 < boxes[0][2] and boxes[0][1] < 128 < boxes[0][3]   # the first stays on its anchor


def test_object_is_a_wash_and_its_part_is_solid():
    im, m = _scene()
    part = np.zeros_like(m)
    part[14:22, 20:30] = True
    colours = []
    out = np.asarray(viz.overlay(im, [(m, "", "object"), (part, "", "part")], min_side=192, colours_out=colours))
    s = 192 // 48
    obj_px, part_px = out[26 * s, 44 * s].astype(float), out[18 * s, 25 * s].astype(float)
    # the object's fill moves a quarter of the way to its colour; the part, drawn over it, half way to its own
    washed = 0.75 * np.asarray(TABLE) + 0.25 * np.asarray(colours[0])
    assert np.allclose(obj_px, washed, atol=1.5)
    assert np.allclose(part_px, 0.5 * washed + 0.5 * np.asarray(colours[1]), atol=1.5)
    assert colours[0] != colours[1]


def test_figure_has_a_legend_entry_per_mask_and_the_caption():
    im, m = _scene()
    one = viz.figure([(im, [(m, "table", "object")], "IMAGE1")], caption="")
    three = viz.figure([(im, [(m, "table", "object")], "IMAGE1"), (im, [(m, "a"), (m, "b")], "IMAGE2")],
                       caption="a long answer " * 30)
    assert three.width > one.width
    assert three.height >= one.height + 2 * 20     # the wrapped caption's lines sit under the legend
    legend = np.asarray(one)[-22:]                  # the swatch carries the mask's colour
    c = viz.contrast_colour(im, m)
    assert (legend == np.asarray(c, np.uint8)).all(-1).any()
