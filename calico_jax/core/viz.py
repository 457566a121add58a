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


def overlay(image: np.ndarray, masks: Sequence[tuple[np.ndarray, str]], alpha: float = 0.5,
            min_side: int = 256) -> Image.Image:
    """RGB uint8 [H, W, 3] + [(bool mask [H, W], label)] -> an RGB image where each mask is filled with a colour
    chosen to contrast with the pixels under and around it, outlined (colour inside a dark or light halo),
    and labelled on an opaque box. Small images are upscaled (nearest) to ``min_side`` so labels fit."""
    base = np.asarray(image, np.uint8)[..., :3]
    img = base.astype(np.float32)
    h, w = img.shape[:2]
    colours: list[tuple[int, int, int]] = []
    for m, _ in masks:
        c = contrast_colour(base, m, colours)
        colours.append(c)
        img[m] = (1 - alpha) * img[m] + alpha * np.asarray(c, np.float32)
    scale = max(1, math.ceil(min_side / max(1, min(h, w))))
    big = np.repeat(np.repeat(img.clip(0, 255).astype(np.uint8), scale, 0), scale, 1)
    for (m, _), c in zip(masks, colours):
        mb = np.repeat(np.repeat(m, scale, 0), scale, 1)
        edge = mb & ~_erode(_erode(mb))                    # 2 px outline in the mask's colour
        halo = _ring(mb, 2)                                 # 2 px outside it, dark or light for contrast
        dark = _lab(np.asarray(c, np.float64))[0] > 55
        big[halo] = (0, 0, 0) if dark else (255, 255, 255)
        big[edge] = c
    out = Image.fromarray(big)
    draw = ImageDraw.Draw(out)
    font = _font(max(11, min(out.size) // 22))
    for (m, label), c in zip(masks, colours):
        if not (m.any() and label):
            continue
        x, y = _label_point(m)
        cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
        box = draw.textbbox((cx, cy), label, font=font, anchor="mm")
        pad = 3
        dx = max(0, pad - box[0]) - max(0, box[2] + pad - out.width)   # keep the box inside the picture
        dy = max(0, pad - box[1]) - max(0, box[3] + pad - out.height)
        cx, cy = cx + dx, cy + dy
        box = (box[0] + dx - pad, box[1] + dy - pad, box[2] + dx + pad, box[3] + dy + pad)
        draw.rectangle(box, fill=(0, 0, 0), outline=c, width=2)
        draw.text((cx, cy), label, fill=(255, 255, 255), font=font, anchor="mm")
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
