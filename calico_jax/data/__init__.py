"""Data: COCO part readers, MixedParts-style pairs, the synthetic part set, image processors."""
