"""Converter families: one small module each (a rename table + transform hooks + a torch reference)."""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # annotations only: the registry stays light (convert's --help lists the families from it)
    from calico_jax.checkpoints.torch_files import Checkpoint
    from convert.mapping import Plan


@dataclasses.dataclass(frozen=True)
class Family:
    """``plan`` reads the checkpoint's keys and config; ``verify`` compares against the torch reference."""

    name: str
    plan: Callable[[Checkpoint, str | None], Plan]
    verify: Callable[[Checkpoint, Plan, Any], list]  # -> list[convert.verify.Comparison]

    @property
    def help(self) -> str:
        return HELP[self.name]


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

# CLI name -> what it converts (kept here, not in the family modules, so `--help` imports none of them).
HELP: dict[str, str] = {
    "hf-blip2": "HF Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration directory -> blip2_vision",
    "lavis-blip2": "LAVIS BLIP-2 / InstructBLIP checkpoint file (visual_encoder, ln_vision, Qformer.bert, *_proj) "
                   "-> blip2_vision; --config: a preset or a JSON of the constructor arguments",
    "hf-dinov2": "HF Dinov2Model / Dinov2WithRegistersModel save_pretrained directory",
    "dinov2": "original facebookresearch/dinov2 state dict (--config: constructor args JSON or preset)",
    "hf-sam": "HF SamModel save_pretrained directory",
    "sam": "segment-anything state dict (also GLaMM/LISA merged checkpoints); --config: constructor-args JSON or "
           "preset vit_b/vit_l/vit_h (default: inferred from shapes)",
    "hf-llama": "transformers LlamaForCausalLM (Vicuna / LLaMA-1/2) directory",
    "peft-lora": "PEFT LoRA adapter for an hf-llama base (--base)",
    "glamm": "GLaMM / LISA HF directory -> LLM + SAM + [SEG] projection (glamm_parts); "
             'optional --config {"sam": preset|args, "llm": {...}}',
    "calico": "CALICO checkpoint: the first author's layout (model.Qformer, dino_model, extraction_layer, "
              "adaptive_layers, ...), older guessed names, GLaMM names; --parts for omitted towers; --config "
              '{"config": {...}, "patterns": [[regex, target], ...]}',
}


def get(name: str) -> Family:
    module, attr = FAMILIES[name]
    return getattr(importlib.import_module(module), attr)
