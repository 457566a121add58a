"""Autoregressive generation for :class:`~calico_jax.models.llama.LlamaForCausalLM`.

One prefill over the (left-padded) prompt fills a preallocated :class:`KVCache` of length
``T + max_new_tokens``; the decode loop is a single ``lax.while_loop`` (one compiled program,
no per-token Python), feeding one token per step and stopping when every row has emitted an
EOS/stop token or ``max_new_tokens`` are done. Greedy (``temperature=0``) or temperature + top-p
sampling from a seeded key.

:func:`decode` is traceable (call it inside your own ``jax.jit``, e.g. with CAM hooks that close
over traced image features); :func:`decode_loop` is its loop alone, for a model with its own prefill
(CALICO: ``Calico.prefill`` / ``Calico.decode_step``); :func:`generate` is the convenience wrapper that left-aligns the
prompt on the host, pads its length to a bucket (so prompts of similar length share one compiled
program) and jits :func:`decode`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.models.llama import Hook, KVCache, LlamaOutput


class GenerateOutput(NamedTuple):
    tokens: jax.Array         # [B, N] generated ids; pad_token_id after a row's stop token
    lengths: jax.Array        # [B] tokens generated per row, stop token included
    hidden_states: Any        # [B, N, H] or None: hidden_states[:, j] is the final-norm state whose
    #                           logits produced tokens[:, j] (for [SEG], GLaMM's [SEG] embedding)


def sample_logits(logits: jax.Array, key: jax.Array | None, temperature: float, top_p: float) -> jax.Array:
    """[B, V] fp32 logits -> [B] ids. temperature 0 = argmax; top-p keeps the smallest set of
    most likely tokens whose probability mass reaches ``top_p`` (at least one)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < top_p) | (jnp.arange(logits.shape[-1]) == 0)
        sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
        logits = jnp.take_along_axis(sorted_logits, jnp.argsort(order, axis=-1), axis=-1)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def decode(module, params, input_ids=None, attention_mask=None, *, inputs_embeds=None, max_new_tokens: int,
           stop_token_ids: tuple[int, ...] = (), pad_token_id: int = 0, temperature: float = 0.0,
           top_p: float = 1.0, rng: jax.Array | None = None, hooks: Mapping[int, Hook] | None = None,
           return_hidden: bool = False, cache_dtype: Any = None) -> GenerateOutput:
    """Prefill + while_loop decode of a :class:`~calico_jax.models.llama.LlamaForCausalLM`. The prompt
    must be LEFT-padded (all rows end at slot T-1); ``hooks`` run on the prefill only."""
    x = input_ids if inputs_embeds is None else inputs_embeds
    b, t = x.shape[:2]
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    _check_sampling(temperature, rng)
    cache = KVCache.init(module.config, b, t + max_new_tokens, cache_dtype or module.dtype)
    apply = functools.partial(module.apply, {"params": params}, last_logits_only=True)
    first = apply(input_ids, mask, inputs_embeds=inputs_embeds, cache=cache, hooks=hooks,
                  last_prompt_index=jnp.full((b,), t - 1, jnp.int32))
    return decode_loop(first, lambda tok, cache: apply(tok[:, None], jnp.ones((b, 1), bool), cache=cache),
                       max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                       temperature=temperature, top_p=top_p, rng=rng, return_hidden=return_hidden)


def _check_sampling(temperature: float, rng: jax.Array | None) -> None:
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed)")


def decode_loop(first: LlamaOutput, step: Callable[[jax.Array, KVCache], LlamaOutput], *, max_new_tokens: int,
                stop_token_ids: tuple[int, ...] = (), pad_token_id: int = 0, temperature: float = 0.0,
                top_p: float = 1.0, rng: jax.Array | None = None, return_hidden: bool = False) -> GenerateOutput:
    """The decode loop of any model with a KV cache (the LLM alone, or CALICO's ``prefill``/``decode_step``).

    ``first``: the prefill's output (last-position logits [B, 1, V], hidden states [B, T, H], the cache
    with room for ``max_new_tokens`` more slots); ``step(tokens [B], cache)`` feeds one token per row and
    returns the same for it. Traceable: one ``lax.while_loop``."""
    _check_sampling(temperature, rng)
    b = first.logits.shape[0]
    rng = jax.random.key(0) if rng is None else rng
    stop = jnp.asarray(stop_token_ids, jnp.int32)

    def pick(logits, key, done):
        tok = sample_logits(logits, key, temperature, top_p)
        tok = jnp.where(done, pad_token_id, tok)
        return tok, done | jnp.isin(tok, stop)

    rng, key = jax.random.split(rng)
    tok, done = pick(first.logits[:, -1], key, jnp.zeros((b,), bool))
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(tok)
    hidden = None
    if return_hidden:
        hidden = jnp.zeros((b, max_new_tokens, first.hidden_states.shape[-1]), first.hidden_states.dtype)
        hidden = hidden.at[:, 0].set(first.hidden_states[:, -1])
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, done, cache, tokens, hidden, lengths, rng = state
        out = step(tok, cache)
        rng, key = jax.random.split(rng)
        lengths = lengths + (~done).astype(jnp.int32)
        tok, done = pick(out.logits[:, -1], key, done)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        if hidden is not None:
            hidden = jax.lax.dynamic_update_slice(hidden, out.hidden_states[:, -1:], (0, i, 0))
        return i + 1, tok, done, out.cache, tokens, hidden, lengths, rng

    state = (jnp.asarray(1, jnp.int32), tok, done, first.cache, tokens, hidden, lengths, rng)
    _, _, _, _, tokens, hidden, lengths, _ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens, lengths, hidden)


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray | None, pad_token_id: int,
               bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's tokens to the right end (left padding) and pads the length up to a multiple
    of ``bucket``."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    n = mask.sum(1)
    t = max(int(-(-ids.shape[1] // bucket) * bucket), 1)
    out_ids = np.full((ids.shape[0], t), pad_token_id, ids.dtype)
    out_mask = np.zeros((ids.shape[0], t), bool)
    for r in range(ids.shape[0]):
        if n[r]:
            out_ids[r, t - n[r]:] = ids[r][mask[r]]
            out_mask[r, t - n[r]:] = True
    return out_ids, out_mask


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "stop_token_ids", "pad_token_id",
                                             "temperature", "top_p", "hooks", "return_hidden"))
def decode_jit(params, input_ids, attention_mask, rng, *, module, max_new_tokens, stop_token_ids,
               pad_token_id, temperature, top_p, hooks, return_hidden):
    """:func:`decode` jit-compiled, one program per static setting (:func:`generate` calls it; benchmarks time it)."""
    return decode(module, params, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                  stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, temperature=temperature,
                  top_p=top_p, rng=rng, hooks=dict(hooks) if hooks else None, return_hidden=return_hidden)


def generate(module, params, input_ids, attention_mask=None, *, max_new_tokens: int = 32,
             stop_token_ids: tuple[int, ...] | None = None, pad_token_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             hooks: Mapping[int, Hook] | None = None, return_hidden: bool = False,
             bucket: int = 64) -> GenerateOutput:
    """Host entry point: any padding side, prompt length bucketed, one jit per (bucket, settings).

    ``stop_token_ids`` defaults to the config's EOS ids; ``pad_token_id`` to the config's.
    """
    cfg = module.config
    stop = tuple(cfg.eos_token_ids) if stop_token_ids is None else tuple(stop_token_ids)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    ids, mask = left_align(np.asarray(input_ids), attention_mask, pad, bucket)
    return decode_jit(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jax.random.key(seed),
                      module=module, max_new_tokens=int(max_new_tokens), stop_token_ids=stop,
                      pad_token_id=int(pad), temperature=float(temperature), top_p=float(top_p),
                      hooks=tuple(sorted(hooks.items())) if hooks else None, return_hidden=return_hidden)
