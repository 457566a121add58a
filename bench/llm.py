"""LLaMA items: prefill, one KV-cache decode step, end-to-end greedy generation, and a training step."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import (
    Result,
    alternate,
    ceiling_note,
    compile_with_flops,
    gemm_only_ms,
    side_by_side,
    training_shapes,
)
from calico_jax.checkpoints import converted as pretrained
from calico_jax.inference.generate import decode_jit
from calico_jax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from calico_jax.train.losses import causal_lm_loss_from_hidden

PROMPT, NEW, CONTEXT = 256, 64, 300
HF_KW = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, max_position_embeddings=1024, tie_word_embeddings=False)


@functools.lru_cache(maxsize=1)
def _models():
    """The ~134M-parameter LLaMA of the suite in both frameworks, with the same weights."""
    import torch  # the PyTorch reference: optional heavy dependencies, imported by the items that run
    import transformers

    hf_cfg = transformers.LlamaConfig(**HF_KW)
    hf_cfg._attn_implementation = "sdpa"
    with torch.inference_mode(False):  # train_step needs ordinary (autograd-capable) parameters
        ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    module = LlamaForCausalLM(LlamaConfig.from_hf_config(hf_cfg))
    params = pretrained.init_params(module)
    sd = ref.state_dict()
    params = jax.tree_util.tree_map_with_path(lambda p, _: _torch_value(sd, p), params)
    return ref, module, params


def _torch_value(sd, path):
    """Our param path -> the HF tensor (Linear transposed), so both sides run the same weights."""
    names = [k.key for k in path]
    key = ".".join(n.replace("layers_", "layers.") for n in names[:-1])
    leaf = names[-1]
    t = sd[f"{key}.weight"].float().numpy()
    return jnp.asarray(t.T if leaf == "kernel" else t)


def _weight_bytes(params, module) -> float:
    """Bytes one decode step must read: every weight except the embedding table (one row is gathered)."""
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    emb = params["model"]["embed_tokens"]["embedding"]
    return float(total - emb.size * emb.dtype.itemsize + emb.shape[1] * emb.dtype.itemsize)


def _ids(n, batch=1, seed=0):
    return np.random.default_rng(seed).integers(3, HF_KW["vocab_size"], (batch, n)).astype(np.int32)


def _gemm_shapes(tokens: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count) of every weight product of one forward over ``tokens`` tokens."""
    h, f, n = HF_KW["hidden_size"], HF_KW["intermediate_size"], HF_KW["num_hidden_layers"]
    return [(tokens, h, h, 4 * n), (tokens, h, f, 2 * n), (tokens, f, h, n), (tokens, h, HF_KW["vocab_size"], 1)]


def llama_prefill(ctx) -> Result:
    import torch
    ref, module, params = _models()
    ids = _ids(PROMPT)
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)
    return side_by_side("llama_prefill", fn, (params, jnp.asarray(ids)),
                        lambda: ref(input_ids=torch.from_numpy(ids).long()).logits,
                        peak_gflops=ctx.peak_gflops, bandwidth_gbs=ctx.bandwidth_gbs, repeats=ctx.repeats,
                        budget_s=ctx.budget_s, note=ceiling_note(_gemm_shapes(PROMPT), ctx.peak_gflops))


def llama_decode(ctx) -> Result:
    """One greedy step at context ~300: JAX with a preallocated, donated KV cache (as inside generation);
    torch with its DynamicCache."""
    import torch

    ref, module, params = _models()
    ids = _ids(CONTEXT)
    cache = KVCache.init(module.config, 1, CONTEXT + 64)
    prefill = jax.jit(lambda p, x, c: module.apply({"params": p}, x, cache=c, last_logits_only=True))
    state = {"cache": prefill(params, jnp.asarray(ids), cache).cache}
    step = jax.jit(lambda p, t, c: module.apply({"params": p}, t, jnp.ones((1, 1), bool), cache=c,
                                                last_logits_only=True)[::2], donate_argnums=2)
    tok = jnp.asarray([[5]], jnp.int32)
    compiled, flops, compile_s = compile_with_flops(step, params, tok, state["cache"])

    def run_jax():
        logits, state["cache"] = compiled(params, tok, state["cache"])
        logits.block_until_ready()

    out = ref(input_ids=torch.from_numpy(ids).long(), use_cache=True)
    past, ttok = out.past_key_values, torch.tensor([[5]])
    stats = alternate({"jax": run_jax, "torch": lambda: ref(input_ids=ttok, past_key_values=past, use_cache=True)},
                      repeats=max(ctx.repeats, 10), budget_s=ctx.budget_s)
    j, t = stats["jax"], stats["torch"]
    kv_bytes = 2 * module.config.num_hidden_layers * CONTEXT * module.config.hidden_size * 4
    bytes_min = _weight_bytes(params, module) + kv_bytes
    floor_ms = bytes_min / (ctx.bandwidth_gbs * 1e9) * 1e3
    return Result(name="llama_decode", jax_ms=j.median_ms, torch_ms=t.median_ms, ratio=t.median_ms / j.median_ms,
                  gflops=flops / (j.median_ms * 1e-3) / 1e9, limit_fraction=floor_ms / j.median_ms,
                  compile_s=compile_s, flops=flops, limit="bandwidth", jax_range_ms=(j.min_ms, j.max_ms),
                  torch_range_ms=(t.min_ms, t.max_ms), bytes_min=bytes_min,
                  note=f"bandwidth floor {floor_ms:.1f} ms/token (weights read once + KV cache); the cache "
                       "position advances by one per timed call on both sides; GEMV-only ceiling "
                       f"{100 * floor_ms / gemm_only_ms(_gemm_shapes(1)):.0f} % of the floor (the step's weight "
                       "matrix-vector products alone)")


def llama_generate(ctx) -> Result:
    """256-token prompt + 64 greedy tokens, end to end (no EOS stop on either side)."""
    import torch

    ref, module, params = _models()
    ids = _ids(PROMPT)
    kw = dict(module=module, max_new_tokens=NEW, stop_token_ids=(), pad_token_id=0, temperature=0.0, top_p=1.0,
              hooks=None, return_hidden=False)
    args = (params, jnp.asarray(ids), jnp.ones(ids.shape, bool), jax.random.key(0))
    compiled, flops, compile_s = compile_with_flops(decode_jit, *args, **kw)
    tids = torch.from_numpy(ids).long()
    gen = lambda: ref.generate(tids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,  # noqa: E731
                               eos_token_id=None, pad_token_id=0)
    stats = alternate({"jax": lambda: jax.block_until_ready(compiled(*args)), "torch": gen},
                      repeats=ctx.repeats, budget_s=ctx.budget_s)
    j, t = stats["jax"], stats["torch"]
    # XLA counts a while_loop body once; the analytic count is 2 * params * tokens (plus attention).
    n = sum(x.size for x in jax.tree.leaves(params))
    analytic = 2.0 * n * (PROMPT + NEW)
    return Result(name="llama_generate", jax_ms=j.median_ms, torch_ms=t.median_ms, ratio=t.median_ms / j.median_ms,
                  gflops=analytic / (j.median_ms * 1e-3) / 1e9,
                  limit_fraction=analytic / (j.median_ms * 1e-3) / 1e9 / ctx.peak_gflops, compile_s=compile_s,
                  flops=analytic, jax_range_ms=(j.min_ms, j.max_ms), torch_range_ms=(t.min_ms, t.max_ms),
                  note="FLOPs analytic (2·params·tokens): XLA cost analysis counts the decode loop body once")


def train_step(ctx) -> Result:
    """fwd + bwd + AdamW on 2×256 tokens; PyTorch with its default AdamW and with fused=True."""
    import optax
    import torch

    ref, module, params = _models()
    ids = _ids(PROMPT, batch=2)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.0)

    def loss_fn(p, x):   # the training loss of calico_jax (HF's shifted CE; lm_head and CE in one backward)
        hidden = module.apply({"params": p}, x).hidden_states
        return causal_lm_loss_from_hidden(hidden, type(module).output_kernel(module.config, p), x)["ce"]

    # Parameters and optimizer state are donated (updated in place). XLA:CPU's default copy insertion
    # then copies every parameter at the start of the step (110 copies, 0.5 GB, ~10 % of the step);
    # its region analysis proves the copies unnecessary (bench/results/llm_opt.md).
    opts = {"xla_cpu_copy_insertion_use_region_analysis": True} if jax.default_backend() == "cpu" else None

    @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=opts)
    def step(p, opt, x):
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    state = {"p": jax.tree.map(jnp.copy, params), "opt": tx.init(params)}
    x = jnp.asarray(ids)
    compiled, flops, compile_s = compile_with_flops(step, state["p"], state["opt"], x)

    def run_jax():
        state["p"], state["opt"], loss = compiled(state["p"], state["opt"], x)
        loss.block_until_ready()

    def torch_step(opt, tx_ids):
        def run():
            with torch.enable_grad():
                opt.zero_grad(set_to_none=True)
                loss = ref(input_ids=tx_ids, labels=tx_ids).loss
                loss.backward()
                opt.step()
        return run

    with torch.inference_mode(False):  # autograd needs ordinary tensors
        tx_ids = torch.from_numpy(ids).long()
        ref.train()
        default = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
        fused = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        stats = alternate({"jax": run_jax, "torch": torch_step(default, tx_ids),
                           "torch_fused": torch_step(fused, tx_ids)}, repeats=ctx.repeats, budget_s=ctx.budget_s)
    ref.eval()
    j, t, f = stats["jax"], stats["torch"], stats["torch_fused"]
    gflops = flops / (j.median_ms * 1e-3) / 1e9
    # The step's weight products (forward, input and weight gradients) alone bound any implementation:
    # PyTorch's time over theirs is the largest speed-up a step could show on this host.
    shapes = training_shapes(_gemm_shapes(ids.size))
    gemm_ms = gemm_only_ms(shapes, repeats=3)
    return Result(name="train_step", jax_ms=j.median_ms, torch_ms=t.median_ms, ratio=t.median_ms / j.median_ms,
                  gflops=gflops, limit_fraction=gflops / ctx.peak_gflops, compile_s=compile_s, flops=flops,
                  jax_range_ms=(j.min_ms, j.max_ms), torch_range_ms=(t.min_ms, t.max_ms),
                  alt_torch_ms={"torch_fused": f.median_ms},
                  note=f"torch fused AdamW: {f.median_ms:.0f} ms "
                       f"(raw speed-up of JAX over it: {f.median_ms / j.median_ms:.2f}×); training "
                       f"{ceiling_note(shapes, ctx.peak_gflops, gemm_ms)}; a step of nothing but "
                       f"those products would be {t.median_ms / gemm_ms:.2f}× PyTorch's default and "
                       f"{f.median_ms / gemm_ms:.2f}× its fused one here")


ITEMS = {"llama_prefill": llama_prefill, "llama_decode": llama_decode, "llama_generate": llama_generate,
         "train_step": train_step}
