"""Pictures people would rather see than read: mask overlays with labels, and training curves (PIL only)."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (tab10-like), cycled.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def overlay(image: np.ndarray, masks: Sequence[tuple[np.ndarray, str]], alpha: float = 0.45,
            min_side: int = 256) -> Image.Image:
    """RGB uint8 [H, W, 3] + [(bool mask [H, W], label)] -> an RGB image with each mask tinted in its colour,
    outlined, and labelled at its centre. Small images are upscaled (nearest) to ``min_side`` so labels fit."""
    img = np.asarray(image, np.float32).copy()
    h, w = img.shape[:2]
    for k, (m, _) in enumerate(masks):
        c = np.asarray(PALETTE[k % len(PALETTE)], np.float32)
        img[m] = (1 - alpha) * img[m] + alpha * c
    scale = max(1, math.ceil(min_side / max(1, min(h, w))))
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    font = _font(max(11, min(out.size) // 24))
    for k, (m, label) in enumerate(masks):
        c = PALETTE[k % len(PALETTE)]
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        ys, xs = np.nonzero(edge)
        for y, x in zip(ys, xs):
            draw.rectangle([x * scale, y * scale, (x + 1) * scale - 1, (y + 1) * scale - 1], fill=c)
        if m.any() and label:
            ys, xs = np.nonzero(m)
            cx, cy = float(xs.mean()) * scale, float(ys.mean()) * scale
            box = draw.textbbox((cx, cy), label, font=font, anchor="mm")
            draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(0, 0, 0))
            draw.text((cx, cy), label, fill=c, font=font, anchor="mm")
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
