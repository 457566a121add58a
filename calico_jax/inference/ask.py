"""Questions and answers in a person's terms, the same for the Python API and ``python -m calico_jax.predict``.

The model reads a prompt whose first turn names the images (``"The <image> (IMAGE1) and <image> (IMAGE2)
provide an overview of the pictures. "``, the training format) and writes its answer with grounding tokens:
``"<p> handle </p> [SEG] (IMAGE1)"``. This module builds the first and reads the second:

* :func:`build_question` -- a task name (``common-object`` / ``common_parts`` / ...; ``-`` and ``_`` both work) or
  a free question; the images preamble is added unless the question already has one ``<image>`` per image.
* :func:`ask` -- ``ask(predictor, images, task=... | prompt=...)``: builds the question, predicts, and returns an
  :class:`Answer`: the clean sentence, the masks, and warnings (an image that got no mask, more images than the
  model was trained on).
* :func:`readable` -- the sentence without ``<p>``, ``</p>``, ``[SEG]`` and ``(IMAGEk)``.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from calico_jax.data import pairs_schema
from calico_jax.data.pairs import PREFIX, QUESTIONS, images_phrase


class InputError(ValueError):
    """A bad request (no images, an unknown task, a prompt whose <image> slots do not match the images)."""


def task_name(name: str) -> str:
    """``common-parts`` or ``common_parts`` -> ``common_parts``; anything else is an :class:`InputError`."""
    try:
        return pairs_schema.task_name(name)
    except ValueError as e:
        raise InputError(str(e)) from None


def build_question(num_images: int, task: str | None = None, prompt: str | None = None) -> str:
    """The first user turn for ``num_images`` images: a task's question or ``prompt``, after the images preamble."""
    if num_images < 1:
        raise InputError("no images: give at least one")
    if (task is None) == (prompt is None):
        raise InputError("give either a task or a prompt")
    if task is not None:
        return PREFIX.format(images=images_phrase(num_images)) + QUESTIONS[task_name(task)][0]
    prompt = prompt.strip()
    if not prompt:
        raise InputError("the prompt is empty")
    slots = prompt.count("<image>")
    if slots == 0:
        return PREFIX.format(images=images_phrase(num_images)) + prompt
    if slots != num_images:
        raise InputError(f"the prompt has {slots} <image> slots but {num_images} images were given")
    return prompt


GROUNDING = re.compile(r"</?p>|\[SEG\]|\(IMAGE\d+\)")


def readable(text: str) -> str:
    """The answer as a sentence: grounding tokens out, spaces tidied (``"the <p> handle </p> [SEG] (IMAGE1) ."``
    -> ``"the handle."``)."""
    s = GROUNDING.sub(" ", text)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s+([,.;:!?])", r"\1", s)
    s = re.sub(r"([,;:])(?=[,.;:])", "", s)      # "handle, ." left by a removed [SEG]
    return s


@dataclasses.dataclass
class Answer:
    sentence: str                  # readable(raw)
    raw: str                       # the model's text, grounding tokens included
    masks: list[Any]               # PredictedMask: label, image (0-based), mask [H, W] bool, score
    warnings: list[str]
    prediction: Any                # the full Prediction (token counts, truncation)

    def mask_lines(self, files: Sequence[str] | None = None) -> list[str]:
        """One line per mask: label, image, score (and its file, when written)."""
        lines = []
        for k, m in enumerate(self.masks):
            where = f"  {files[k]}" if files is not None else ""
            lines.append(f"  {m.label or '(no label)':<24} image {m.image + 1}  score {m.score:.2f}"
                         f"  {int(np.count_nonzero(m.mask))} px{where}")
        return lines


def answer_warnings(prediction: Any, num_images: int, trained_max_images: int | None = None) -> list[str]:
    """What a person should know about an answer that the sentence does not say."""
    out = []
    missing = [k + 1 for k in range(num_images) if not any(m.image == k for m in prediction.masks)]
    if missing:
        which = ", ".join(str(k) for k in missing)
        out.append(f"no mask for image{'s' if len(missing) > 1 else ''} {which}")
    empty = sum(not np.any(m.mask) for m in prediction.masks)
    if empty:
        out.append(f"{empty} of the {len(prediction.masks)} masks {'is' if empty == 1 else 'are'} empty "
                   "(the model found nothing above its threshold)")
    if trained_max_images and num_images > trained_max_images:
        out.append(f"{num_images} images, but this model was trained on samples of at most {trained_max_images}: "
                   "expect worse answers")
    if prediction.num_unrouted:
        out.append(f"{prediction.num_unrouted} [SEG] without a valid (IMAGEk): no mask for them")
    if prediction.truncated:
        out.append("the answer hit max_new_tokens before its end")
    return out


def to_answer(prediction: Any, num_images: int, trained_max_images: int | None = None) -> Answer:
    return Answer(readable(prediction.answer), prediction.answer, list(prediction.masks),
                  answer_warnings(prediction, num_images, trained_max_images), prediction)


def ask(predictor: Any, images: Sequence[np.ndarray], task: str | None = None, prompt: str | None = None) -> Answer:
    """Asks ``predictor`` (:func:`~calico_jax.inference.predictor.load_predictor`) about ``images`` (RGB uint8
    arrays, in order) what ``python -m calico_jax.predict`` asks: a task's question or a free prompt."""
    question = build_question(len(images), task, prompt)
    prediction = predictor.predict([(list(images), question)])[0]
    return to_answer(prediction, len(images), getattr(predictor, "trained_max_images", None))
