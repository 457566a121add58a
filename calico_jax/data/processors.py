"""Image processors for the three vision branches (host-side numpy/PIL; outputs are HWC float32).

* :class:`BlipProcessor` -- EVA-CLIP/Q-Former branch (X_global): square resize to 224 with PIL bicubic,
  x/255, CLIP mean/std. Equal to transformers' ``BlipImageProcessor(size=224x224)`` (its PIL backend,
  which is what transformers uses without torchvision) and to LAVIS ``BlipImageEvalProcessor``.
* :class:`Dinov2Processor` -- DINOv2 branch (X_S): shortest side to ``size`` (PIL bicubic), centre crop
  ``crop``, ImageNet mean/std. Defaults (256 -> 224) are the ``facebook/dinov2-*`` preprocessor
  configs (transformers ``BitImageProcessor``); the paper does not state CALICO's DINOv2 resolution
  (``docs/paper_map.md``), so both are arguments. ``crop=None`` keeps the whole resized image; ``square=True`` resizes
  to ``size x size`` like the BLIP branch (keeps the two feature grids spatially aligned).
* :class:`SamProcessor` -- SAM grounding branch: longest side to 1024 (PIL bilinear,
  ``int(x * scale + 0.5)``), x/255, ImageNet mean/std, zero pad bottom/right to 1024x1024 after
  normalising. Equal to transformers' ``SamImageProcessor``; the sizes needed to undo it
  (``original_size``, ``reshaped_input_size``) come back with the pixels.

Masks get the same geometry as their image via each processor's ``masks()`` (nearest-neighbour,
so they stay binary; SAM's ``masks(..., low_res=True)`` equals the processor's 256-side ``labels``).
Loss targets in GLaMM/CALICO stay at the original resolution; ``SamProcessor.postprocess_size``
gives the crop and size to bring predicted masks back there.

:func:`load_image` reads any file to RGB uint8: EXIF orientation applied (unless the annotation size
says the masks were drawn on the stored pixels), grayscale/palette/CMYK converted, and transparency
composited onto white -- the same rule as transformers' ``convert_to_rgb``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from calico_jax.core.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha (or palette/'L' transparency) is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(src, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """File path / PIL image -> RGB uint8 [H, W, 3]. The EXIF orientation is applied, except when
    ``expected_hw`` (the annotation's height, width) matches the stored pixels but not the rotated
    ones: then the annotation was made on the stored pixels and rotating would misalign the masks."""
    im = src if isinstance(src, Image.Image) else Image.open(src)
    im.load()
    rotated = ImageOps.exif_transpose(im)
    if expected_hw is not None and tuple(expected_hw) != (rotated.height, rotated.width) \
            and tuple(expected_hw) == (im.height, im.width):
        rotated = im
    return np.asarray(to_rgb(rotated))


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] array or a PIL image, got {a.dtype} {a.shape}")
    return Image.fromarray(a)


def _normalize(rgb_u8: np.ndarray, mean, std) -> np.ndarray:
    # float64 rescale, then float32 arithmetic: transformers' rescale() / normalize() rounding exactly.
    x = (rgb_u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _resize_masks(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """bool [n, H, W] -> bool [n, h, w] with PIL nearest (the rule transformers uses for label maps)."""
    masks = np.asarray(masks, bool)
    out = np.zeros((masks.shape[0], *hw), bool)
    for i, m in enumerate(masks):
        out[i] = np.asarray(Image.fromarray(m.astype(np.uint8)).resize((hw[1], hw[0]), Image.NEAREST)) > 0
    return out


def _crop_box(h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
    return (h - ch) // 2, (w - cw) // 2


def _center_crop(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Centre crop of [..., H, W, C?]-style arrays given as [H, W, ...]; zero-pads if smaller."""
    h, w = a.shape[:2]
    top, left = _crop_box(h, w, ch, cw)
    if top >= 0 and left >= 0:
        return a[top:top + ch, left:left + cw]
    out = np.zeros((max(ch, h), max(cw, w), *a.shape[2:]), a.dtype)
    pt, pl = -(-(out.shape[0] - h) // 2), -(-(out.shape[1] - w) // 2)   # ceil, as transformers pads
    out[pt:pt + h, pl:pl + w] = a
    return _center_crop(out, ch, cw)


@dataclass(frozen=True)
class BlipProcessor:
    """BLIP eval processor (EVA-CLIP-g input, 224 px in BLIP-2/InstructBLIP)."""
    size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __call__(self, image) -> np.ndarray:
        x = np.asarray(_pil(image).resize((self.size, self.size), Image.BICUBIC))
        return _normalize(x, self.mean, self.std)

    def masks(self, masks: np.ndarray) -> np.ndarray:
        return _resize_masks(masks, (self.size, self.size))


@dataclass(frozen=True)
class Dinov2Processor:
    """DINOv2 processor: shortest side -> ``size`` (bicubic), centre crop ``crop`` (None: no crop)."""
    size: int = 256
    crop: int | None = 224
    square: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.square:
            return self.size, self.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)      # truncation, as torchvision/transformers
        return (new_long, self.size) if w <= h else (self.size, new_long)

    def __call__(self, image) -> np.ndarray:
        im = _pil(image)
        h, w = self.resized_hw(im.height, im.width)
        x = np.asarray(im.resize((w, h), Image.BICUBIC))
        if self.crop is not None:
            x = _center_crop(x, self.crop, self.crop)
        return _normalize(x, self.mean, self.std)

    def masks(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, bool)
        out = _resize_masks(masks, self.resized_hw(*masks.shape[1:]))
        if self.crop is not None:
            out = np.moveaxis(_center_crop(np.moveaxis(out, 0, -1), self.crop, self.crop), -1, 0)
        return out


@dataclass(frozen=True)
class SamProcessor:
    """SAM processor: longest side -> ``longest`` (PIL bilinear), normalise, zero pad bottom/right."""
    longest: int = 1024
    mask_longest: int = 256
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @staticmethod
    def resized_hw(h: int, w: int, longest: int) -> tuple[int, int]:
        scale = longest * 1.0 / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def __call__(self, image) -> dict:
        """-> {"pixel_values": float32 [L, L, 3], "original_size": (H, W), "reshaped_input_size": (h, w)}."""
        im = _pil(image)
        h, w = self.resized_hw(im.height, im.width, self.longest)
        x = _normalize(np.asarray(im.resize((w, h), Image.BILINEAR)), self.mean, self.std)
        out = np.zeros((self.longest, self.longest, 3), np.float32)
        out[:h, :w] = x
        return {"pixel_values": out, "original_size": (im.height, im.width), "reshaped_input_size": (h, w)}

    def masks(self, masks: np.ndarray, low_res: bool = False) -> np.ndarray:
        """bool [n, H, W] -> bool [n, L, L] on the padded input grid (``low_res``: the 256 grid of
        SAM's low-resolution mask logits, = transformers' ``labels``)."""
        masks = np.asarray(masks, bool)
        side = self.mask_longest if low_res else self.longest
        hw = self.resized_hw(*masks.shape[1:], side)
        out = np.zeros((masks.shape[0], side, side), bool)
        out[:, :hw[0], :hw[1]] = _resize_masks(masks, hw)
        return out

    def postprocess_size(self, info: dict) -> tuple[tuple[int, int], tuple[int, int]]:
        """(crop (h, w) on the 1024 grid, original (H, W)): upsample low-res logits to 1024, keep
        ``[:h, :w]``, resize to (H, W) -- SAM's ``postprocess_masks``."""
        return tuple(info["reshaped_input_size"]), tuple(info["original_size"])


def from_preprocess(pre: Preprocess) -> tuple[BlipProcessor, Dinov2Processor | None, SamProcessor]:
    """The three processors a :class:`~calico_jax.core.preprocess.Preprocess` section describes (DINOv2: None when
    ``dinov2_size`` is 0)."""
    dino = (Dinov2Processor(pre.dinov2_size, pre.dinov2_crop or None, mean=pre.dinov2_mean, std=pre.dinov2_std)
            if pre.dinov2_size else None)
    return (BlipProcessor(pre.blip_size, pre.blip_mean, pre.blip_std), dino,
            SamProcessor(pre.sam_size, mean=pre.sam_mean, std=pre.sam_std))


__all__ = ["from_preprocess", "BlipProcessor", "Dinov2Processor", "SamProcessor", "load_image", "to_rgb",
           "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD"]
