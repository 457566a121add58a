"""Vicuna / LLaMA decoder (𝓜) in the HF ``LlamaForCausalLM`` layout, with LoRA, CAM hook points and
a preallocated KV cache.

Block (pre-norm): ``h = x + o_proj(attn(RMSNorm_in(x)))``, ``out = h + down(silu(gate(n)) * up(n))``
with ``n = RMSNorm_post(h)``. RoPE is HF's rotate_half form (dims i and i + d/2 paired), so HF
weights load with only a transpose. Grouped-query attention shares each k/v head between
``num_attention_heads / num_key_value_heads`` consecutive query heads (HF ``repeat_kv``).

Hook points (CALICO's CAM, inserted before decoder layers 11 and 22): ``hooks={l: fn}`` calls
``fn(hidden, last_prompt_index) -> hidden`` on the hidden states T^l entering layer ``l``. The
caller applies them on prefill only; the KV cache then carries the change into decoding.

Module names mirror the HF state dict (``model.layers.3.self_attn.q_proj.weight`` ->
``model/layers_3/self_attn/q_proj/kernel``; RMSNorm ``weight`` -> ``scale``). With ``scan_layers`` the decoder
runs as ``nn.scan`` segments cut at ``scan_splits`` (hooks may only sit at a segment start), params
``model/scan_{a}_{b}/...`` with a leading layer axis (:mod:`calico_jax.models.scan`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.config import Config, ConfigError, hf_get
from calico_jax.models import layers, scan
from calico_jax.models.llama_attention import apply_rope, grouped_attention, rope_tables
from calico_jax.models.lora import LoraConfig, LoraDense

Hook = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LlamaConfig(Config):
    """Defaults: Vicuna-7B v1.5 (GLaMM's LLM) at the base 32000 vocabulary."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # HF rope_type "linear": positions divided by this factor
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    lora: LoraConfig | None = None
    remat: str = "none"   # decoder-layer rematerialisation policy (layers.REMAT_POLICIES)
    scan_layers: bool = False           # run the decoder as nn.scan segments (models/scan.py)
    scan_splits: tuple[int, ...] = ()   # with scan_layers: layers that start a new segment (where hooks go)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if any(not 0 <= s < self.num_hidden_layers for s in self.scan_splits):
            raise ConfigError(f"scan_splits {self.scan_splits} outside 0..{self.num_hidden_layers - 1}")

    def segments(self) -> tuple[tuple[int, int], ...]:
        """``[start, stop)`` of the decoder's scanned segments (one per layer-run between splits)."""
        return scan.segments(self.num_hidden_layers, self.scan_splits)

    def scan_stacks(self, prefix: tuple[str, ...] = ()) -> list[scan.Stack]:
        """The decoder stack (:func:`calico_jax.models.scan.stack_layers`) when ``scan_layers``."""
        if not self.scan_layers:
            return []
        return [scan.Stack((*prefix, "model"), "layers_", self.num_hidden_layers, self.scan_splits)]

    @classmethod
    def from_hf_config(cls, cfg: Any, lora: LoraConfig | None = None) -> LlamaConfig:
        """From a transformers ``LlamaConfig`` or its config.json dict (4.x ``rope_theta``/``rope_scaling``
        or 5.x ``rope_parameters``)."""
        hidden, heads = hf_get(cfg, "hidden_size"), hf_get(cfg, "num_attention_heads")
        rope = hf_get(cfg, "rope_parameters", None) or hf_get(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default' and 'linear')")
        theta = rope.get("rope_theta", None) or hf_get(cfg, "rope_theta", None) or 10000.0
        eos = hf_get(cfg, "eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        act = hf_get(cfg, "hidden_act", "silu")
        if act not in layers.ACTIVATIONS:
            raise ConfigError(f"hidden_act {act!r} is not supported; known: {sorted(layers.ACTIVATIONS)}")
        pad = hf_get(cfg, "pad_token_id", None)
        return cls(
            vocab_size=hf_get(cfg, "vocab_size"), hidden_size=hidden,
            intermediate_size=hf_get(cfg, "intermediate_size"),
            num_hidden_layers=hf_get(cfg, "num_hidden_layers"), num_attention_heads=heads,
            num_key_value_heads=hf_get(cfg, "num_key_value_heads", None) or heads,
            head_dim=hf_get(cfg, "head_dim", None) or hidden // heads, hidden_act=act,
            max_position_embeddings=hf_get(cfg, "max_position_embeddings", 2048),
            rms_norm_eps=float(hf_get(cfg, "rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_linear_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
            attention_bias=bool(hf_get(cfg, "attention_bias", False)),
            mlp_bias=bool(hf_get(cfg, "mlp_bias", False)),
            tie_word_embeddings=bool(hf_get(cfg, "tie_word_embeddings", False)),
            bos_token_id=hf_get(cfg, "bos_token_id", 1) if hf_get(cfg, "bos_token_id", 1) is not None else 1,
            eos_token_ids=eos, pad_token_id=0 if pad is None else int(pad), lora=lora)

    def hf_dict(self) -> dict[str, Any]:
        """transformers ``LlamaConfig`` kwargs for the same architecture (the torch reference)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_linear_factor != 1.0:
            rope = {"rope_type": "linear", "rope_theta": self.rope_theta, "factor": self.rope_linear_factor}
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                    num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                    head_dim=self.head_dim, hidden_act=self.hidden_act,
                    max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                    rope_parameters=rope, attention_bias=self.attention_bias, mlp_bias=self.mlp_bias,
                    tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                    eos_token_id=list(self.eos_token_ids), pad_token_id=self.pad_token_id)


class KVCache(NamedTuple):
    """Preallocated keys/values of every layer (post-RoPE) plus which slots hold real tokens.

    Head-major, with v's slot axis last: row ``b * KV + h`` of layer l, ``k[l][b*KV+h]`` [S, D] and
    ``v[l][b*KV+h]`` [D, S], are the row-major operands of the two attention matrix-vector products of a
    decode step, so XLA reads them in place instead of transposing the whole cache every layer and step
    (which cost a quarter of the decode step with a [L, B, S, KV, D] layout). One buffer per layer, with
    batch and head merged: a layer slice of a stacked [L, ...] buffer, or a degenerate batch axis
    dropped between the in-place write and the attention products, made XLA:CPU copy the layer's
    cache on every step (bench/results/llm_opt.md). With ``scan_layers`` the scan needs the layers stacked:
    one buffer per scanned segment, ``k[j]`` [n_j, B*KV, S, D] and ``v[j]`` [n_j, B*KV, D, S] for segment j
    of ``config.segments()`` (scan xs in, ys out).
    """

    k: tuple[jax.Array, ...]   # L x [B*KV, S, D]   (scan_layers: segments x [n_j, B*KV, S, D])
    v: tuple[jax.Array, ...]   # L x [B*KV, D, S]   (scan_layers: segments x [n_j, B*KV, D, S])
    valid: jax.Array           # [B, S] bool: slot written and not padding
    index: jax.Array           # [] int32: next slot to write

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
        n, kv, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        if config.scan_layers:
            segs = config.segments()
            return cls(tuple(jnp.zeros((b - a, batch * kv, length, d), dtype) for a, b in segs),
                       tuple(jnp.zeros((b - a, batch * kv, d, length), dtype) for a, b in segs),
                       jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))
        return cls(tuple(jnp.zeros((batch * kv, length, d), dtype) for _ in range(n)),
                   tuple(jnp.zeros((batch * kv, d, length), dtype) for _ in range(n)),
                   jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


class LlamaOutput(NamedTuple):
    logits: jax.Array         # [B, T, V] float32 (or [B, 1, V] with last_logits_only)
    hidden_states: jax.Array  # [B, T, H] after the final RMSNorm (the tensor fed to lm_head)
    cache: KVCache | None


class RMSNorm(nn.Module):
    """``LlamaRMSNorm``: normalise in fp32, cast back, then scale (no ``1 + w``)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("scale", layers.param_init(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * x32.astype(self.dtype)


def _tokens_2d(x: jax.Array) -> jax.Array:
    """[B, T, F] -> [B*T, F] for the projections. With two token axes, XLA:CPU feeds each weight-gradient
    GEMM (contracting over B and T) from a transposed copy that recomputes the activation's backward at
    a stride of F (13-14 % of a training step). With one token axis it reads the operands as they are."""
    return x.reshape(-1, x.shape[-1])


def _lora_for(config: LlamaConfig, name: str) -> LoraConfig | None:
    return config.lora if config.lora is not None and name in config.lora.target_modules else None


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        proj = lambda name, feats, axes: LoraDense(feats, axes, use_bias=c.attention_bias,  # noqa: E731
                                                   lora=_lora_for(c, name), dtype=self.dtype)
        self.q_proj = proj("q_proj", c.num_attention_heads * c.head_dim, ("embed", "heads"))
        self.k_proj = proj("k_proj", c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"))
        self.v_proj = proj("v_proj", c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"))
        self.o_proj = proj("o_proj", c.hidden_size, ("heads", "embed"))

    def __call__(self, x, cos, sin, mask, cache: tuple | None, deterministic: bool = True):
        """``cache=(k [B*KV,S,D], v [B*KV,D,S], index)`` (this layer's :class:`KVCache` buffers): writes
        this step's k/v at ``index`` and attends over all S slots; without a cache attends over the T current tokens."""
        c = self.config
        b, t = x.shape[:2]
        x = _tokens_2d(x)
        q = self.q_proj(x, deterministic).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x, deterministic).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x, deterministic).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o_proj = lambda out: self.o_proj(_tokens_2d(out), deterministic).reshape(b, t, -1)  # noqa: E731
        if cache is not None:
            k_cache, v_cache, index = cache
            k_new = k.transpose(0, 2, 1, 3).reshape(-1, t, c.head_dim).astype(k_cache.dtype)   # [B*KV, T, D]
            v_new = v.transpose(0, 2, 3, 1).reshape(-1, c.head_dim, t).astype(v_cache.dtype)   # [B*KV, D, T]
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, (0, index, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, (0, 0, index))
            out = grouped_attention(q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), mask,
                                    cache_layout=True)
            return o_proj(out), (k_cache, v_cache)
        return o_proj(grouped_attention(q, k, v, mask)), cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = self.config
        dense = lambda name, feats, axes: LoraDense(feats, axes, use_bias=c.mlp_bias,  # noqa: E731
                                                    lora=_lora_for(c, name), dtype=self.dtype, name=name)
        shape, x = x.shape, _tokens_2d(x)
        gate = dense("gate_proj", c.intermediate_size, ("embed", "mlp"))(x, deterministic)
        up = dense("up_proj", c.intermediate_size, ("embed", "mlp"))(x, deterministic)
        h = layers.activation(c.hidden_act)(gate) * up
        return dense("down_proj", c.hidden_size, ("mlp", "embed"))(h, deterministic).reshape(shape)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps, self.dtype)
        self.self_attn = LlamaAttention(c, self.dtype)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, self.dtype)
        self.mlp = LlamaMLP(c, self.dtype)

    def __call__(self, x, cos, sin, mask, cache=None, deterministic: bool = True):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, deterministic)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), deterministic)
        return layers.constrain(x, ("batch", "length", "embed")), cache


class ScannedDecoderLayer(LlamaDecoderLayer):
    """The same layer in ``nn.scan``'s form: ``(x, kv, cos, sin, mask, index, deterministic) -> (x, kv)`` with
    ``kv`` = this layer's (k, v) cache buffers (the scanned slice) or None."""

    def __call__(self, x, kv, cos, sin, mask, index, deterministic):
        cache = None if kv is None else (kv[0], kv[1], index)
        x, new = super().__call__(x, cos, sin, mask, cache, deterministic)
        return x, (None if kv is None else new)


def last_token_index(mask: jax.Array) -> jax.Array:
    """[B, T] mask -> [B] index of the last attended position (T-1 under left padding)."""
    t = mask.shape[1]
    return (t - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


def padded_positions(mask: jax.Array) -> jax.Array:
    """Positions that skip padding (HF generate's ``cumsum(mask) - 1``; padding slots get 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class LlamaModel(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype,
            embedding_init=layers.param_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        if c.scan_layers:   # scan_{a}_{b}: kv per layer (xs), the rest broadcast; 7: deterministic
            self.scan = {f"{a}_{b}": scan.scanned(ScannedDecoderLayer, length=b - a, remat=c.remat,
                                                  in_axes=(0,) + (nn.broadcast,) * 5, static_argnums=(7,))(
                c, self.dtype) for a, b in c.segments()}
        else:
            block = layers.remat_block(LlamaDecoderLayer, c.remat, static_argnums=(6,))   # 6: deterministic
            self.layers = [block(c, self.dtype) for _ in range(c.num_hidden_layers)]  # layers_0..
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

    def __call__(self, input_ids=None, attention_mask=None, positions=None, *, inputs_embeds=None,
                 cache: KVCache | None = None, hooks: Mapping[int, Hook] | None = None,
                 last_prompt_index=None, deterministic: bool = True):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        rows = None   # a bound on the positions, when they are ours: < t, or < the cache's length
        if positions is None:
            offset = 0 if cache is None else jnp.sum(cache.valid, axis=1, keepdims=True)
            positions = padded_positions(mask) + offset
            rows = t if cache is None else cache.valid.shape[1]
        cos, sin = rope_tables(self.config, positions, self.dtype, rows)
        if cache is None:
            key_valid, k_slot, q_slot = mask, jnp.arange(t), jnp.arange(t)
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
            k_slot, q_slot = jnp.arange(cache.valid.shape[1]), cache.index + jnp.arange(t)
        attn_mask = key_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])
        if hooks and last_prompt_index is None:
            last_prompt_index = last_token_index(mask)
        if self.config.scan_layers:
            x, new_cache = self._scanned(x, cos, sin, attn_mask, cache, hooks, last_prompt_index, deterministic)
            if cache is not None:
                new_cache = KVCache(*new_cache, key_valid, cache.index + t)
            return self.norm(x), new_cache
        new_k, new_v = [], []   # this step's per-layer cache buffers
        for i, layer in enumerate(self.layers):
            if hooks and i in hooks:
                x = hooks[i](x, last_prompt_index).astype(self.dtype)  # T^i -> CAM(T^i)
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.index)
            x, new = layer(x, cos, sin, attn_mask, layer_cache, deterministic)
            if cache is not None:
                new_k.append(new[0])
                new_v.append(new[1])
        new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), key_valid, cache.index + t)
        return self.norm(x), new_cache

    def _scanned(self, x, cos, sin, attn_mask, cache, hooks, last_prompt_index, deterministic):
        """The decoder as scanned segments; hooks run between them. -> (x, (k, v) per segment or None)."""
        segs = self.config.segments()
        bad = sorted(set(hooks or ()) - {a for a, _ in segs})
        if bad:
            raise ValueError(f"hooks at layers {bad} fall inside a scanned segment; add them to "
                             f"LlamaConfig.scan_splits (now {self.config.scan_splits}) or set scan_layers=False")
        new_k, new_v = [], []
        for j, (a, b) in enumerate(segs):
            if hooks and a in hooks:
                x = hooks[a](x, last_prompt_index).astype(self.dtype)  # T^a -> CAM(T^a)
            kv = None if cache is None else (cache.k[j], cache.v[j])
            x, kv = self.scan[f"{a}_{b}"](x, kv, cos, sin, attn_mask, None if cache is None else cache.index,
                                          deterministic)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return x, (None if cache is None else (tuple(new_k), tuple(new_v)))


class LlamaForCausalLM(nn.Module):
    """𝓜: ``__call__`` returns :class:`LlamaOutput` (fp32 logits, final-norm hidden states, cache)."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.model = LlamaModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                                    kernel_init=layers.param_init(layers.torch_linear_init, ("embed", "vocab")))

    def __call__(self, input_ids=None, attention_mask=None, positions=None, *, inputs_embeds=None,
                 cache: KVCache | None = None, hooks: Mapping[int, Hook] | None = None,
                 last_prompt_index=None, last_logits_only: bool = False, deterministic: bool = True):
        """input_ids [B, T] (or inputs_embeds [B, T, H]); attention_mask [B, T] (1 = token, left or right
        padding); positions default to ``cumsum(mask) - 1`` continued from the cache."""
        hidden, cache = self.model(input_ids, attention_mask, positions, inputs_embeds=inputs_embeds,
                                   cache=cache, hooks=hooks, last_prompt_index=last_prompt_index,
                                   deterministic=deterministic)
        h = hidden[:, -1:] if last_logits_only else hidden
        logits = self.model.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return LlamaOutput(logits.astype(jnp.float32), hidden, cache)

    @staticmethod
    def output_kernel(config: LlamaConfig, params: Mapping[str, Any]) -> jax.Array:
        """The [H, V] matrix ``__call__`` maps hidden states to logits with, read from this module's params
        (the transposed token table when ``tie_word_embeddings``): for losses that fuse it with the CE."""
        if config.tie_word_embeddings:
            return params["model"]["embed_tokens"]["embedding"].T
        return params["lm_head"]["kernel"]

    def embed(self, input_ids):
        """Token embeddings (for splicing image features into ``inputs_embeds``)."""
        return self.model.embed_tokens(input_ids)

    def dummy_inputs(self) -> dict:
        return {"input_ids": jnp.zeros((1, 4), jnp.int32)}

