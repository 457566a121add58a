"""Converter families: one small module each (a rename table + transform hooks + a torch reference)."""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from calico_jax.checkpoints.torch_files import Checkpoint
from convert.mapping import Plan


@dataclasses.dataclass(frozen=True)
class Family:
    """``plan`` reads the checkpoint's keys and config; ``verify`` compares against the torch reference."""

    name: str
    help: str
    plan: Callable[[Checkpoint, str | None], Plan]
    verify: Callable[[Checkpoint, Plan, Any], list]  # -> list[convert.verify.Comparison]


# CLI name -> (module, attribute); imported lazily so one family's deps never slow another.
FAMILIES: dict[str, tuple[str, str]] = {
    "hf-blip2": ("convert.families.blip2", "HF_BLIP2"),
    "lavis-blip2": ("convert.families.lavis_blip2", "LAVIS_BLIP2"),
    "hf-dinov2": ("convert.families.dinov2", "HF_DINOV2"),
    "dinov2": ("convert.families.dinov2", "DINOV2"),
    "hf-sam": ("convert.families.sam", "HF_SAM"),
    "sam": ("convert.families.sam", "SAM"),
    "hf-llama": ("convert.families.llama", "HF_LLAMA"),
    "peft-lora": ("convert.families.peft_lora", "PEFT_LORA"),
    "glamm": ("convert.families.glamm", "GLAMM"),
    "calico": ("convert.families.calico", "CALICO"),
}


def get(name: str) -> Family:
    module, attr = FAMILIES[name]
    return getattr(importlib.import_module(module), attr)
