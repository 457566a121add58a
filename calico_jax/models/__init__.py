"""Model registry: the name stored in a converted checkpoint's config.json -> (module, config) classes.

Imports are lazy so that loading one family does not import the others.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

# name -> (module path, nn.Module class, Config class)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "eva_vit": ("calico_jax.models.eva_vit", "EvaVit", "EvaVitConfig"),
    "qformer": ("calico_jax.models.qformer", "QFormer", "QFormerConfig"),
    "blip2_vision": ("calico_jax.models.blip2", "Blip2Vision", "Blip2VisionConfig"),
    "dinov2": ("calico_jax.models.dinov2", "Dinov2", "Dinov2Config"),
    "sam": ("calico_jax.models.sam", "Sam", "SamConfig"),
    "llama": ("calico_jax.models.llama", "LlamaForCausalLM", "LlamaConfig"),
    "calico": ("calico_jax.models.calico", "Calico", "CalicoConfig"),
    "glamm_parts": ("calico_jax.models.glamm_parts", "GlammParts", "GlammPartsConfig"),
}


def classes(name: str) -> tuple[type, type]:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {sorted(REGISTRY)}")
    path, module_cls, config_cls = REGISTRY[name]
    mod = importlib.import_module(path)
    return getattr(mod, module_cls), getattr(mod, config_cls)


def init_variables(module: Any, key: Any) -> Any:
    """``module.init`` on its ``dummy_inputs()``: keyword arguments where that is a dict (the towers), else the one
    positional input (CALICO's :class:`~calico_jax.models.inputs.CalicoInputs`)."""
    dummy = module.dummy_inputs()
    return module.init(key, **dummy) if isinstance(dummy, Mapping) else module.init(key, dummy)


def build(name: str, config: Mapping[str, Any] | Any) -> tuple[Any, Any]:
    """Returns ``(module, config)`` for a registry name and a config (dataclass or dict)."""
    module_cls, config_cls = classes(name)
    if not isinstance(config, config_cls):
        config = config_cls.from_dict(config)
    return module_cls(config), config
