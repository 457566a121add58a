"""Tokenizer, special tokens and the ``llava_v1`` prompt format used by GLaMM/LISA and CALICO.

* :func:`load_tokenizer` opens a HF tokenizer saved next to a checkpoint (``tokenizer.json`` or a
  LLaMA sentencepiece model), pads with ``<unk>`` like LLaVA, and adds the grounding tokens.
* :data:`SPECIAL_TOKENS` in GLaMM's order (``train.py::setup_tokenizer_and_special_tokens``):
  ``<im_start>``, ``<im_end>``, ``<bbox>``, ``<point>``, ``[SEG]``, ``<p>``, ``</p>`` -> ids
  32000..32006 on a 32000 LLaMA vocabulary. A tokenizer that already has them keeps its ids.
* :func:`llava_v1_prompt`: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...`` (sep " ", sep2 "</s>").
* :func:`tokenize_with_images`: each ``<image>`` becomes :data:`IMAGE_TOKEN_INDEX` (-200), the slot
  where the model splices the image tokens (LLaVA ``tokenizer_image_token``).
* :func:`build_tiny_tokenizer`: a small BPE tokenizer trained locally (no downloads) with LLaMA's
  conventions (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``▁`` word prefix, BOS prepended).
"""
from __future__ import annotations

import os
import string
from typing import Iterable, Sequence

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<im_start>", "<im_end>"
SEG_TOKEN = "[SEG]"
SPECIAL_TOKENS = (IM_START, IM_END, "<bbox>", "<point>", SEG_TOKEN, "<p>", "</p>")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("USER", "ASSISTANT")


def add_special_tokens(tokenizer) -> dict[str, int]:
    """Adds :data:`SPECIAL_TOKENS` in order (existing ones keep their ids); returns token -> id.

    The caller grows the model's embeddings to ``len(tokenizer)`` with
    :func:`calico_jax.models.llama.resize_token_embeddings` (new rows = mean of the old ones).
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
