"""Dry run: parameter counts and forward FLOPs of an experiment's model, without allocating a weight.

``python train.py --config configs/calico_7b.py --dry_run`` prints, one per line::

    params_total=<int>  params_trainable=<int>  trainable_fraction=<percent>  forward_tflops=<float>

Parameters come from ``jax.eval_shape`` of the task's init; trainable = ``model.trainable`` or the
task's default patterns. ``forward_tflops`` is XLA's cost analysis of the compiled inference forward
(``deterministic``, no labels, no loss), lowered from ``ShapeDtypeStruct`` arguments at the paper's
efficiency shapes (:data:`PAPER_SHAPES`): batch 1, 2 images, a 128-token prompt + answer plus one
placeholder per image (widened to S_I visual tokens each), 4 [SEG] slots (``seg.max_seg`` = 4), SAM and
mask sizes from ``data``. UNKNOWN decided here: the 128 tokens exclude the image placeholders, the SAM
image encoder is included (it runs once per image), and the count is of the CPU-compiled program
(XLA's HLO cost model: 2 FLOPs per multiply-add, elementwise ops included).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.train.config import ExperimentConfig
from calico_jax.train.state import count_params
from calico_jax.train.tasks import build as build_task

PAPER_SHAPES = {"batch": 1, "images": 2, "text_tokens": 128, "segs": 4}


def forward_inputs(cfg: ExperimentConfig, mcfg, shapes: dict = PAPER_SHAPES) -> dict:
    """ShapeDtypeStructs of one :class:`Calico` forward at ``shapes``."""
    b, n, t, m = shapes["batch"], shapes["images"], shapes["text_tokens"] + shapes["images"], shapes["segs"]
    d, f32, i32 = cfg.data, jnp.float32, jnp.int32
    s = jax.ShapeDtypeStruct
    img = mcfg.clip.image_size if mcfg.image_path == "clip_mlp" else d.blip_size
    return {"input_ids": s((b, t), i32), "attention_mask": s((b, t), i32),
            "pixel_values": s((b, n, img, img, 3), f32),
            "dino_pixel_values": s((b, n, d.dinov2_size, d.dinov2_size, 3), f32) if d.dinov2_size else None,
            "sam_pixel_values": s((b, n, d.sam_size, d.sam_size, 3), f32),
            "resized_hw": s((b, n, 2), i32), "original_hw": s((b, n, 2), i32), "seg_image": s((b, m), i32)}


def dry_run(cfg: ExperimentConfig, verbose: bool = True, shapes: dict = PAPER_SHAPES) -> dict:
    task = build_task(cfg, None, plan_only=True)
    if cfg.model.task != "calico":
        raise ValueError(f"--dry_run supports the calico task, not {cfg.model.task!r}")
    params = jax.eval_shape(task.init_variables, jax.random.key(0))["params"]
    total, trainable = count_params(params, tuple(cfg.model.trainable or task.trainable))
    module = task.module
    fwd_module = module.clone(config=module.config.replace(seg=module.config.seg.replace(max_seg=shapes["segs"])))
    inputs = forward_inputs(cfg, module.config, shapes)

    def forward(p, kw):
        return fwd_module.apply({"params": p}, **kw, deterministic=True)

    unboxed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(params))
    compiled = jax.jit(forward).lower(unboxed, inputs).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    report = {"params_total": int(total), "params_trainable": int(trainable),
              "trainable_fraction": 100.0 * trainable / total, "forward_tflops": float(ca["flops"]) / 1e12}
    if verbose:
        for k, v in report.items():
            print(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    return report
