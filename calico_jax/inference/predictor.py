"""CALICO inference: one jit-compiled prefill + KV-cache decode per batch, masks from the kept hidden states.

:class:`Predictor` takes images (RGB uint8 arrays) and a question and returns the answer with one binary mask per
routed ``[SEG]`` at the image's original resolution:

1. Host: the ``llava_v1`` prompt (the training format, :class:`~calico_jax.data.tokenize.SampleTokenizer`), left
   aligned and padded to a length bucket; the processors of the training pipeline (BLIP, DINOv2, SAM).
2. One jitted program, :func:`generate_program` (also what ``train.py --compile_only --program predict`` compiles,
   :mod:`calico_jax.plans.predict_plan`), on a :class:`~calico_jax.models.inputs.CalicoInputs` (the batch
   contract's "predict" fields, :meth:`Predictor.make_inputs`): :meth:`Calico.prefill` (image tokens spliced in, the
   CAMs as LLM hooks, into a KV cache that carries their effect into decoding), then
   :func:`calico_jax.inference.generate.decode_loop` over :meth:`Calico.decode_step`, keeping every generated
   token's final hidden state; the frozen SAM image embeddings.
3. Host: each ``[SEG]`` is routed to the image its identifier ``(IMAGEk)`` names
   (:func:`~calico_jax.models.seg_routing.parse_identifier`) and labelled with the phrase of the last
   ``<p> ... </p>`` before it. Its hidden state is
   :func:`~calico_jax.models.seg_routing.seg_hidden_index` of a generated sequence ("before" the [SEG] generated
   at step j: ``hidden[:, j]``, whose logits produced it; "at" it: ``hidden[:, j + 1]``). No second LLM pass.
4. One jitted program per padded [SEG] count (:func:`mask_program`): f_segmentation -> SAM mask decoder -> low-res
   logits, then GLaMM's post-processing to the original size
   (:func:`~calico_jax.models.calico_layout.postprocess_masks`, sizes padded to a bucket so few programs compile).
   Mask = logits > ``mask_threshold``; score = mean foreground probability.

A batch holds samples with the same number of images (so every row's prompt ends at the same expanded slot);
:meth:`Predictor.predict` groups and pads batches itself (:func:`plan_batches`, then :meth:`Predictor.predict_batch`
per batch, which is what a streaming caller runs). On a mesh (``mesh=``, :mod:`calico_jax.inference.placement`)
the weights are placed by the training rules and a batch is padded to a multiple of the ``data`` x ``fsdp``
devices and split over them: one compiled program per (image count, batch size, prompt bucket).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.checkpoints import converted as pretrained
from calico_jax.checkpoints import workdir as checkpoints
from calico_jax.core.config import Config
from calico_jax.core.preprocess import Preprocess
from calico_jax.core.tokens import IMAGE_TOKEN_INDEX, SEG_TOKEN
from calico_jax.data.processors import from_preprocess
from calico_jax.data.qformer_text import QFORMER_TOKENIZER_DIR, QFormerText, load_qformer_tokenizer
from calico_jax.data.tokenize import LLAVA_V1_SYSTEM, SampleTokenizer, load_tokenizer
from calico_jax.inference.generate import decode_loop, left_align
from calico_jax.inference.local_load import load_in_process
from calico_jax.inference.placement import MeshContext, local_mesh, place, put_batch, rows_multiple
from calico_jax.models.calico import Calico
from calico_jax.models.calico_layout import postprocess_masks
from calico_jax.models.inputs import CalicoInputs
from calico_jax.models.seg_routing import seg_hidden_index

log = logging.getLogger(__name__)


INFERENCE_FILE = "inference.json"     # optional, next to an exported model: its InferenceConfig defaults


@dataclasses.dataclass(frozen=True)
class InferenceConfig(Config):
    """Prompt and decoding settings (optionally stored as ``inference.json`` next to the weights). The image
    pre-processing is not here: it is the model's own (``CalicoConfig.preprocess``, stored with the weights), so
    it cannot disagree with training."""
    use_im_start_end: bool = True
    system: str = LLAVA_V1_SYSTEM
    max_new_tokens: int = 128
    mask_threshold: float = 0.0          # on the mask logits (SAM's convention)
    prompt_bucket: int = 32              # prompts are padded to a multiple of this many tokens


@dataclasses.dataclass
class PredictedMask:
    label: str
    image: int                           # 0-based image index
    mask: np.ndarray                     # bool [H, W] at the image's original size
    score: float


@dataclasses.dataclass
class Prediction:
    answer: str
    masks: list[PredictedMask]
    num_tokens: int
    num_unrouted: int = 0                # [SEG] without a valid (IMAGEk) -> no mask
    num_unlabeled: int = 0               # [SEG] without a preceding <p> ... </p> -> label ""
    truncated: bool = False              # max_new_tokens reached before </s>


# ------------------------------------------------------------------------------------ jitted programs
@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "eos", "pad"))
def generate_program(params, inputs: CalicoInputs, *, module: Calico, max_new_tokens: int, eos: int, pad: int):
    """The predictor's generation program, which the AOT predict plan compiles as is: ``inputs`` holds the batch
    contract's "predict" fields (``spec(..., program="predict")``: the left-padded prompt, the images and their
    sizes, and the Q-Former's instruction tokens with ``qformer_text_input``) -> (tokens [B, G], lengths [B],
    final hidden states [B, G, D] of the generated tokens, SAM image embeddings [B, N, h, w, C])."""
    apply = functools.partial(module.apply, {"params": params})
    first = apply(inputs, max_new_tokens=max_new_tokens, method="prefill")
    out = decode_loop(first, lambda tok, cache: apply(tok, cache, method="decode_step"),
                      max_new_tokens=max_new_tokens, stop_token_ids=(eos,), pad_token_id=pad, return_hidden=True)
    sam_embeddings = apply(inputs.sam_pixel_values, method="sam_embeddings")
    return out.tokens, out.lengths, out.hidden_states, sam_embeddings


@functools.partial(jax.jit, static_argnames=("module", "mask_size"))
def mask_program(params, seg_hidden, image_embeddings, resized_hw, original_hw, *, module: Calico,
           mask_size: tuple[int, int]):
    low_res = module.apply({"params": params}, seg_hidden, image_embeddings,
                           method=lambda m, h, e: m.seg_low_res_masks(m.project_seg(h), e))
    return postprocess_masks(low_res, module.config.sam.image_encoder.img_size, resized_hw, original_hw, mask_size)


def _bucket(n: int, size: int) -> int:
    return max(size, -(-n // size) * size)


def plan_batches(image_counts: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sample indices -> batches: grouped by image count (ascending), in sample order within a group, chunks of
    ``batch_size``. Deterministic, so a resumed or multi-process run forms the very same batches."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(image_counts):
        if n < 1:
            raise ValueError(f"sample {i} has no images")
        groups.setdefault(n, []).append(i)
    return [idx[s:s + batch_size] for _, idx in sorted(groups.items()) for s in range(0, len(idx), batch_size)]


# ---------------------------------------------------------------------------------------- predictor
class Predictor:
    """``qformer_text``: the Q-Former's instruction tokenizer (:class:`calico_jax.data.qformer_text.QFormerText`),
    needed exactly when the model's ``qformer_text_input`` is on; it reads the same question as the LLM.
    ``mesh``: None (one device) or axis sizes over this process's devices, e.g. ``{"data": 4, "tensor": 2}``;
    ``dtype``: the weights' dtype for inference (None: as given)."""

    trained_max_images: int | None = None   # set by load_predictor from the checkpoint: warnings beyond it

    def __init__(self, module: Calico, params: Any, tokenizer, config: InferenceConfig = InferenceConfig(),
                 qformer_text=None, mesh: dict[str, int] | None = None, dtype: str | None = None):
        self.module, self.tokenizer = module, tokenizer
        self.mesh = None if mesh is None else local_mesh(mesh, module.config)
        self.params = place(module, params, self.mesh, dtype)
        if module.config.qformer_text_input and qformer_text is None:
            raise ValueError("the model has qformer_text_input on: pass its Q-Former tokenizer (qformer_text=; "
                             "load_predictor reads TOKENIZER/qformer_tokenizer/)")
        self.qformer_text = qformer_text if module.config.qformer_text_input else None
        self.config = c = config
        self.prompter = SampleTokenizer(tokenizer, max_len=1 << 20, use_im_start_end=c.use_im_start_end,
                                        system=c.system)
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        if self.seg_id != module.config.seg.token_id:
            raise ValueError(f"tokenizer [SEG] id {self.seg_id} != model seg.token_id {module.config.seg.token_id}")
        self.p_open, self.p_close = (tokenizer.convert_tokens_to_ids(t) for t in ("<p>", "</p>"))
        self.blip, self.dino, self.sam = from_preprocess(module.config.preprocess)

    # --- host-side pieces
    def prompt_ids(self, question: str, num_images: int) -> list[int]:
        ids = self.prompter.prompt_ids(question)
        if ids.count(IMAGE_TOKEN_INDEX) != num_images:
            raise ValueError(f"the prompt has {ids.count(IMAGE_TOKEN_INDEX)} <image> slots for {num_images} images")
        return ids

    def image_fields(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray | None]:
        """One sample's image fields of the batch contract (no row axis): ``pixel_values``, ``dino_pixel_values``
        (None without DINOv2 input), ``sam_pixel_values``, ``resized_hw`` and ``original_hw``."""
        sam = [self.sam(im) for im in images]
        return {"pixel_values": np.stack([self.blip(im) for im in images]),
                "dino_pixel_values": np.stack([self.dino(im) for im in images]) if self.dino is not None else None,
                "sam_pixel_values": np.stack([s["pixel_values"] for s in sam]),
                "resized_hw": np.asarray([s["reshaped_input_size"] for s in sam], np.int32),
                "original_hw": np.asarray([im.shape[:2] for im in images], np.int32)}

    def make_inputs(self, rows: Sequence[tuple[Sequence[np.ndarray], str]]) -> CalicoInputs:
        """(images, question) rows, each with the same image count -> :func:`generate_program`'s inputs (numpy):
        the prompts left-aligned and padded to a multiple of ``prompt_bucket``, the image fields, and the
        question's Q-Former tokens with ``qformer_text_input``."""
        tok, n = self.tokenizer, len(rows[0][0])
        prompts = [self.prompt_ids(q, n) for _, q in rows]
        width = max(len(p) for p in prompts)
        raw = np.full((len(rows), width), tok.pad_token_id, np.int64)
        mask = np.zeros((len(rows), width), bool)
        for r, p in enumerate(prompts):
            raw[r, :len(p)], mask[r, :len(p)] = p, True
        ids, mask = left_align(raw, mask, tok.pad_token_id, self.config.prompt_bucket)
        px = [self.image_fields(images) for images, _ in rows]
        fields = {k: None if px[0][k] is None else np.stack([p[k] for p in px]) for k in px[0]}
        text = {} if self.qformer_text is None else self.qformer_text.batch([q for _, q in rows])
        return CalicoInputs(input_ids=np.asarray(ids, np.int32), attention_mask=mask.astype(np.int32), **fields,
                            **text)

    def _parse(self, ids: list[int], num_images: int) -> tuple[list[tuple[int, int, str]], int, int]:
        """Generated ids -> [(hidden index, image, label)] per routed [SEG], unrouted and unlabeled counts."""
        position = self.module.config.seg.hidden_position
        out, unrouted, unlabeled, phrase, opened = [], 0, 0, None, None
        for j, t in enumerate(ids):
            if t == self.p_open:
                opened = j
            elif t == self.p_close and opened is not None:
                phrase, opened = self.tokenizer.decode(ids[opened + 1:j]).strip(), None
            elif t == self.seg_id:
                ident = self.prompter.identifier(ids, j, num_images)
                h = seg_hidden_index(j, position, generated=True)   # hidden[:, j] produced token j
                if ident is None or not 0 <= ident[1] < num_images or h >= len(ids):
                    unrouted += 1
                    continue
                unlabeled += phrase is None
                out.append((h, ident[1], phrase or ""))
        return out, unrouted, unlabeled

    # --- batch inference
    def padded_rows(self, batch_size: int) -> int:
        """Rows of a compiled batch: ``batch_size`` rounded up to a multiple of the devices the rows split over."""
        m = rows_multiple(self.mesh)
        return -(-max(batch_size, 1) // m) * m

    def predict(self, samples: Sequence[tuple[Sequence[np.ndarray], str]], batch_size: int = 1,
                progress: bool = False) -> list[Prediction]:
        """``samples``: (images as RGB uint8 [H, W, 3], question with one ``<image>`` per image) -> predictions
        in order. Rows of a batch share the image count; a short batch is padded with copies of its first row."""
        from tqdm import tqdm

        results: list[Prediction | None] = [None] * len(samples)
        bar = tqdm(total=len(samples), disable=not progress, desc="predict", unit="sample")
        for rows in plan_batches([len(images) for images, _ in samples], batch_size):
            for i, pred in zip(rows, self.predict_batch([samples[i] for i in rows], batch_size)):
                results[i] = pred
            bar.update(len(rows))
        bar.close()
        return results  # type: ignore[return-value]

    def predict_batch(self, batch: Sequence[tuple[Sequence[np.ndarray], str]], batch_size: int) -> list[Prediction]:
        """One batch (rows with the same image count, at most ``batch_size``) -> its predictions; padded to
        :meth:`padded_rows` rows with copies of its first row."""
        c, tok, n = self.config, self.tokenizer, len(batch[0][0])
        inputs = self.make_inputs(list(batch) + [batch[0]] * (self.padded_rows(batch_size) - len(batch)))
        with MeshContext(self.mesh):
            tokens, lengths, hidden, sam_emb = generate_program(
                self.params, put_batch(inputs, self.mesh), module=self.module, max_new_tokens=c.max_new_tokens,
                eos=int(tok.eos_token_id), pad=int(tok.pad_token_id))
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)

        preds, segs = [], []   # segs: (row, hidden index, image, label)
        for r in range(len(batch)):
            gen = tokens[r, :lengths[r]].tolist()
            truncated = not gen or gen[-1] != tok.eos_token_id
            text_ids = gen if truncated else gen[:-1]
            parsed, unrouted, unlabeled = self._parse(text_ids, n)
            segs += [(r, *p) for p in parsed]
            preds.append(Prediction(tok.decode(text_ids).strip(), [], len(gen), unrouted, unlabeled, truncated))
        if segs:
            self._decode_masks(segs, hidden, sam_emb, inputs, preds)
        return preds

    def _decode_masks(self, segs, hidden, sam_emb, inputs: CalicoInputs, preds) -> None:
        k = _bucket(len(segs), 8)
        pick = lambda f: np.asarray([f(s) for s in segs] + [f(segs[0])] * (k - len(segs)))  # noqa: E731
        r_idx, h_idx, i_idx = pick(lambda s: s[0]), pick(lambda s: s[1]), pick(lambda s: s[2])
        original = np.stack([inputs.original_hw[r, i] for r, i in zip(r_idx, i_idx)])
        resized = np.stack([inputs.resized_hw[r, i] for r, i in zip(r_idx, i_idx)])
        size = (_bucket(int(original[:, 0].max()), 64), _bucket(int(original[:, 1].max()), 64))
        with MeshContext(self.mesh):
            logits = mask_program(self.params, hidden[r_idx, h_idx], sam_emb[r_idx, i_idx], jnp.asarray(resized),
                                  jnp.asarray(original), module=self.module, mask_size=size)
        logits = np.asarray(logits)
        for j, (r, _, image, label) in enumerate(segs):
            h, w = original[j]
            lg = logits[j, :h, :w]
            m = lg > self.config.mask_threshold
            prob = 1.0 / (1.0 + np.exp(-lg[m].astype(np.float64)))
            preds[r].masks.append(PredictedMask(label, int(image), m, float(prob.mean()) if m.any() else 0.0))


# ------------------------------------------------------------------------------------------ loading
def load_predictor(path: str | Path, preprocess: Preprocess | None = None, *, mesh: dict[str, int] | None = None,
                   dtype: str | None = None, **overrides: Any) -> Predictor:
    """A :class:`Predictor` from an exported checkpoint (``python -m calico_jax.export``; also any ``calico``
    checkpoint from ``python -m convert calico-assemble`` with its tokenizer) or a training workdir (its newest
    checkpoint + frozen weights, :func:`calico_jax.checkpoints.workdir.restore_workdir`). ``preprocess``: what the
    caller means to feed; a difference from the checkpoint's is an error naming the fields. ``mesh``/``dtype``:
    see :class:`Predictor` (the weights stay in the checkpoint's dtype unless ``dtype`` is given). ``overrides``:
    :class:`InferenceConfig` fields (e.g. ``max_new_tokens``)."""

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt {path}: no such directory")
    meta = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if meta.get("format") == pretrained.FORMAT:
        if meta.get("model") != "calico":
            raise ValueError(f"{path}: a {meta.get('model')!r} checkpoint, not a calico one")
        # several processes: each reads the weights alone (orbax would restore them as the whole job)
        module, params, _ = pretrained.load(path) if jax.process_count() == 1 else load_in_process(path)
        tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if (path / INFERENCE_FILE).is_file():
            stored = json.loads((path / INFERENCE_FILE).read_text())
            overrides = {**InferenceConfig.from_dict(stored, where=str(path / INFERENCE_FILE)).to_dict(), **overrides}
    elif meta:
        run = checkpoints.restore_workdir(path)
        module, params, tok_dir = run.module, run.params, run.tokenizer_dir
    else:
        raise ValueError(f"{path}: neither a calico_jax checkpoint (config.json with format {pretrained.FORMAT!r}) "
                         "nor a training workdir (config.json + checkpoints)")
    if preprocess is not None:
        module.config.preprocess.check_same(preprocess, str(path))
    try:
        tokenizer = load_tokenizer(tok_dir)
        qformer_text = None
        if module.config.qformer_text_input:
            qformer_text = QFormerText(load_qformer_tokenizer(Path(tok_dir) / QFORMER_TOKENIZER_DIR),
                                       module.config.qformer_max_tokens)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no usable tokenizer in {tok_dir} ({e})") from None
    predictor = Predictor(module, params, tokenizer, InferenceConfig(**overrides), qformer_text, mesh=mesh,
                          dtype=dtype)
    # the most images per sample it was trained on (the export records it; a workdir's config says it)
    trained = ((meta.get("source") or {}).get("trained_max_images") if meta.get("format") == pretrained.FORMAT
               else (meta.get("data") or {}).get("max_images"))
    predictor.trained_max_images = int(trained) if trained else None
    return predictor
