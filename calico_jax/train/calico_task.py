"""The CALICO training task: :class:`~calico_jax.models.calico.Calico` + :func:`~calico_jax.losses.calico_loss`
on the grain pipeline (:mod:`calico_jax.data.pipeline`).

Without ``data.pairs`` a small synthetic part dataset, its pairs file and a tiny tokenizer are built
once under ``WORKDIR/data`` (atomically; deterministic given ``seed``), so ``configs/tiny.py`` runs
with nothing downloaded. The model's vocabulary and ``[SEG]`` id follow the tokenizer; [SEG] routing
uses the pipeline's ``seg_image`` (host side), and predicted masks come out on the pipeline's mask
frame (``original_hw`` = ``mask_sizes``), so they line up with ``batch["masks"]``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from calico_jax.losses import LossConfig, calico_loss
from calico_jax.train.config import ExperimentConfig
from calico_jax.train.tasks import Task


def _prepare_data(cfg: ExperimentConfig, workdir: Path) -> tuple[Path, Path]:
    """-> (pairs file, tokenizer dir); builds the synthetic set on first use."""
    from calico_jax.data import pairs, synthetic
    from calico_jax.data.tokenize import build_tiny_tokenizer
    from calico_jax.pretrained import atomic_directory

    root = workdir / "data"
    if cfg.data.pairs:
        pairs_path = Path(cfg.data.pairs)
    else:
        pairs_path = root / "pairs.json"
        if not root.exists() and jax.process_index() == 0:
            with atomic_directory(root) as tmp:
                ann = synthetic.generate(tmp / "syn", cfg.data.synthetic_images, seed=cfg.seed, progress=False)
                rc = pairs.main(["--coco", str(ann), "--images", str(root / "syn" / "images"),
                                 "--out", str(tmp / "pairs.json"), "--seed", str(cfg.seed), "--check_images", "none"])
                if rc != 0:
                    raise RuntimeError("building the synthetic pairs file failed")
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else root / "tokenizer"
    if not cfg.data.tokenizer and not tok.exists() and jax.process_index() == 0:
        p = pairs.read_pairs(pairs_path, validate=False)
        with atomic_directory(tok) as tmp:
            build_tiny_tokenizer(tmp, [s["prompt"] + " " + s["answer"] for s in p.samples], vocab_size=400)
    return pairs_path, tok


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config(cfg: ExperimentConfig, vocab_size: int | None = None, seg_id: int | None = None):
    """CalicoConfig for ``model.size`` with the data's static shapes, the tokenizer's vocabulary and
    [SEG] id (``None``: keep the size's default), then ``model.options`` merged in (nested dict, e.g.
    ``{"cam": {"layers": []}, "cem": {"enabled": false}}``)."""
    from calico_jax.models.calico import CalicoConfig
    d = cfg.data
    if cfg.model.size not in ("tiny", "7b"):
        raise ValueError(f"model.size {cfg.model.size!r} unknown (tiny | 7b)")
    base = CalicoConfig.tiny() if cfg.model.size == "tiny" else CalicoConfig()
    if vocab_size is not None:
        if cfg.model.size == "7b" and vocab_size > base.llm.vocab_size:
            raise ValueError(f"tokenizer has {vocab_size} tokens, the 7B LLM {base.llm.vocab_size}")
        if cfg.model.size == "tiny":
            base = base.replace(llm=base.llm.replace(vocab_size=vocab_size))
    seg = base.seg.replace(identifier_ids=(), max_seg=d.max_segs, mask_size=(d.mask_size, d.mask_size),
                           **({"token_id": seg_id} if seg_id is not None else {}))
    return CalicoConfig.from_dict(_merge(base.replace(seg=seg).to_dict(), cfg.model.options))


def batch_spec(cfg: ExperimentConfig, batch: int) -> dict:
    """name -> (shape, dtype) of one pipeline batch of ``batch`` rows (see calico_jax.data.pipeline)."""
    d, B, N, S, T = cfg.data, batch, cfg.data.max_images, cfg.data.max_segs, cfg.data.max_tokens
    i32, f32 = jnp.int32, jnp.float32
    spec = {"input_ids": ((B, T), i32), "labels": ((B, T), i32), "attention_mask": ((B, T), i32),
            "images_blip": ((B, N, d.blip_size, d.blip_size, 3), f32),
            "images_sam": ((B, N, d.sam_size, d.sam_size, 3), f32), "image_valid": ((B, N), jnp.bool_),
            "original_sizes": ((B, N, 2), i32), "sam_sizes": ((B, N, 2), i32), "mask_sizes": ((B, N, 2), i32),
            "masks": ((B, S, d.mask_size, d.mask_size), jnp.bool_), "mask_valid": ((B, S), jnp.bool_),
            "seg_image": ((B, S), i32), "task": ((B,), i32), "sample_index": ((B,), i32)}
    if d.dinov2_size:
        spec["images_dinov2"] = ((B, N, d.dinov2_size, d.dinov2_size, 3), f32)
    return spec


def calico_task(cfg: ExperimentConfig, workdir: Path | None = None, plan_only: bool = False) -> Task:
    """``plan_only``: no data or tokenizer (AOT planning); the size's default vocabulary."""
    from calico_jax.data.pairs_io import read_pairs
    from calico_jax.data.pipeline import Pipeline, PipelineConfig
    from calico_jax.data.tokenize import SEG_TOKEN, load_tokenizer
    from calico_jax.models.calico import Calico

    if plan_only:
        tokenizer, mcfg = None, model_config(cfg)
    else:
        pairs_path, tok_dir = _prepare_data(cfg, Path(workdir or "."))
        tokenizer = load_tokenizer(tok_dir)
        mcfg = model_config(cfg, len(tokenizer), tokenizer.convert_tokens_to_ids(SEG_TOKEN))
    module = Calico(mcfg, jnp.dtype(cfg.model.dtype))
    d = cfg.data
    pcfg = PipelineConfig(batch_size=cfg.batch_size, max_images=d.max_images, max_segs=d.max_segs,
                          max_tokens=d.max_tokens, blip_size=d.blip_size, dinov2_size=d.dinov2_size,
                          dinov2_crop=d.dinov2_size, sam_size=d.sam_size, mask_size=d.mask_size,
                          hflip=d.hflip, color_jitter=d.color_jitter, num_epochs=None, seed=cfg.seed,
                          worker_count=d.worker_count, num_threads=2, prefetch_buffer_size=2)
    pairs = None if plan_only else read_pairs(pairs_path)
    loss_cfg = LossConfig()

    def init_variables(rng):
        return module.init(rng, **module.dummy_inputs())

    def loss_fn(params, batch, rng):
        out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["images_blip"],
                           batch.get("images_dinov2"), batch["images_sam"], batch["sam_sizes"], batch["mask_sizes"],
                           labels=batch["labels"], image_valid=batch["image_valid"], seg_image=batch["seg_image"],
                           deterministic=False, rngs={"dropout": rng})
        total, parts = calico_loss(out, batch["masks"], batch["mask_valid"], loss_cfg)
        return total, {"ce_loss": parts["ce"], "mask_bce_loss": parts["pixel"], "mask_dice_loss": parts["dice"],
                       "num_masks": parts["num_masks"].astype(jnp.float32), "token_accuracy": parts["token_accuracy"]}

    def dataset(process_index: int, process_count: int):
        per_process = dataclasses.replace(pcfg, batch_size=cfg.batch_size // process_count)
        return Pipeline(pairs, tokenizer, per_process, process_index, process_count).dataset()

    return Task(module, init_variables, loss_fn, trainable=tuple(mcfg.trainable), dataset=dataset,
                tokens_per_example=d.max_tokens, images_per_example=d.max_images, model_name="calico",
                batch_spec=lambda b: batch_spec(cfg, b))
