"""Image pre-processing settings of a CALICO model: the one place the input sizes and normalisation live.

:class:`Preprocess` is a section of :class:`~calico_jax.models.calico.CalicoConfig` (``model.preprocess`` in an
experiment config), so it is stored in every training workdir's ``config.json``, every exported or converted
checkpoint's ``config.json``, and read back from there by the training pipeline
(:mod:`calico_jax.data.pipeline`), the dry run and the AOT plan (their input shapes) and inference
(:mod:`calico_jax.inference.predictor`). Nothing else declares an image size.

Three branches per image (see :mod:`calico_jax.data.processors` for the exact resampling):

* BLIP (EVA-CLIP → Q-Former, 𝓒): square resize to ``blip_size``, OpenAI-CLIP mean/std.
* DINOv2 (𝓔, the CEM's keys/values): shortest side to ``dinov2_size``, centre crop ``dinov2_crop``
  (0: no crop), ImageNet mean/std. ``dinov2_size = 0``: the model takes no DINOv2 input.
* SAM (𝓖): longest side to ``sam_size``, zero padding to a square, ImageNet mean/std (0-255 scale after
  ``/255``, i.e. the same numbers as torchvision's); the ground-truth masks and the predicted training masks
  live on a ``mask_size`` grid (longest side resized to it, padded bottom/right).
"""
from __future__ import annotations

import dataclasses

from calico_jax.core.config import Config, ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocess(Config):
    """Defaults: the 7B model (BLIP-2/InstructBLIP 224 px, DINOv2 224 px without an extra crop margin,
    SAM ViT-H 1024 px, masks at 1024)."""
    blip_size: int = 224
    dinov2_size: int = 224               # shortest side; 0 = no DINOv2 input
    dinov2_crop: int = 224               # centre crop after the resize; 0 = no crop
    sam_size: int = 1024                 # must equal sam.image_encoder.img_size (checked by CalicoConfig)
    mask_size: int = 1024                # training masks: static side of the ground-truth / predicted grid
    blip_mean: tuple[float, ...] = CLIP_MEAN
    blip_std: tuple[float, ...] = CLIP_STD
    dinov2_mean: tuple[float, ...] = IMAGENET_MEAN
    dinov2_std: tuple[float, ...] = IMAGENET_STD
    sam_mean: tuple[float, ...] = IMAGENET_MEAN
    sam_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        for name in ("blip_size", "sam_size", "mask_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"preprocess.{name} must be > 0, got {getattr(self, name)}")
        if self.dinov2_size < 0 or self.dinov2_crop < 0:
            raise ConfigError("preprocess.dinov2_size / dinov2_crop must be >= 0")
        for name in ("blip_mean", "blip_std", "dinov2_mean", "dinov2_std", "sam_mean", "sam_std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"preprocess.{name} must have 3 values (RGB), got {getattr(self, name)}")

    @property
    def dinov2_side(self) -> int:
        """Side of the (square) DINOv2 input array: the crop, else the resize target."""
        return self.dinov2_crop or self.dinov2_size

    def check_same(self, other: Preprocess, where: str) -> None:
        """Raises a :class:`ConfigError` naming every field where ``other`` (what a caller asks for) differs
        from ``self`` (what a checkpoint was trained with)."""
        diff = [f"{f.name}: checkpoint {getattr(self, f.name)!r}, requested {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        if diff:
            raise ConfigError(f"{where}: pre-processing differs from the checkpoint's ({'; '.join(diff)})")
