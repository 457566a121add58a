"""SAM image encoder attention on the real compilers: the blocked relative-position attention (``rel_pos_attention=
"blocked"``, chosen for CPU caches) vs the dense bias of segment-anything, compiled without hardware for one chip
of each target (``train.py --compile_only --target`` devices):

    python -m bench.aot_sam_attention v5p:2x2x1 h100:1 > bench/results/aot/sam_attention.json

A ViT-H encoder (width 1280, 16 heads, 1024 px: 64 x 64 tokens) cut to ``--depth`` blocks with the last one global,
bf16 weights and compute, one image, forward only (the encoder is frozen in CALICO). Per variant: compiled memory
(temp = the attention buffers), matmul FLOPs (every loop iteration) and XLA's bytes, and the roofline estimate.
"""
from __future__ import annotations

import argparse
import json
import time

from calico_jax.models.sam.config import ImageEncoderConfig
from calico_jax.models.sam.image_encoder import ImageEncoderViT
from calico_jax.plans import roofline, targets
from calico_jax.train.step import compiler_options


def compile_variant(target, variant: str, depth: int) -> dict:
    import jax
    import jax.numpy as jnp

    cfg = ImageEncoderConfig(depth=depth, global_attn_indexes=(depth - 1,), rel_pos_attention=variant)
    model = ImageEncoderViT(cfg, dtype=jnp.bfloat16)
    mesh = jax.sharding.Mesh([target.devices[0]], ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((1, cfg.img_size, cfg.img_size, 3), jnp.bfloat16, sharding=rep)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=rep), params)
    t0 = time.perf_counter()
    traced = jax.jit(model.apply).trace(params, x)
    compiled = traced.lower().compile(compiler_options(mesh))
    m = compiled.memory_analysis()
    flops, _ = roofline.traced_flops(traced)
    cost = roofline.compiled_cost(compiled)
    est = roofline.estimate(flops, cost["bytes"], 0.0, target.chip)
    return {"target": target.spec, "variant": variant, "depth": depth, "temp_gb": m.temp_size_in_bytes / 2 ** 30,
            "argument_gb": m.argument_size_in_bytes / 2 ** 30, "tflops": flops / 1e12,
            "bytes_gb": cost["bytes"] / 2 ** 30, "estimate_s": est.get("step_s"), "bound": est.get("bound"),
            "compile_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("targets", nargs="+")
    ap.add_argument("--depth", type=int, default=2)
    args = ap.parse_args()
    targets.aot_environment()   # before jax starts a backend (importing the modules above starts none)
    rows = [compile_variant(targets.parse(t), v, args.depth) for t in args.targets for v in ("blocked", "dense")]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
