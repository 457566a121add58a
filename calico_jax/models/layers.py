"""Shared Linen building blocks with logical axis names.

Every parameter is created through :func:`param_init` so it carries logical axis names; the one
rules table in :mod:`calico_jax.parallel.sharding` maps them to mesh axes. Names used across the package:

``embed``   model width of a tower (the contracting dim of most kernels)
``heads``   attention projection output (num_heads * head_dim)
``mlp``     feed-forward hidden width
``vocab``   vocabulary rows of an embedding table
``norm``    LayerNorm / RMSNorm scale and bias (replicated)
``conv_in`` input channels of a convolution kernel (after the spatial dims)
``length``  sequence positions of a learned position table / query set

Numerics follow the PyTorch originals: exact (erf) GELU, an explicit epsilon on every norm,
attention logits and softmax in float32.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

# PyTorch's nn.Linear / nn.Conv default init is kaiming-uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def param_init(init: Callable, axes: Axes) -> Callable:
    """Wraps an initializer so the created parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def gelu(x: jax.Array) -> jax.Array:
    """Exact erf GELU (torch ``nn.GELU()`` / HF ``"gelu"``); jax defaults to the tanh form."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(features: int, axes: Axes, *, name: str, use_bias: bool = True, dtype: Dtype = jnp.float32,
          kernel_init: Callable = torch_linear_init) -> nn.Dense:
    """``nn.Linear`` counterpart; ``axes`` names the kernel's (in, out) dims."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=param_init(kernel_init, axes),
                    bias_init=param_init(nn.initializers.zeros_init(), (axes[-1],)))


def layer_norm(eps: float, *, name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """LayerNorm over the last axis with an explicit epsilon (flax defaults to 1e-6, torch to 1e-5).

    Variance is torch's two-pass mean((x - mean)^2): flax's default E[x^2] - E[x]^2 cancels badly
    when |mean| >> std (SAM's mask_downscaling normalises over 4 channels: ~1e-4 relative error).
    """
    return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, use_fast_variance=False,
                        scale_init=param_init(nn.initializers.ones_init(), ("norm",)),
                        bias_init=param_init(nn.initializers.zeros_init(), ("norm",)))


def conv(features: int, kernel: int, *, name: str, stride: int = 1, padding: int = 0,
         use_bias: bool = True, dtype: Dtype = jnp.float32) -> nn.Conv:
    """``nn.Conv2d`` counterpart on NHWC inputs (kernel HWIO)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(padding, padding)] * 2, use_bias=use_bias, dtype=dtype, name=name,
                   kernel_init=param_init(torch_linear_init, (None, None, "conv_in", "embed")),
                   bias_init=param_init(nn.initializers.zeros_init(), ("embed",)))


class PatchConvTranspose(nn.Module):
    """``nn.ConvTranspose2d(kernel_size=s, stride=s, padding=0)`` on NHWC, left in patch form.

    With kernel == stride the output patches do not overlap: input pixel (i, j) alone produces the s x s
    output block at (s*i + a, s*j + b), ``x[i, j] @ W[:, a, b] + bias``. So the layer is one GEMM and
    returns ``[..., s, s, features]`` (the patch of every input pixel, not yet interleaved into the
    image grid): per-pixel layers (LayerNorm over channels, GELU, another patch conv, a per-pixel
    product) can follow in this layout and the interleave happens once, on the smallest tensor.
    On XLA:CPU the dilated convolution and the interleaving transposes of the direct form cost ~3x the
    GEMM (SAM's mask upscaling, bench/results/sam_opt.md). Parameters as ``nn.ConvTranspose`` with
    ``transpose_kernel=True``: kernel [s, s, features, in] = torch's (in, out, kh, kw) -> (2, 3, 1, 0).
    """

    features: int
    kernel: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s, c = self.kernel, x.shape[-1]
        kernel = self.param("kernel", param_init(torch_linear_init, (None, None, "embed", "conv_in")),
                            (s, s, self.features, c))
        bias = self.param("bias", param_init(nn.initializers.zeros_init(), ("embed",)), (self.features,))
        w = jnp.asarray(kernel, self.dtype).transpose(3, 0, 1, 2).reshape(c, s * s * self.features)
        y = x.astype(self.dtype).reshape(-1, c) @ w
        return y.reshape(*x.shape[:-1], s, s, self.features) + jnp.asarray(bias, self.dtype)


def interleave_patches(x: jax.Array, levels: int) -> jax.Array:
    """``[..., h, w, a1, b1, ..., a_n, b_n]`` (``levels`` = n nested :class:`PatchConvTranspose` patch
    axes, channels already contracted away) -> ``[..., h * A, w * B]``: output row
    ``(i * s_a1 + a1) * s_a2 + a2 ...``, column likewise from j, b1, b2, ..."""
    lead = x.ndim - 2 - 2 * levels
    rows = [lead, *(lead + 2 + 2 * k for k in range(levels))]
    cols = [lead + 1, *(lead + 3 + 2 * k for k in range(levels))]
    y = x.transpose(*range(lead), *rows, *cols)
    return y.reshape(*x.shape[:lead], math.prod(x.shape[r] for r in rows), math.prod(x.shape[c] for c in cols))


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[..., T, H*D] -> [..., T, H, D]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[..., T, H, D] -> [..., T, H*D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              mask: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """Softmax attention on [B, T, H, D] inputs; logits and softmax in float32.

    ``mask`` broadcasts to [B, H, Tq, Tk] (True = attend); ``bias`` is added to the logits.

    The products run on head-major copies ([B, H, T, D]): XLA:CPU ran the same einsums on the token-major
    operands 18-46 % slower (EVA, DINOv2, Q-Former cross-attention, SAM global attention shapes;
    bench/results/train_step_opt.md).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, tuple(axes))


# Rematerialisation policies of a transformer block (``remat`` field of each tower's config):
# "none" keeps every activation the backward pass needs; "full" saves only the block's inputs and
# recomputes the rest; "dots" saves matmul outputs (recomputes norms, activations, softmax);
# "dots_no_batch" saves only matmuls without batch dimensions (the projections, not attention's
# q·k / p·v einsums, whose [B, H, T, T] outputs dominate at long sequences).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def remat_block(cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """``cls`` wrapped in ``nn.remat`` with a named policy (``cls`` itself for "none").

    Lifted transforms add no scope, so parameter paths are unchanged. ``static_argnums`` count
    ``self`` as 0 and must cover every non-array argument (Python ints/bools); call the block with
    positional arguments only (``jax.checkpoint`` traces keyword arguments).
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} for {cls.__name__} unknown; known: {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)
