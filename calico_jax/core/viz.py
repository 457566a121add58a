"""Pictures people would rather see than read: mask overlays with labels, and training curves (PIL only)."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (tab10-like), cycled: line colours of the training curves.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
# Mask colours to choose from: vivid hues at several lightnesses, so one of them stands out on any scene.
MASK_COLOURS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (0, 255, 0), (0, 90, 255),
                (255, 128, 0), (140, 0, 255), (255, 255, 255), (20, 20, 20), (0, 160, 90), (255, 105, 180))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8-range [..., 3] -> CIE L*a*b* (D65): distances there roughly follow what the eye sees."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _neighbours(m: np.ndarray, fill: bool) -> list[np.ndarray]:
    """The 4-neighbour shifts of a bool mask; pixels shifted in from outside the picture are ``fill``."""
    p = np.pad(m, 1, constant_values=fill)
    return [p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]


def _erode(m: np.ndarray) -> np.ndarray:
    return m & np.logical_and.reduce(_neighbours(m, False))


def _dilate(m: np.ndarray) -> np.ndarray:
    return m | np.logical_or.reduce(_neighbours(m, False))


def _ring(m: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of the mask but outside it: the background an outline is seen against."""
    grown = m
    for _ in range(width):
        grown = _dilate(grown)
    return grown & ~m


def contrast_colour(image: np.ndarray, mask: np.ndarray, taken: Sequence[tuple[int, int, int]] = ()):
    """The colour of ``MASK_COLOURS`` farthest (CIE Lab) from the mask's own pixels and from the background
    right around it, preferring colours not already ``taken`` by other masks in the same picture."""
    px = image[mask] if mask.any() else image.reshape(-1, 3)
    ring = image[_ring(mask, max(2, min(mask.shape) // 32))]
    refs = [_lab(px.mean(0))] + ([_lab(ring.mean(0))] if len(ring) else [])
    cand = _lab(np.asarray(MASK_COLOURS, np.float64))
    score = np.min([np.linalg.norm(cand - r, axis=-1) for r in refs], axis=0)
    if taken:   # a colour another mask uses only wins if nothing else contrasts nearly as well
        score = score - 25.0 * np.isin(np.arange(len(MASK_COLOURS)),
                                       [MASK_COLOURS.index(t) for t in taken if t in MASK_COLOURS])
    return MASK_COLOURS[int(np.argmax(score))]


def _label_point(m: np.ndarray) -> tuple[int, int]:
    """A pixel deep inside the mask (the last one left by repeated erosion), not the centroid, which can
    fall outside a thin or curved shape."""
    core = m
    while True:
        nxt = _erode(core)
        if not nxt.any():
            break
        core = nxt
    ys, xs = np.nonzero(core)
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))   # the core's own middle
    return int(xs[k]), int(ys[k])


Mask = tuple   # (bool [H, W], label) or (bool [H, W], label, kind): kind "object" | "part" | None

# Fill opacity per kind: an object is a light wash under a thick outline, so its parts (strong fill, thin outline)
# stay visible on top of it; an unknown kind gets the part style.
KIND_ALPHA = {"object": 0.25, "part": 0.5, None: 0.5}
KIND_EDGE = {"object": 4, "part": 2, None: 2}


def _unpack(m: Mask) -> tuple[np.ndarray, str, str | None]:
    return (m[0], m[1], m[2]) if len(m) > 2 else (m[0], m[1], None)


def _render(image: np.ndarray, masks: Sequence[Mask], alpha: float | None, min_side: int):
    """Filled and outlined masks, upscaled: (picture, colours, scale). Objects are drawn before parts."""
    base = np.asarray(image, np.uint8)[..., :3]
    img = base.astype(np.float32)
    h, w = img.shape[:2]
    items = [_unpack(m) for m in masks]
    colours: list[tuple[int, int, int]] = []
    for m, _, _ in items:
        colours.append(contrast_colour(base, m, colours))
    order = sorted(range(len(items)), key=lambda i: items[i][2] != "object")
    for i in order:
        m, _, kind = items[i]
        a = KIND_ALPHA.get(kind, 0.5) if alpha is None else alpha
        img[m] = (1 - a) * img[m] + a * np.asarray(colours[i], np.float32)
    scale = max(1, math.ceil(min_side / max(1, min(h, w))))
    big = np.repeat(np.repeat(img.clip(0, 255).astype(np.uint8), scale, 0), scale, 1)
    for i in order:
        m, _, kind = items[i]
        c = colours[i]
        mb = np.repeat(np.repeat(m, scale, 0), scale, 1)
        inner = mb
        for _ in range(KIND_EDGE.get(kind, 2)):
            inner = _erode(inner)
        edge = mb & ~inner                                  # outline in the mask's colour (2 px; objects 4 px)
        halo = _ring(mb, 2)                                 # 2 px outside it, dark or light for contrast
        dark = _lab(np.asarray(c, np.float64))[0] > 55
        big[halo & ~edge] = (0, 0, 0) if dark else (255, 255, 255)
        big[edge] = c
    return Image.fromarray(big), colours, scale


def _overlaps(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def place_labels(size: tuple[int, int], anchors: Sequence[tuple[float, float]], extents: Sequence[tuple[int, int]],
                 pad: int = 3) -> list[tuple[float, float, float, float]]:
    """Boxes ``(x0, y0, x1, y1)`` for labels of ``extents`` (w, h), each as near its anchor as it can be without
    overlapping an earlier label or leaving the picture: the anchor first, then rings of positions around it."""
    W, H = size
    placed: list[tuple[float, float, float, float]] = []
    for (ax, ay), (tw, th) in zip(anchors, extents):
        bw, bh = tw + 2 * pad, th + 2 * pad
        best, best_cost = None, None
        steps = [(0.0, 0.0)] + [(r * math.cos(a), r * math.sin(a)) for r in (1, 2, 3, 4, 6, 8)
                                for a in (math.pi * k / 4 for k in (6, 2, 0, 4, 7, 5, 1, 3))]
        for dx, dy in steps:
            cx, cy = ax + dx * (bh + 2), ay + dy * (bh + 2)
            x0 = min(max(cx - bw / 2, 1), W - bw - 1)
            y0 = min(max(cy - bh / 2, 1), H - bh - 1)
            box = (x0, y0, x0 + bw, y0 + bh)
            cost = sum(_overlaps(box, q) for q in placed)
            if cost == 0:
                best = box
                break
            if best_cost is None or cost < best_cost:
                best, best_cost = box, cost
        placed.append(best)
    return placed


def _draw_labels(out: Image.Image, anchors, labels, colours) -> None:
    draw = ImageDraw.Draw(out)
    font = _font(max(11, min(out.size) // 22))
    ext = []
    for label in labels:
        b = draw.textbbox((0, 0), label, font=font, anchor="lt")
        ext.append((b[2] - b[0], b[3] - b[1]))
    boxes = place_labels(out.size, anchors, ext)
    for (ax, ay), box, label, c in zip(anchors, boxes, labels, colours):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if not (box[0] <= ax <= box[2] and box[1] <= ay <= box[3]):   # moved away: a leader line to its mask
            draw.line([(ax, ay), (cx, cy)], fill=(0, 0, 0), width=3)
            draw.line([(ax, ay), (cx, cy)], fill=c, width=1)
            draw.ellipse([ax - 2, ay - 2, ax + 2, ay + 2], fill=c, outline=(0, 0, 0))
        draw.rectangle(box, fill=(0, 0, 0), outline=c, width=2)
        draw.text((cx, cy), label, fill=(255, 255, 255), font=font, anchor="mm")


def overlay(image: np.ndarray, masks: Sequence[Mask], alpha: float | None = None, min_side: int = 256,
            colours_out: list | None = None) -> Image.Image:
    """RGB uint8 [H, W, 3] + [(bool mask [H, W], label[, kind])] -> an RGB image where each mask is filled with a
    colour chosen to contrast with the pixels under and around it, outlined (colour inside a dark or light halo)
    and labelled on an opaque box. Objects (``kind="object"``) get a light fill and a thick outline, parts a
    strong fill; labels never cover each other (a label pushed off its mask gets a leader line). Small images
    are upscaled (nearest) to ``min_side`` so labels fit. ``colours_out`` receives each mask's colour."""
    out, colours, scale = _render(image, masks, alpha, min_side)
    items = [_unpack(m) for m in masks]
    keep = [i for i, (m, label, _) in enumerate(items) if m.any() and label]
    anchors = [((x + 0.5) * scale, (y + 0.5) * scale) for x, y in (_label_point(items[i][0]) for i in keep)]
    _draw_labels(out, anchors, [items[i][1] for i in keep], [colours[i] for i in keep])
    if colours_out is not None:
        colours_out.extend(colours)
    return out


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        nxt = f"{cur} {word}".strip()
        if cur and draw.textlength(nxt, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = nxt
    return lines + ([cur] if cur else [])


def render(panels: Sequence[tuple[np.ndarray, Sequence[Mask], str]], min_side: int = 256) -> list[tuple]:
    """Each panel's :func:`overlay` and its masks' colours: ``[(picture, colours)]`` (what :func:`figure` lays
    out; a caller that also saves the pictures alone draws them once)."""
    out = []
    for image, masks, _ in panels:
        colours: list = []
        out.append((overlay(image, masks, min_side=min_side, colours_out=colours), colours))
    return out


def figure(panels: Sequence[tuple[np.ndarray, Sequence[Mask], str]], caption: str = "", min_side: int = 256,
           legend: bool = True, rendered: Sequence[tuple] | None = None) -> Image.Image:
    """Side-by-side overlays ``[(image, masks, title)]`` with a legend strip (each mask's colour, label, kind
    and panel) and ``caption`` (e.g. the answer sentence) wrapped underneath. ``rendered``: the panels'
    :func:`render` when the caller has it already."""
    rendered = render(panels, min_side) if rendered is None else rendered
    pics, keys = [], []
    for (_, masks, title), (pic, colours) in zip(panels, rendered):
        pics.append(pic)
        for m, c in zip(masks, colours):
            _, label, kind = _unpack(m)
            keys.append((c, f"{label or '(no label)'}" + (f" ({kind})" if kind else "") + f", {title}", kind))
    gap, top = 8, 22
    width = max(320, sum(p.width for p in pics) + gap * (len(pics) - 1))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(14)
    rows: list[list[tuple]] = [[]]
    x = 0
    for c, text, kind in keys if legend else []:
        w = 26 + int(probe.textlength(text, font=font)) + 16
        if rows[-1] and x + w > width:
            rows.append([])
            x = 0
        rows[-1].append((x, c, text, kind))
        x += w
    legend_h = 22 * len(rows) if legend and keys else 0
    lines = _wrap(probe, caption, font, width - 8) if caption else []
    height = top + max(p.height for p in pics) + 8 + legend_h + 20 * len(lines) + (8 if lines else 0)
    out = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(out)
    x = 0
    for (_, _, title), pic in zip(panels, pics):
        out.paste(pic, (x, top))
        d.text((x + 2, 3), title, fill="black", font=font)
        x += pic.width + gap
    y = top + max(p.height for p in pics) + 8
    for r, row in enumerate(rows if legend_h else []):
        for x0, c, text, kind in row:
            box = [x0 + 4, y + 22 * r + 3, x0 + 20, y + 22 * r + 19]
            if kind == "object":   # the swatch repeats the style: outlined wash for objects, solid for parts
                d.rectangle(box, fill=tuple(int(0.75 * 255 + 0.25 * v) for v in c), outline=c, width=3)
            else:
                d.rectangle(box, fill=c, outline=(0, 0, 0))
            d.text((x0 + 26, y + 22 * r + 11), text, fill="black", font=font, anchor="lm")
    y += legend_h
    for k, line in enumerate(lines):
        d.text((4, y + 20 * k + 4), line, fill="black", font=font)
    return out


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path,
                keys: Sequence[str] = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss"),
                size: tuple[int, int] = (900, 520)) -> Path:
    """Training curves from ``metrics.jsonl`` (one panel, log-scale y, one line per key) -> PNG."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    series = {k: [(r["step"], r[k]) for r in rows if k in r and r[k] is not None and r[k] > 0] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError(f"{metrics_jsonl}: none of {list(keys)} logged")
    W, H = size
    left, right, top, bottom = 70, 170, 30, 50
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    font = _font(13)
    steps = [s for v in series.values() for s, _ in v]
    vals = [math.log10(y) for v in series.values() for _, y in v]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = math.floor(min(vals)), math.ceil(max(vals) + 1e-9)
    y1 = max(y1, y0 + 1)
    px = lambda s: left + (s - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (math.log10(y) - y0) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for e in range(y0, y1 + 1):
        y = py(10.0 ** e)
        d.line([left, y, W - right, y], fill=(225, 225, 225))
        d.text((left - 6, y), f"1e{e}", fill="black", font=font, anchor="rm")
    for k in range(6):
        s = x0 + (x1 - x0) * k / 5
        d.text((px(s), H - bottom + 6), f"{s:.0f}", fill="black", font=font, anchor="ma")
    d.text(((left + W - right) / 2, H - 18), "step", fill="black", font=font, anchor="mm")
    for k, (name, pts) in enumerate(series.items()):
        c = PALETTE[k % len(PALETTE)]
        d.line([(px(s), py(y)) for s, y in pts], fill=c, width=2)
        d.line([W - right + 12, top + 12 + 20 * k, W - right + 32, top + 12 + 20 * k], fill=c, width=3)
        d.text((W - right + 38, top + 12 + 20 * k), name, fill="black", font=font, anchor="lm")
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    im.save(tmp)
    tmp.replace(out_png)
    return out_png
