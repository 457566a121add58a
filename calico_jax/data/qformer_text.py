"""The Q-Former's instruction text (InstructBLIP), used when ``CalicoConfig.qformer_text_input`` is on.

InstructBLIP's Q-Former reads the instruction next to its queries. Its tokenizer is ``bert-base-uncased`` with
``[DEC]`` as bos, as LAVIS's ``Blip2VicunaInstruct`` and the first author's LISA code build it
(``BertTokenizer.from_pretrained("bert-base-uncased", truncation_side="left")`` +
``add_special_tokens({"bos_token": "[DEC]"})``); an HF ``InstructBlipProcessor.save_pretrained`` directory keeps it
in ``qformer_tokenizer/``, which ``python -m convert hf-blip2`` copies to ``OUT/tokenizer/qformer_tokenizer/`` and
``calico-assemble`` on into the CALICO checkpoint's ``tokenizer/``.

* :func:`load_qformer_tokenizer`: that tokenizer, truncating from the left (the end of a long prompt is kept);
* :class:`QFormerText`: a sample's question -> fixed-length ``qformer_input_ids`` / ``qformer_attention_mask``
  (int32 [T_q], right-padded; T_q = ``CalicoConfig.qformer_max_tokens``, LAVIS's ``max_txt_len`` 128). The text
  is the question with its ``<image>`` placeholders removed (the identifiers ``(IMAGEk)`` stay);
* :func:`build_tiny_qformer_tokenizer`: a character-level BERT WordPiece vocabulary for tests and the tiny recipe.
"""
from __future__ import annotations

import os
import re
import string
from pathlib import Path

import numpy as np

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
QFORMER_KEYS = ("qformer_input_ids", "qformer_attention_mask")
IMAGE_PLACEHOLDER = "<image>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def load_qformer_tokenizer(path: str | os.PathLike):
    """The Q-Former tokenizer saved at ``path`` (left truncation; ``[DEC]`` added as bos if it has none)."""
    from transformers import AutoTokenizer
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Q-Former tokenizer directory {path} is missing (qformer_text_input needs the "
                                f"InstructBLIP processor's {QFORMER_TOKENIZER_DIR}/ files)")
    tok = AutoTokenizer.from_pretrained(str(path), truncation_side="left")
    if tok.bos_token is None:
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def instruction_text(question: str) -> str:
    return re.sub(r"\s+", " ", question.replace(IMAGE_PLACEHOLDER, " ")).strip()


class QFormerText:
    """question -> ``{"qformer_input_ids": int32 [T_q], "qformer_attention_mask": int32 [T_q]}``."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, int(max_len)

    def __call__(self, question: str) -> dict[str, np.ndarray]:
        enc = self.tokenizer(instruction_text(question), truncation=True, max_length=self.max_len,
                             padding="max_length")
        return {"qformer_input_ids": np.asarray(enc["input_ids"], np.int32),
                "qformer_attention_mask": np.asarray(enc["attention_mask"], np.int32)}

    def batch(self, questions: list[str]) -> dict[str, np.ndarray]:
        rows = [self(q) for q in questions]
        return {k: np.stack([r[k] for r in rows]) for k in QFORMER_KEYS}


def build_tiny_qformer_tokenizer(out_dir: str | os.PathLike):
    """A lower-case BERT tokenizer whose WordPiece vocabulary is the specials, a-z, 0-9, ``##a``..``##z``, ``##0``..
    ``##9`` and ``()?.,``: every prompt of the synthetic set tokenizes without ``[UNK]``; 83 tokens."""
    from transformers import BertTokenizer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = [*BERT_SPECIALS, *chars, *(f"##{c}" for c in chars), *"()?.,"]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(out / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    tok.save_pretrained(str(out))
    return tok
