"""LoRA (Hu et al., 2021) as PEFT applies it to LLaMA's Linear layers.

``y = x W0 + b + s · dropout(x) A B`` with ``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
The low-rank factors are separate parameter leaves next to the frozen base kernel
(``.../q_proj/{kernel, lora_a, lora_b}``) so an optimizer can select them by name
(:func:`lora_mask`). ``lora_a`` [in, r] is initialised like PEFT's ``lora_A`` (kaiming-uniform,
a=sqrt(5), i.e. U(±1/sqrt(in))), ``lora_b`` [r, out] with zeros, so a fresh adapter is a no-op.

:func:`merge_lora` folds the factors into the base kernels (``W = W0 + s · A B``);
:func:`lora_state_dict` exports them back to PEFT's adapter naming.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.core.config import Config
from calico_jax.models import layers

LORA_LEAVES = ("lora_a", "lora_b")
TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig(Config):
    """Defaults are GLaMM/LISA's ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05)`` on q/v."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self):
        bad = sorted(set(self.target_modules) - set(TARGETABLE))
        if bad:
            raise ValueError(f"LoRA target_modules {bad} are not LLaMA linears; known: {list(TARGETABLE)}")
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={self.r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraDense(nn.Module):
    """``nn.Linear`` (Flax kernel [in, out]) with optional LoRA factors; ``axes`` names (in, out)."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kernel = self.param("kernel", layers.param_init(layers.torch_linear_init, self.axes),
                            (x.shape[-1], self.features))
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", layers.param_init(nn.initializers.zeros_init(), (self.axes[1],)),
                              (self.features,))
            y = y + bias.astype(self.dtype)
        if self.lora is not None:
            a = self.param("lora_a", layers.param_init(layers.torch_linear_init, (self.axes[0], None)),
                           (x.shape[-1], self.lora.r))
            b = self.param("lora_b", layers.param_init(nn.initializers.zeros_init(), (None, self.axes[1])),
                           (self.lora.r, self.features))
            h = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
            h = jnp.dot(jnp.dot(h.astype(self.dtype), a.astype(self.dtype)), b.astype(self.dtype))
            y = y + self.lora.scaling * h
        return y


def _lora_nodes(params: Any) -> list[tuple[tuple[str, ...], dict]]:
    """(path, dict) of every module dict that holds LoRA leaves."""
    out = []

    def walk(node, path):
        if "lora_a" in node:
            out.append((path, node))
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, path + (k,))
    walk(params, ())
    return out


def merge_lora(params: Any, lora: LoraConfig) -> Any:
    """Returns params without LoRA leaves, with ``kernel = kernel + s · lora_a @ lora_b`` (fp32 math)."""
    def merge(node):
        if not isinstance(node, Mapping):
            return node
        if "lora_a" in node:
            # matmul, not dot: a scanned stack's factors carry a leading layer axis ([L, in, r] @ [L, r, out]).
            delta = jnp.matmul(jnp.asarray(node["lora_a"], jnp.float32), jnp.asarray(node["lora_b"], jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            kernel = node["kernel"]
            new = {k: v for k, v in node.items() if k not in LORA_LEAVES}
            new["kernel"] = (jnp.asarray(kernel, jnp.float32) + lora.scaling * delta).astype(kernel.dtype)
            return new
        return {k: merge(v) for k, v in node.items()}
    return merge(params)


def lora_mask(params: Any) -> Any:
    """Pytree of bools, True on LoRA leaves (for ``optax.masked`` / multi_transform)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in LORA_LEAVES, params)


def _torch_name(path: tuple[str, ...]) -> str:
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path)


def lora_state_dict(params: Any, prefix: str = "base_model.model.") -> dict[str, np.ndarray]:
    """PEFT adapter tensors (``adapter_model.safetensors`` naming, torch layout [r,in] / [out,r])."""
    out = {}
    for path, node in _lora_nodes(params):
        name = prefix + _torch_name(path)
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(node["lora_a"], np.float32).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(node["lora_b"], np.float32).T)
    return out


def peft_adapter_config(lora: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` contents matching :func:`lora_state_dict`."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": list(lora.target_modules), "bias": "none",
            "use_rslora": lora.use_rslora, "fan_in_fan_out": False, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path}
