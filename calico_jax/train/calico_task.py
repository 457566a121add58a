"""The CALICO training task: :class:`~calico_jax.models.calico.Calico` + :func:`~calico_jax.losses.calico_loss`
on the grain pipeline (:mod:`calico_jax.data.pipeline`).

Without ``data.pairs`` a small synthetic part dataset, its pairs file and a tiny tokenizer are built
once under ``WORKDIR/data`` (atomically; deterministic given ``seed``), so ``configs/tiny.py`` runs
with nothing downloaded. The model's vocabulary and ``[SEG]`` id follow the tokenizer; [SEG] routing
uses the pipeline's ``seg_image`` (host side), and predicted masks come out on the pipeline's mask
frame (``original_hw`` = ``mask_sizes``), so they line up with ``batch["masks"]``.

Several processes: process 0 builds the synthetic data and tokenizer, the others wait at a barrier;
each process then reads its own shard (``Pipeline(..., process_index, process_count)``).

Periodic evaluation (``eval_every``): teacher-forced on ``data.eval_pairs`` (or the synthetic held-out
set), ``data.eval_batches`` fixed batches, no augmentation, deterministic forward: ``loss``, ``ce_loss``,
``mask_iou`` (mean IoU of ``logit > 0`` vs the ground truth over the valid [SEG]s) and
``token_accuracy`` (answer tokens).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from calico_jax.losses import LossConfig, calico_loss, pixel_mask
from calico_jax.train.config import ExperimentConfig
from calico_jax.train.tasks import Task, eval_rows

log = logging.getLogger(__name__)


def _synthetic_pairs(root: Path, num_images: int, seed: int) -> None:
    """A synthetic part dataset and its pairs file under ``root`` (atomically)."""
    from calico_jax.data import pairs, synthetic
    from calico_jax.pretrained import atomic_directory
    with atomic_directory(root) as tmp:
        ann = synthetic.generate(tmp / "syn", num_images, seed=seed, progress=False)
        rc = pairs.main(["--coco", str(ann), "--images", str(root / "syn" / "images"),
                         "--out", str(tmp / "pairs.json"), "--seed", str(seed), "--check_images", "none"])
        if rc != 0:
            raise RuntimeError(f"building the synthetic pairs file under {root} failed")


def _prepare_data(cfg: ExperimentConfig, workdir: Path) -> tuple[Path, Path, Path | None]:
    """-> (pairs file, tokenizer dir, held-out pairs file or None); builds the synthetic sets on first use
    (process 0; every process waits for it)."""
    from calico_jax.data import pairs
    from calico_jax.data.tokenize import build_tiny_tokenizer
    from calico_jax.pretrained import atomic_directory

    root, d, first = workdir / "data", cfg.data, jax.process_index() == 0
    pairs_path = Path(d.pairs) if d.pairs else root / "pairs.json"
    if not d.pairs and not root.exists() and first:
        _synthetic_pairs(root, d.synthetic_images, cfg.seed)
    eval_path = Path(d.eval_pairs) if d.eval_pairs else None
    if eval_path is None and not d.pairs and cfg.eval_every > 0:
        eval_path = root / "eval" / "pairs.json"   # held-out: other images (seed + 1), same generator
        if not eval_path.parent.exists() and first:
            _synthetic_pairs(eval_path.parent, max(8, d.synthetic_images // 3), cfg.seed + 1)
    tok = Path(d.tokenizer) if d.tokenizer else root / "tokenizer"
    if not d.tokenizer and not tok.exists() and first:
        p = pairs.read_pairs(pairs_path, validate=False)
        with atomic_directory(tok) as tmp:
            build_tiny_tokenizer(tmp, [s["prompt"] + " " + s["answer"] for s in p.samples], vocab_size=400)
    if jax.process_count() > 1:   # the others read what process 0 just wrote
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("calico_prepare_data")
    return pairs_path, tok, eval_path


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
    mcfg = CalicoConfig.from_dict(_merge(base.replace(seg=seg).to_dict(), cfg.model.options))
    return with_remat(mcfg, cfg.model.remat_policy)


def with_remat(mcfg, policy):
    """Each tower's block ``remat`` field set from ``policy(tower)`` (``ModelConfig.remat_policy``)."""
    v = mcfg.vision
    return mcfg.replace(
        vision=v.replace(vision=v.vision.replace(remat=policy("vision")),
                         qformer=v.qformer.replace(remat=policy("qformer"))),
        clip=mcfg.clip.replace(remat=policy("vision")), dinov2=mcfg.dinov2.replace(remat=policy("dinov2")),
        llm=mcfg.llm.replace(remat=policy("llm")),
        sam=mcfg.sam.replace(image_encoder=mcfg.sam.image_encoder.replace(remat=policy("sam"))))


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
        pairs_path, tok_dir, eval_path = _prepare_data(cfg, Path(workdir or "."))
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

    def forward(params, batch, deterministic, rngs=None):
        return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["images_blip"],
                            batch.get("images_dinov2"), batch["images_sam"], batch["sam_sizes"], batch["mask_sizes"],
                            labels=batch["labels"], image_valid=batch["image_valid"], seg_image=batch["seg_image"],
                            deterministic=deterministic, rngs=rngs)

    def init_variables(rng):
        return module.init(rng, **module.dummy_inputs())

    def loss_fn(params, batch, rng):
        out = forward(params, batch, False, {"dropout": rng})
        total, parts = calico_loss(out, batch["masks"], batch["mask_valid"], loss_cfg)
        return total, {"ce_loss": parts["ce"], "mask_bce_loss": parts["pixel"], "mask_dice_loss": parts["dice"],
                       "num_masks": parts["num_masks"].astype(jnp.float32), "token_accuracy": parts["token_accuracy"]}

    def dataset(process_index: int, process_count: int):
        per_process = dataclasses.replace(pcfg, batch_size=cfg.batch_size // process_count)
        return Pipeline(pairs, tokenizer, per_process, process_index, process_count).dataset()

    eval_pipeline = None
    if cfg.eval_every > 0 and not plan_only:
        if eval_path is None:
            log.warning("eval_every=%d but no held-out data: set data.eval_pairs (the synthetic held-out set "
                        "exists only when training on synthetic data); periodic evaluation is off", cfg.eval_every)
        else:
            ecfg = dataclasses.replace(pcfg, hflip=0.0, color_jitter=0.0, num_epochs=1, worker_count=0, seed=cfg.seed)
            eval_pipeline = (read_pairs(eval_path), ecfg)

    def eval_dataset(process_index: int, process_count: int):
        """The first ``eval_batches`` batches of the held-out set (same order every time)."""
        held_out, ecfg = eval_pipeline
        ecfg = dataclasses.replace(ecfg, batch_size=eval_rows(cfg, process_count))
        it = iter(Pipeline(held_out, tokenizer, ecfg, process_index, process_count).dataset())
        try:
            for _ in range(d.eval_batches):
                yield next(it)
        except StopIteration:
            return
        finally:
            if hasattr(it, "close"):
                it.close()

    def eval_metrics(params, batch):
        out = forward(params, batch, True)
        total, parts = calico_loss(out, batch["masks"], batch["mask_valid"], loss_cfg)
        valid = out["seg_valid"] & batch["mask_valid"].astype(bool)
        region = pixel_mask(out["mask_hw"], batch["masks"].shape[-2:])
        pred, gt = (out["mask_logits"] > 0) & region, batch["masks"].astype(bool) & region
        inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
        union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
        iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)   # both empty: a perfect match
        rows = jnp.asarray(batch["input_ids"].shape[0], jnp.float32)
        n_tok = parts["num_tokens"].astype(jnp.float32)
        return {"loss": (total * rows, rows), "ce_loss": (parts["ce"] * rows, rows),
                "mask_iou": (jnp.sum(jnp.where(valid, iou, 0.0)), jnp.sum(valid).astype(jnp.float32)),
                "token_accuracy": (parts["token_accuracy"] * n_tok, n_tok)}

    return Task(module, init_variables, loss_fn, trainable=tuple(mcfg.trainable), dataset=dataset,
                tokens_per_example=d.max_tokens, images_per_example=d.max_images, model_name="calico",
                batch_spec=lambda b: batch_spec(cfg, b),
                eval_dataset=eval_dataset if eval_pipeline else None, eval_metrics=eval_metrics)
