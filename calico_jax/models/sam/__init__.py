"""Segment Anything (SAM) in Flax Linen: see :mod:`calico_jax.models.sam.model`."""
from calico_jax.models.sam.config import (
                                          PRESETS,
                                          ImageEncoderConfig,
                                          MaskDecoderConfig,
                                          PromptEncoderConfig,
                                          SamConfig,
                                          TwoWayTransformerConfig,
)
from calico_jax.models.sam.model import PIXEL_MEAN, PIXEL_STD, Sam, postprocess_masks

__all__ = ["Sam", "SamConfig", "ImageEncoderConfig", "PromptEncoderConfig", "MaskDecoderConfig",
           "TwoWayTransformerConfig", "PRESETS", "PIXEL_MEAN", "PIXEL_STD", "postprocess_masks"]
