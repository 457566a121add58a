"""The CALICO training task: :class:`~calico_jax.models.calico.Calico` + :func:`~calico_jax.train.losses.calico_loss`
(weights and BCE/focal from ``recipe.loss``) on the grain pipeline (:mod:`calico_jax.data.pipeline`).

Everything about the model comes from ``cfg.model`` (a :class:`~calico_jax.models.calico.CalicoConfig`); the
pipeline's image sizes are its ``preprocess`` section and its [SEG] slots ``seg.max_seg``. The model's [SEG] id
(and, with ``vocab_from_tokenizer``, its vocabulary) follow the tokenizer (:meth:`CalicoConfig.for_tokenizer`);
[SEG] routing uses the pipeline's ``seg_image`` (host side), and predicted masks come out on the pipeline's mask
frame (at ``mask_hw``), so they line up with ``batch["masks"]``. Batches use the names of the CALICO batch contract
(:mod:`calico_jax.models.inputs`): :func:`~calico_jax.models.inputs.split` makes the model's inputs and the
targets of one, with no renaming.

Without ``data.pairs`` a synthetic part dataset (``data.synthetic``) and a held-out one
(``data.synthetic_heldout``, other images) are built under ``WORKDIR/data/{train,heldout}`` with a tiny
tokenizer at ``WORKDIR/data/tokenizer`` (atomically; deterministic given the seeds), so ``configs/tiny.py`` runs
with nothing downloaded. Several processes: process 0 builds them, the others wait at a barrier; each process
then reads its own shard. ``data.pairs`` / ``data.eval_pairs`` may be a pairs JSON file or a packed directory
(``python -m calico_jax.data.pack``): the packed one is read on demand inside the pipeline (each process reads only
its block; records that fail are skipped and counted: :meth:`CalicoTask.data_skips`).

Periodic evaluation (``eval_every``): teacher-forced on ``data.eval_pairs`` (or the synthetic held-out set),
``data.eval_batches`` fixed batches, no augmentation, deterministic forward: ``loss``, ``ce_loss``, ``mask_iou``
(mean IoU of ``logit > 0`` vs the ground truth over the valid [SEG]s) and ``token_accuracy`` (answer tokens).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.core.fs import atomic_directory
from calico_jax.core.tokens import SEG_TOKEN
from calico_jax.data import synthetic
from calico_jax.data.packed import PackedPairs
from calico_jax.data.pairs_io import read_pairs
from calico_jax.data.pipeline import Pipeline, PipelineConfig
from calico_jax.data.qformer_text import (
    QFORMER_TOKENIZER_DIR,
    QFormerText,
    build_tiny_qformer_tokenizer,
    load_qformer_tokenizer,
)
from calico_jax.data.tokenize import build_tiny_tokenizer, load_tokenizer
from calico_jax.models import inputs as contract
from calico_jax.models.calico import Calico, CalicoConfig
from calico_jax.models.llama import LlamaForCausalLM
from calico_jax.parallel import distributed
from calico_jax.train.losses import calico_loss, pixel_mask
from calico_jax.train.task import Task, eval_rows

log = logging.getLogger(__name__)


def prepare_data(cfg, workdir: Path) -> tuple[Path, Path, Path | None]:
    """-> (pairs file, tokenizer dir, held-out pairs file or None); builds the synthetic sets and the tiny
    tokenizer on first use (process 0; every process waits for it)."""
    root, d, first = workdir / "data", cfg.data, jax.process_index() == 0
    pairs_path, eval_path = (Path(d.pairs) if d.pairs else None), (Path(d.eval_pairs) if d.eval_pairs else None)
    if pairs_path is None:
        splits = (("train", d.synthetic, cfg.seed), ("heldout", d.synthetic_heldout, cfg.seed + 1))
        for name, syn, seed in splits:
            if first:
                synthetic.make_split(root / name, syn.num_images, seed if syn.seed < 0 else syn.seed, seed,
                                     progress=cfg.progress, **syn.pair_options(), **syn.generator_options())
        pairs_path = root / "train" / "pairs.json"
        eval_path = eval_path or root / "heldout" / "pairs.json"
    tok = Path(d.tokenizer) if d.tokenizer else root / "tokenizer"
    if not d.tokenizer and not tok.exists() and first:
        p = read_pairs(pairs_path, validate=False)
        with atomic_directory(tok) as tmp:
            build_tiny_tokenizer(tmp, [s["prompt"] + " " + s["answer"] for s in p.samples], vocab_size=400)
    distributed.barrier("calico_prepare_data")   # the others read what process 0 just wrote
    return pairs_path, tok, eval_path


class _PackedQFormerText:
    """Batch map: the Q-Former instruction tokens of each row's prompt, read from a packed directory."""

    def __init__(self, qformer_text: QFormerText, pairs: PackedPairs):
        self.qformer_text, self.pairs, self.cache = qformer_text, pairs, {}

    def __call__(self, batch: dict) -> dict:
        rows = []
        for i in np.asarray(batch["sample_index"]).tolist():
            prompt = self.pairs.samples[i]["prompt"]
            if prompt not in self.cache:
                self.cache[prompt] = self.qformer_text(prompt)
            rows.append(self.cache[prompt])
        return {**batch, **{k: np.stack([r[k] for r in rows]) for k in rows[0]}}


def batch_spec(cfg, model: CalicoConfig, rows: int) -> dict:
    """name -> (shape, dtype) of one pipeline batch of ``rows`` rows: the contract's ``spec`` (program "train"; the
    Q-Former's instruction tokens under ``qformer_text_input``, added by :meth:`CalicoTask.with_qformer_text`)."""
    return {k: (f.shape, f.dtype) for k, f in contract.spec(model, rows, cfg.data.max_images,
                                                           cfg.data.max_tokens).items()}


def pipeline_config(cfg, model: CalicoConfig) -> PipelineConfig:
    d = cfg.data
    return PipelineConfig(batch_size=cfg.batch_size, max_images=d.max_images, max_segs=model.seg.max_seg,
                          max_tokens=d.max_tokens, preprocess=model.preprocess, hflip=d.hflip,
                          color_jitter=d.color_jitter, num_epochs=None, seed=cfg.seed, worker_count=d.worker_count,
                          num_threads=2, prefetch_buffer_size=2)


class CalicoTask(Task):
    """``plan_only``: no data or tokenizer (AOT planning, dry run): the config's own vocabulary."""

    def __init__(self, cfg, workdir: Path | None = None, plan_only: bool = False):
        super().__init__(cfg, workdir, plan_only)
        self.tokenizer, self.tokenizer_dir, self.pairs, self.held_out = None, None, None, None
        mcfg = cfg.model
        if not plan_only:
            pairs_path, self.tokenizer_dir, eval_path = prepare_data(cfg, Path(workdir or "."))
            self.tokenizer = load_tokenizer(self.tokenizer_dir)
            mcfg = mcfg.for_tokenizer(len(self.tokenizer), self.tokenizer.convert_tokens_to_ids(SEG_TOKEN))
            self.pairs = read_pairs(pairs_path)
            if cfg.eval_every > 0 and eval_path is None:
                log.warning("eval_every=%d but no held-out data: set data.eval_pairs (the synthetic held-out set "
                            "exists only when training on synthetic data); periodic evaluation is off",
                            cfg.eval_every)
            elif cfg.eval_every > 0:
                self.held_out = read_pairs(eval_path)
        self.model_config = mcfg
        self.qformer_text = None   # InstructBLIP instruction tokens, from TOKENIZER/qformer_tokenizer/
        if mcfg.qformer_text_input and not plan_only:
            qdir = Path(self.tokenizer_dir) / QFORMER_TOKENIZER_DIR
            if not qdir.is_dir() and not cfg.data.pairs:   # the synthetic recipe builds its own, next to the LLM's
                build_tiny_qformer_tokenizer(qdir)
            self.qformer_text = QFormerText(load_qformer_tokenizer(qdir), mcfg.qformer_max_tokens)
        self.module = Calico(mcfg, jnp.dtype(cfg.dtype))
        self.trainable = cfg.recipe.active_trainable(mcfg)
        self.tokens_per_example, self.images_per_example = cfg.data.max_tokens, cfg.data.max_images
        self.pcfg = pipeline_config(cfg, mcfg)

    def forward(self, params, batch, deterministic, rngs=None):
        inputs, targets = contract.split(batch)
        return self.module.apply({"params": params}, inputs, labels=targets.labels, deterministic=deterministic,
                                 rngs=rngs)

    def init_variables(self, rng):
        return self.module.init(rng, self.module.dummy_inputs())

    def loss_fn(self, params, batch, rng):
        out, targets = self.forward(params, batch, False, {"dropout": rng}), contract.split(batch)[1]
        # the CE straight from the final hidden states: lm_head and CE share one backward
        lm_head = LlamaForCausalLM.output_kernel(self.model_config.llm, params["llm"])
        total, parts = calico_loss(out, targets.masks, targets.mask_valid, self.cfg.recipe.loss, lm_head=lm_head)
        return total, {"ce_loss": parts["ce"], "mask_bce_loss": parts["pixel"], "mask_dice_loss": parts["dice"],
                       "num_masks": parts["num_masks"].astype(jnp.float32), "token_accuracy": parts["token_accuracy"]}

    def dataset(self, process_index: int, process_count: int):
        rows = self.cfg.batch_size // process_count   # shard_block: this process's rows of each micro-batch
        per_process = dataclasses.replace(self.pcfg, batch_size=rows, shard_block=rows // self.cfg.optim.grad_accum)
        # data.strict: stop at the first bad packed record instead of skipping and counting it
        self.train_pipeline = Pipeline(self.pairs, self.tokenizer, per_process, process_index, process_count,
                                       strict=self.cfg.data.strict)
        return self.with_qformer_text(self.train_pipeline.dataset(), self.pairs)

    def data_skips(self) -> dict[str, int]:
        """Records of this process's training stream skipped so far, by kind (up front and at read time)."""
        pipe = getattr(self, "train_pipeline", None)
        return pipe.report.counts() if pipe is not None else {}

    def with_qformer_text(self, ds, pairs):
        """Adds the Q-Former instruction tokens of each row's sample (by ``sample_index``) with ``qformer_text_input``
        (computed once per pairs file in memory, so the pipeline itself is unchanged; a packed directory's prompts
        are read per row, tokenized once per distinct prompt)."""
        if self.qformer_text is None:
            return ds
        if isinstance(pairs, PackedPairs):
            return ds.map(_PackedQFormerText(self.qformer_text, pairs))
        table = self.qformer_text.batch([s["prompt"] for s in pairs.samples])
        return ds.map(lambda batch: {**batch, **{k: v[np.asarray(batch["sample_index"])] for k, v in table.items()}})

    def batch_spec(self, rows: int) -> dict:
        return batch_spec(self.cfg, self.model_config, rows)

    @property
    def has_eval(self) -> bool:
        return self.held_out is not None

    def eval_dataset(self, process_index: int, process_count: int):
        """The first ``eval_batches`` batches of the held-out set (same order every time)."""
        ecfg = dataclasses.replace(self.pcfg, hflip=0.0, color_jitter=0.0, num_epochs=1, worker_count=0,
                                   batch_size=eval_rows(self.cfg, process_count))
        it = iter(self.with_qformer_text(Pipeline(self.held_out, self.tokenizer, ecfg, process_index,
                                                  process_count).dataset(), self.held_out))
        try:
            for _ in range(self.cfg.data.eval_batches):
                yield next(it)
        except StopIteration:
            return
        finally:
            if hasattr(it, "close"):
                it.close()

    def eval_metrics(self, params, batch):
        out, targets = self.forward(params, batch, True), contract.split(batch)[1]
        total, parts = calico_loss(out, targets.masks, targets.mask_valid, self.cfg.recipe.loss)
        valid = out["seg_valid"] & targets.mask_valid.astype(bool)
        region = pixel_mask(out["mask_hw"], targets.masks.shape[-2:])
        pred, gt = (out["mask_logits"] > 0) & region, targets.masks.astype(bool) & region
        inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
        union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
        iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)   # both empty: a perfect match
        rows = jnp.asarray(batch["input_ids"].shape[0], jnp.float32)
        n_tok = parts["num_tokens"].astype(jnp.float32)
        return {"loss": (total * rows, rows), "ce_loss": (parts["ce"] * rows, rows),
                "mask_iou": (jnp.sum(jnp.where(valid, iou, 0.0)), jnp.sum(valid).astype(jnp.float32)),
                "token_accuracy": (parts["token_accuracy"] * n_tok, n_tok)}

    def model_record(self) -> dict | None:
        if self.plan_only:
            return None
        return {"name": "calico", "config": self.model_config.to_dict(), "trainable": list(self.trainable),
                "frozen_dtype": self.cfg.frozen_dtype,
                "tokenizer": str(Path(self.tokenizer_dir).absolute())}
