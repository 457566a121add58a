"""Tokenizer, special tokens and the ``llava_v1`` prompt format used by GLaMM/LISA and CALICO.

* :func:`load_tokenizer` opens a HF tokenizer saved next to a checkpoint (``tokenizer.json`` or a
  LLaMA sentencepiece model), pads with ``<unk>`` like LLaVA, and adds the grounding tokens.
* :data:`~calico_jax.core.tokens.SPECIAL_TOKENS` in GLaMM's order (``train.py::setup_tokenizer_and_special_tokens``):
  ``<im_start>``, ``<im_end>``, ``<bbox>``, ``<point>``, ``[SEG]``, ``<p>``, ``</p>`` -> ids
  32000..32006 on a 32000 LLaMA vocabulary. A tokenizer that already has them keeps its ids.
* :func:`llava_v1_prompt`: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...`` (sep " ", sep2 "</s>").
* :func:`tokenize_with_images`: each ``<image>`` becomes :data:`IMAGE_TOKEN_INDEX` (-200), the slot
  where the model splices the image tokens (LLaVA ``tokenizer_image_token``).
* :func:`build_tiny_tokenizer`: a small BPE tokenizer trained locally (no downloads) with LLaMA's
  conventions (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``▁`` word prefix, BOS prepended).
* :class:`SampleTokenizer`: one training sample (question with ``<image>`` slots, grounded answer)
  -> ``input_ids`` and ``labels`` (see its docstring for the masking and truncation rules).
"""
from __future__ import annotations

import os
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from calico_jax.core.tokens import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IM_END,
    IM_START,
    IMAGE_TOKEN_INDEX,
    SEG_TOKEN,
    SPECIAL_TOKENS,
)
from calico_jax.models.seg_routing import identifier_token_ids, parse_identifier

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("USER", "ASSISTANT")


def add_special_tokens(tokenizer) -> dict[str, int]:
    """Adds :data:`SPECIAL_TOKENS` in order (existing ones keep their ids); returns token -> id.

    The model's vocabulary must already cover ``len(tokenizer)``: GLaMM checkpoints (and so
    CALICO's) ship the grounding tokens in their embeddings (32007 rows), and the converters take
    ``vocab_size`` from the embedding shape.
    """
    vocab = tokenizer.get_vocab()
    for tok in SPECIAL_TOKENS:
        if tok not in vocab:
            # One at a time, so the order (and hence the ids) is GLaMM's.
            tokenizer.add_tokens([tok], special_tokens=True)
            vocab = tokenizer.get_vocab()
    return {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}


def load_tokenizer(path: str | os.PathLike, add_tokens: bool = True):
    """A HF tokenizer from a checkpoint directory; pad = unk (LLaVA), grounding tokens added."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    if add_tokens:
        add_special_tokens(tokenizer)
    return tokenizer


def llava_v1_prompt(turns: Sequence[tuple[str, str | None]], system: str = LLAVA_V1_SYSTEM) -> str:
    """``turns`` = [(user, assistant or None)]; a final None leaves ``ASSISTANT:`` open for generation."""
    out = system + " "
    for user, answer in turns:
        out += f"{ROLES[0]}: {user} "
        out += f"{ROLES[1]}: {answer}</s>" if answer is not None else f"{ROLES[1]}:"
    return out


def image_placeholder(use_im_start_end: bool = True) -> str:
    """The text standing for one image in a prompt (GLaMM wraps it in ``<im_start>``/``<im_end>``)."""
    return f"{IM_START}{DEFAULT_IMAGE_TOKEN}{IM_END}" if use_im_start_end else DEFAULT_IMAGE_TOKEN


def tokenize_with_images(prompt: str, tokenizer) -> list[int]:
    """Token ids with :data:`IMAGE_TOKEN_INDEX` for every ``<image>``; one BOS at the start."""
    chunks = [tokenizer(chunk, add_special_tokens=False).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk)
    return ids


DEFAULT_CORPUS = (
    "The images show a dog and a cat . The unique parts are the neck , the leg , the foot , the body , "
    "the tail , the head , the ear , the eye , the nose , the mouth , the wheel , the seat cushion , the "
    "handle , the screen , the keyboard , the wing , the window , the door , the roof . What are the common "
    "parts of the objects in the images ? Please segment the parts that differ . Sure , it is",
)


def build_tiny_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str] = DEFAULT_CORPUS,
                         vocab_size: int = 128):
    """Trains a small LLaMA-style BPE tokenizer on ``texts`` (plus the template words), adds the
    grounding tokens and saves it to ``out_dir``; :func:`load_tokenizer` reads it back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) + [llava_v1_prompt([("x", "y")]), "Image 1 2 3 4 5 6 7 8 9 0 ( ) \n"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    # Every letter, digit and common punctuation mark gets a token, so no prompt text maps to <unk>.
    alphabet = sorted(set(string.ascii_letters + string.digits + ".,?!()'\"-:;/<>[]\n"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", padding_side="left")
    add_special_tokens(fast)
    fast.save_pretrained(str(out_dir))
    return fast


# ------------------------------------------------------------------------------ training samples

@dataclass(frozen=True)
class TokenizedSample:
    """``input_ids``/``labels`` int32 [L] (L <= max_len); ``seg_images``: for each ``[SEG]`` in order,
    the 0-based image its identifier ``(IMAGEk)`` names; ``truncated``: the tail was cut (no [SEG],
    identifier or image lost)."""
    input_ids: np.ndarray
    labels: np.ndarray
    num_images: int
    seg_images: tuple[int, ...]
    truncated: bool = False


class SampleTokenizer:
    """(question, answer) -> :class:`TokenizedSample` in GLaMM's ``llava_v1`` training format.

    Sequence: ``<s>`` + ``SYSTEM USER: <question> ASSISTANT:`` + ``<answer>`` + ``</s>``, where each
    ``<image>`` of the question becomes ``<im_start>`` :data:`IMAGE_TOKEN_INDEX` ``<im_end>``
    (``use_im_start_end``) -- one slot per image, which the model widens to that image's tokens.
    The prompt part and the answer are tokenized separately and concatenated, i.e. exactly the ids
    generation sees (the prompt up to ``ASSISTANT:``, then the model's tokens); for LLaMA-style
    tokenizers this equals tokenizing the whole conversation (tested on the tiny tokenizer).

    ``labels`` = ``input_ids`` with every prompt position (BOS, system, question, image slots)
    set to :data:`IGNORE_INDEX`; the answer -- ``<p>``/``</p>``, every ``[SEG]`` and its
    identifier tokens -- and the final ``</s>`` are targets (unshifted: the model shifts).

    Truncation to ``max_len`` keeps a sample only if the cut loses no image slot, no ``[SEG]`` and
    no identifier of a kept ``[SEG]`` (and leaves at least one target); otherwise ``__call__``
    returns ``(None, kind, detail)`` with kind ``too_long_prompt`` or ``too_long_seg`` so the caller
    drops and counts it. A [SEG] whose identifier is missing or malformed -> ``bad_seg_identifier``.
    """

    def __init__(self, tokenizer, max_len: int, use_im_start_end: bool = True, system: str = LLAVA_V1_SYSTEM):
        self.tokenizer, self.max_len = tokenizer, int(max_len)
        self.use_im_start_end, self.system = use_im_start_end, system
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        if self.seg_id is None or self.seg_id == tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no [SEG] token; call add_special_tokens first")
        self._prompts: dict[str, list[int]] = {}   # few distinct prompts (templates x image counts)
        self._idents: dict[int, list[int]] = {}

    def prompt_text(self, question: str) -> str:
        q = question.replace(DEFAULT_IMAGE_TOKEN, image_placeholder(self.use_im_start_end))
        return llava_v1_prompt([(q, None)], self.system)

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            self._prompts[question] = tokenize_with_images(self.prompt_text(question), self.tokenizer)
        return self._prompts[question]

    def _ident_ids(self, k: int) -> list[int]:
        if k not in self._idents:
            self._idents[k] = identifier_token_ids(self.tokenizer, SEG_TOKEN, self.seg_id, k)
        return self._idents[k]

    def identifier(self, ids: list[int], p: int, n_img: int) -> tuple[int, int] | None:
        """(end position exclusive, image index) of the ``(IMAGEk)`` after the [SEG] at ``p``: the host-side
        parser of :mod:`calico_jax.models.seg_routing` with this tokenizer (training and inference alike)."""
        return parse_identifier(ids, p, n_img, seg_id=self.seg_id, ident_ids=self._ident_ids,
                                decode=self.tokenizer.decode)

    def __call__(self, question: str, answer: str):
        """-> ``(TokenizedSample, None, "")`` or ``(None, kind, detail)`` for a sample to drop."""
        prompt = self.prompt_ids(question)
        ids = prompt + self.tokenizer(answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
        n_img = prompt.count(IMAGE_TOKEN_INDEX)
        segs, seg_images = [p for p, t in enumerate(ids) if t == self.seg_id], []
        ends = []
        for j, p in enumerate(segs):
            ident = self.identifier(ids, p, n_img)
            if ident is None or not 0 <= ident[1] < n_img:
                return None, "bad_seg_identifier", f"[SEG] #{j} is not followed by (IMAGE1..{n_img})"
            ends.append(ident[0])
            seg_images.append(ident[1])
        truncated = len(ids) > self.max_len
        if truncated:
            if len(prompt) >= self.max_len:
                return None, "too_long_prompt", f"prompt {len(prompt)} tokens >= max_len {self.max_len}"
            if ends and ends[-1] > self.max_len:
                lost = sum(e > self.max_len for e in ends)
                return None, "too_long_seg", (f"{len(ids)} tokens > max_len {self.max_len} would cut "
                                              f"{lost} of {len(segs)} [SEG] (or an identifier)")
            ids = ids[:self.max_len]
        ids = np.asarray(ids, np.int32)
        labels = ids.copy()
        labels[:len(prompt)] = IGNORE_INDEX
        return TokenizedSample(ids, labels, n_img, tuple(seg_images), truncated), None, ""
