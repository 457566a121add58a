"""Dry run: parameter counts and forward FLOPs of an experiment's model, without allocating a weight.

``python train.py --config configs/calico_7b.py --dry_run`` prints, one per line::

    params_total=<int>  params_trainable=<int>  trainable_fraction=<percent>  forward_tflops=<float>

Parameters come from ``jax.eval_shape`` of the task's init; trainable = ``recipe.trainable``. ``forward_tflops``
is XLA's cost analysis of the compiled inference forward (``deterministic``, no labels, no loss), lowered from
``ShapeDtypeStruct`` arguments of the training batch (the batch contract's :func:`calico_jax.models.inputs.spec`,
image sizes from ``model.preprocess``) at the paper's efficiency shapes (:data:`PAPER_SHAPES`): batch 1, 2 images, a
128-token prompt + answer plus one placeholder per image (widened to S_I visual tokens each), 4 [SEG] slots.
Decided here (the paper does not say): the 128 tokens exclude the image placeholders, the SAM image encoder is
included (it runs once per image), and the count is of the CPU-compiled program (XLA's HLO cost model: 2 FLOPs
per multiply-add, elementwise ops included).
"""
from __future__ import annotations

import flax.linen as nn
import jax

from calico_jax.core.params import count_params
from calico_jax.models import inputs as contract
from calico_jax.train.step import flops
from calico_jax.train.tasks import build as build_task

PAPER_SHAPES = {"batch": 1, "images": 2, "text_tokens": 128, "segs": 4}


def at_shapes(cfg, shapes: dict = PAPER_SHAPES):
    """``cfg`` with the batch shapes of ``shapes`` (images, tokens incl. one placeholder per image, [SEG] slots)."""
    model = cfg.model.replace(seg=cfg.model.seg.replace(max_seg=shapes["segs"]))
    data = cfg.data.replace(max_images=shapes["images"], max_tokens=shapes["text_tokens"] + shapes["images"])
    return cfg.replace(model=model, data=data, batch_size=shapes["batch"],
                       optim=cfg.optim.replace(grad_accum=1))


def dry_run(cfg, verbose: bool = True, shapes: dict = PAPER_SHAPES) -> dict:
    if cfg.task != "calico":
        raise ValueError(f"--dry_run supports the calico task, not {cfg.task!r}")
    task = build_task(at_shapes(cfg, shapes), None, plan_only=True)
    params = jax.eval_shape(task.init_variables, jax.random.key(0))["params"]
    total, trainable = count_params(params, task.trainable)
    data = task.cfg.data
    fields = contract.spec(task.model_config, shapes["batch"], data.max_images, data.max_tokens)
    batch = {k: v for k, v in contract.abstract(fields).items() if k != "labels"}
    unboxed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(params))
    compiled = jax.jit(lambda p, b: task.forward(p, b, True)).lower(unboxed, batch).compile()
    report = {"params_total": int(total), "params_trainable": int(trainable),
              "trainable_fraction": 100.0 * trainable / total, "forward_tflops": flops(compiled) / 1e12}
    if verbose:
        for k, v in report.items():
            print(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    return report
