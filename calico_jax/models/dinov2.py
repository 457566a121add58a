"""DINOv2 ViT-S/B/L/g (+ registers, SwiGLU): the frozen semantic encoder 𝓔 of CALICO's CEM.

𝓔 maps an image to X_semantic = ``layernorm(ViT(image))``: CLS, then the register tokens, then the
patch tokens, ``[B, 1 + R + (H/p)(W/p), D]`` (Eq. 5). Parameter names mirror HF's on-disk (legacy)
``Dinov2Model`` / ``Dinov2WithRegistersModel`` names (``embeddings.*``,
``encoder.layer.N.attention.attention.{query,key,value}``, ``attention.output.dense``,
``layer_scale{1,2}.lambda1``, ``mlp.fc1/fc2`` or SwiGLU ``mlp.weights_in/weights_out``,
``layernorm``), so the generic rule in ``convert.mapping`` maps every tensor.

Numerics (both references: HF ``Dinov2Model`` and facebookresearch ``DinoVisionTransformer``):

* pre-LN blocks with layer-scale: ``x += γ1 · attn(LN1(x)); x += γ2 · ffn(LN2(x))``, LN eps 1e-6,
  exact GELU; SwiGLU FFN ``w3(silu(x1) · x2)`` with ``x1, x2 = chunk(w12(x), 2)`` and hidden size
  ``(int(int(D · mlp_ratio) · 2/3) + 7) // 8 * 8`` (4096 for ViT-g);
* registers are inserted *after* the position embedding is added;
* the position table is learned for ``image_size``. Both references skip interpolation iff the patch
  count equals the table's and the input is square in *pixels* (H == W); otherwise the patch part is
  bicubically resized (torch a=-0.75, in fp32, CLS entry kept), as selected by ``interpolation``:

  - ``"hf"``: ``size=(H//p, W//p)``; antialias = ``interpolate_antialias`` (False for
    ``Dinov2Model``, True for ``Dinov2WithRegistersModel``);
  - ``"original"`` (facebookresearch): ``scale_factor=((H//p + off)/M, (W//p + off)/M)`` when the
    offset ``interpolate_offset`` is non-zero (hub default 0.1), else ``size=``; antialias flag
    ``interpolate_antialias``. The *_reg hub models (offset 0, antialias) equal HF registers exactly;
    the plain hub models differ from HF ``Dinov2Model`` off the native size (1.9e-2 at 224 vs 518).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError, hf_get
from calico_jax.core.resize import resize_2d
from calico_jax.models import layers, scan

INTERPOLATIONS = ("hf", "original")

# DinoVisionTransformer sizes (dinov2/models/vision_transformer.py: vit_small .. vit_giant2).
_ARCHS = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}


def _preset(size: str, reg: bool) -> dict[str, Any]:
    embed_dim, depth, heads = _ARCHS[size]
    # dinov2/hub/backbones.py::_make_dinov2_model defaults (differ from the constructor's own).
    args = dict(img_size=518, patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=4,
                init_values=1.0, ffn_layer="swiglufused" if size == "g" else "mlp", block_chunks=0,
                num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
    if reg:
        args.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    return args


# torch-hub entry points -> DinoVisionTransformer constructor arguments.
PRESETS: dict[str, dict[str, Any]] = {
    f"dinov2_vit{s}14{'_reg' if reg else ''}": _preset(s, reg) for s in _ARCHS for reg in (False, True)}

# DinoVisionTransformer.__init__ defaults (used for arguments a JSON config leaves out).
_ORIGINAL_DEFAULTS: dict[str, Any] = dict(
    img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
    qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.0, drop_path_uniform=False, init_values=None,
    ffn_layer="mlp", block_chunks=1, num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"Dinov2Config: only square {name} is supported, got {value!r}")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"Dinov2Config: {name} must be an int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Dinov2Config(Config):
    """Defaults: the torch-hub ``dinov2_vitg14`` (1536 wide, 40 blocks, 24 heads, SwiGLU, 518 px)."""

    image_size: int = 518
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1536
    num_hidden_layers: int = 40
    num_attention_heads: int = 24
    mlp_ratio: float = 4.0
    use_swiglu_ffn: bool = True
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    use_layer_scale: bool = True       # original init_values=None/0 -> no ls1/ls2 (HF always has them)
    layerscale_value: float = 1.0      # init value only
    num_register_tokens: int = 0
    layer_norm_eps: float = 1e-6
    interpolation: str = "original"    # "hf" | "original" (see module docstring)
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1    # "original" only
    remat: str = "none"                 # block rematerialisation policy (layers.REMAT_POLICIES)
    scan_layers: bool = False           # blocks as one nn.scan (encoder/scan_0_N, models/scan.py)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"Dinov2Config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"Dinov2Config: interpolation must be one of {INTERPOLATIONS}, "
                              f"got {self.interpolation!r}")
        if self.num_register_tokens < 0:
            raise ConfigError(f"Dinov2Config: num_register_tokens must be >= 0, got {self.num_register_tokens}")
        layers.activation(self.hidden_act)  # raises on an unknown name

    def scan_stacks(self, prefix: tuple[str, ...] = ()) -> list[scan.Stack]:
        """The block stack (:func:`calico_jax.models.scan.stack_layers`) when ``scan_layers``."""
        return [scan.Stack((*prefix, "encoder"), "layer_", self.num_hidden_layers)] if self.scan_layers else []

    @property
    def grid(self) -> int:
        """Side M of the native patch grid the position table was learned for."""
        return self.image_size // self.patch_size

    @property
    def ffn_hidden_size(self) -> int:
        """MLP hidden width; SwiGLU keeps 2/3 of it rounded up to a multiple of 8 (SwiGLUFFNFused)."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden

    @classmethod
    def from_hf_config(cls, cfg: Any) -> Dinov2Config:
        """From a ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` (object or config.json dict).

        HF's ``interpolate_pos_encoding`` semantics: ``size=``, antialias only for the registers class.
        """
        model_type = hf_get(cfg, "model_type", "dinov2")
        if model_type not in ("dinov2", "dinov2_with_registers"):
            raise ConfigError(f"config.json: model_type {model_type!r} is not dinov2 / dinov2_with_registers")
        reg = model_type == "dinov2_with_registers"
        head_dim = hf_get(cfg, "head_dim", None)
        hidden, heads = hf_get(cfg, "hidden_size", 768), hf_get(cfg, "num_attention_heads", 12)
        if head_dim is not None and head_dim * heads != hidden:
            raise ConfigError(f"config.json: head_dim {head_dim} * heads {heads} != hidden_size {hidden}")
        return cls(image_size=_square(hf_get(cfg, "image_size", 224), "image_size"),
                   patch_size=_square(hf_get(cfg, "patch_size", 16 if reg else 14), "patch_size"),
                   num_channels=hf_get(cfg, "num_channels", 3), hidden_size=hidden,
                   num_hidden_layers=hf_get(cfg, "num_hidden_layers", 12), num_attention_heads=heads,
                   mlp_ratio=float(hf_get(cfg, "mlp_ratio", 4)), use_swiglu_ffn=hf_get(cfg, "use_swiglu_ffn", False),
                   hidden_act=hf_get(cfg, "hidden_act", "gelu"), qkv_bias=hf_get(cfg, "qkv_bias", True),
                   layerscale_value=float(hf_get(cfg, "layerscale_value", 1.0)),
                   num_register_tokens=hf_get(cfg, "num_register_tokens", 4) if reg else 0,
                   layer_norm_eps=float(hf_get(cfg, "layer_norm_eps", 1e-6)), interpolation="hf",
                   interpolate_antialias=reg, interpolate_offset=0.0)

    @classmethod
    def from_original(cls, **kwargs: Any) -> Dinov2Config:
        """From ``DinoVisionTransformer(**kwargs)`` constructor arguments (its own defaults for the rest;
        note the torch-hub builders pass other defaults -- see :data:`PRESETS`)."""
        unknown = sorted(set(kwargs) - set(_ORIGINAL_DEFAULTS))
        if unknown:
            raise ConfigError(f"DinoVisionTransformer: unknown argument(s) {unknown}; "
                              f"known: {sorted(_ORIGINAL_DEFAULTS)}")
        a = {**_ORIGINAL_DEFAULTS, **kwargs}
        if a["ffn_layer"] not in ("mlp", "swiglu", "swiglufused"):
            raise ConfigError(f"DinoVisionTransformer: ffn_layer {a['ffn_layer']!r} is not supported "
                              "(mlp, swiglu, swiglufused)")
        init_values = a["init_values"]
        return cls(image_size=_square(a["img_size"], "img_size"), patch_size=_square(a["patch_size"], "patch_size"),
                   num_channels=a["in_chans"], hidden_size=a["embed_dim"], num_hidden_layers=a["depth"],
                   num_attention_heads=a["num_heads"], mlp_ratio=float(a["mlp_ratio"]),
                   use_swiglu_ffn=a["ffn_layer"] != "mlp", qkv_bias=a["qkv_bias"], proj_bias=a["proj_bias"],
                   ffn_bias=a["ffn_bias"], use_layer_scale=bool(init_values),
                   layerscale_value=float(init_values) if init_values else 1.0,
                   num_register_tokens=a["num_register_tokens"], interpolation="original",
                   interpolate_antialias=bool(a["interpolate_antialias"]),
                   interpolate_offset=float(a["interpolate_offset"]))

    @classmethod
    def from_preset(cls, name: str) -> Dinov2Config:
        if name not in PRESETS:
            raise ConfigError(f"unknown DINOv2 preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_original(**PRESETS[name])


def interpolate_pos_encoding(pos: jax.Array, height: int, width: int, cfg: Dinov2Config) -> jax.Array:
    """The position table ``[1, 1 + M², D]`` for a ``height`` x ``width`` pixel input (see module doc)."""
    n = pos.shape[1] - 1
    gh, gw = height // cfg.patch_size, width // cfg.patch_size
    if gh * gw == n and height == width:  # both references compare the count and the *pixel* sides
        return pos
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table of {n} patches is not a square grid")
    scale = None
    if cfg.interpolation == "original" and cfg.interpolate_offset:
        # Historical DINO offset: torch then maps output i to source (i + 0.5) * M / (g + off) - 0.5.
        scale = ((gh + cfg.interpolate_offset) / m, (gw + cfg.interpolate_offset) / m)
    patch = pos[:, 1:].reshape(1, m, m, pos.shape[-1])
    patch = resize_2d(patch, (gh, gw), mode="bicubic", antialias=cfg.interpolate_antialias, scale_factor=scale)
    return jnp.concatenate([pos[:, :1], patch.reshape(1, gh * gw, -1).astype(pos.dtype)], axis=1)


class Dinov2PatchEmbeddings(nn.Module):
    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        p = self.config.patch_size
        x = layers.conv(self.config.hidden_size, p, stride=p, name="projection", dtype=self.dtype)(
            pixel_values.astype(self.dtype))
        return x.reshape(x.shape[0], -1, x.shape[-1])  # row-major patches, as torch's flatten(2)


class Dinov2Embeddings(nn.Module):
    """Patch conv, optional mask tokens, CLS, (interpolated) position table, then registers."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        d = cfg.hidden_size
        normal = nn.initializers.normal(0.02)
        cls_token = self.param("cls_token", layers.param_init(normal, (None, None, "embed")), (1, 1, d))
        mask_token = self.param("mask_token", layers.param_init(nn.initializers.zeros_init(), (None, "embed")), (1, d))
        pos = self.param("position_embeddings", layers.param_init(normal, (None, "length", "embed")),
                         (1, cfg.grid ** 2 + 1, d))
        x = Dinov2PatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(pixel_values)
        b = x.shape[0]
        if bool_masked_pos is not None:
            x = jnp.where(bool_masked_pos[..., None], mask_token.astype(x.dtype)[None], x)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (b, 1, d)), x], axis=1)
        x = x + interpolate_pos_encoding(pos, pixel_values.shape[1], pixel_values.shape[2], cfg).astype(x.dtype)
        if cfg.num_register_tokens:
            reg = self.param("register_tokens", layers.param_init(normal, (None, "length", "embed")),
                             (1, cfg.num_register_tokens, d))
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg.astype(x.dtype), (b, *reg.shape[1:])), x[:, 1:]], 1)
        return x


class Dinov2SelfAttention(nn.Module):
    """Separate query/key/value projections (HF legacy ``attention.attention``); returns the merged context."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        qkv = [layers.split_heads(layers.dense(cfg.hidden_size, ("embed", "heads"), name=n, use_bias=cfg.qkv_bias,
                                               dtype=self.dtype)(x), cfg.num_attention_heads)
               for n in ("query", "key", "value")]
        return layers.merge_heads(layers.attention(*qkv))


class Dinov2SelfOutput(nn.Module):
    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.dense(self.config.hidden_size, ("heads", "embed"), name="dense", use_bias=self.config.proj_bias,
                            dtype=self.dtype)(x)


class Dinov2Attention(nn.Module):
    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dinov2SelfAttention(self.config, self.dtype, name="attention")(x)
        return Dinov2SelfOutput(self.config, self.dtype, name="output")(x)


class Dinov2LayerScale(nn.Module):
    """γ ⊙ x (original ``ls{1,2}.gamma``, HF ``layer_scale{1,2}.lambda1``)."""

    config: Dinov2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.constant(self.config.layerscale_value)
        return x * self.param("lambda1", layers.param_init(init, ("norm",)), (self.config.hidden_size,)).astype(x.dtype)


class Dinov2Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``, or SwiGLU ``weights_out(silu(x1) * x2)`` with ``x1|x2 = weights_in(x)``."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h, bias = cfg.ffn_hidden_size, cfg.ffn_bias
        if cfg.use_swiglu_ffn:
            x1, x2 = jnp.split(layers.dense(2 * h, ("embed", "mlp"), name="weights_in", use_bias=bias,
                                            dtype=self.dtype)(x), 2, axis=-1)
            return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="weights_out", use_bias=bias,
                                dtype=self.dtype)(jax.nn.silu(x1) * x2)
        x = layers.dense(h, ("embed", "mlp"), name="fc1", use_bias=bias, dtype=self.dtype)(x)
        x = layers.activation(cfg.hidden_act)(x)
        return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", use_bias=bias, dtype=self.dtype)(x)


class Dinov2Layer(nn.Module):
    """Pre-LN block with layer-scale (original ``Block``)."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config

        def scaled(y: jax.Array, i: int) -> jax.Array:
            return Dinov2LayerScale(cfg, name=f"layer_scale{i}")(y) if cfg.use_layer_scale else y

        y = Dinov2Attention(cfg, self.dtype, name="attention")(
            layers.layer_norm(cfg.layer_norm_eps, name="norm1", dtype=self.dtype)(x))
        x = x + scaled(y, 1)
        y = Dinov2Mlp(cfg, self.dtype, name="mlp")(layers.layer_norm(cfg.layer_norm_eps, name="norm2",
                                                                     dtype=self.dtype)(x))
        return x + scaled(y, 2)


class ScannedDinov2Layer(Dinov2Layer):
    """:class:`Dinov2Layer` in ``nn.scan``'s form: carry -> (carry, the layer's output as ys)."""

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = super().__call__(x)
        return x, x


class Dinov2Encoder(nn.Module):
    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """All hidden states: the embeddings, then each layer's output (pre-``layernorm``), as HF."""
        n = self.config.num_hidden_layers
        if self.config.scan_layers:
            stack = scan.scanned(ScannedDinov2Layer, length=n, remat=self.config.remat, in_axes=())
            _, ys = stack(self.config, self.dtype, name=scan.segment_name(0, n))(x)
            return [x, *(ys[i] for i in range(n))]
        states = [x]
        for i in range(self.config.num_hidden_layers):
            block = layers.remat_block(Dinov2Layer, self.config.remat)
            states.append(block(self.config, self.dtype, name=f"layer_{i}")(states[-1]))
        return states


class Dinov2(nn.Module):
    """𝓔: NHWC pixels ``[B, H, W, C]`` -> ``{"last_hidden_state": X_semantic [B, 1+R+N, D],
    "pooler_output": CLS [B, D]}`` (both after ``layernorm``), plus ``"hidden_states"`` (embeddings
    and every layer's output, before ``layernorm``; ``hidden_states[i]`` is layer i's output) when
    ``output_hidden_states``. ``bool_masked_pos [B, N]`` replaces patch tokens by the mask token.
    """

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None,
                 output_hidden_states: bool = False) -> dict[str, Any]:
        x = Dinov2Embeddings(self.config, self.dtype, name="embeddings")(pixel_values, bool_masked_pos)
        states = Dinov2Encoder(self.config, self.dtype, name="encoder")(x)
        x = layers.layer_norm(self.config.layer_norm_eps, name="layernorm", dtype=self.dtype)(states[-1])
        out: dict[str, Any] = {"last_hidden_state": x, "pooler_output": x[:, 0]}
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out

    def dummy_inputs(self) -> dict[str, jax.Array]:
        s = self.config.image_size
        return {"pixel_values": jnp.zeros((1, s, s, self.config.num_channels), jnp.float32)}
