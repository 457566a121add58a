"""Label cleaning before the label metrics (SS, S-IoU, Recall's label test): one scheme per protocol.

* ``calico`` (our default, :func:`normalize_label`): on both sides ``_ : , . ( )`` become spaces, then
  lower case, runs of spaces collapsed. Our own choice, symmetric so that a label scores the same
  against itself whichever side it is on.
* ``osprey``: what Osprey's evaluation (``osprey/eval/lvis_paco_eval.py``, ``LVIS_PACO_EVAL.eval``) does,
  which is asymmetric: the ground-truth category has ``_`` and ``:`` replaced by spaces
  (:func:`osprey_gt`); the prediction is stripped, cut to ``text.split(':')[1]`` when it holds a ``:``
  (the text between the first and the second colon), then ``.``, ``:`` and ``,`` become spaces
  (:func:`osprey_pred`). Parentheses and, in the prediction, ``_`` are kept. Both sides are lower-cased
  for S-IoU only (``SemanticIOU(outputs.lower(), category.lower())``); SS encodes them as they are.
* ``none``: labels as written (GLaMM's Recall compares the raw phrases).
"""
from __future__ import annotations

import re
from collections.abc import Callable

CLEANINGS = ("calico", "osprey", "none")
_LABEL_PUNCT = re.compile(r"[_:,.()]")

Clean = Callable[[str], str]


def normalize_label(label: str) -> str:
    """Our (``calico``) label normalisation: ``_ : , . ( )`` -> space, lower-case, strip (spaces collapsed)."""
    return " ".join(_LABEL_PUNCT.sub(" ", str(label)).lower().split())


def osprey_gt(label: str) -> str:
    """Osprey's ground-truth category cleaning: ``_`` and ``:`` -> space (nothing else)."""
    return str(label).replace("_", " ").replace(":", " ")


def osprey_pred(text: str) -> str:
    """Osprey's prediction cleaning: strip; ``split(':')[1]`` if a ``:`` occurs; ``. : ,`` -> space."""
    text = str(text).strip()
    if ":" in text:
        text = text.split(":")[1]
    return text.replace(".", " ").replace(":", " ").replace(",", " ")


def _lower(fn: Clean) -> Clean:
    return lambda s: fn(s).lower()


def cleaners(scheme: str, metric: str) -> tuple[Clean, Clean]:
    """``(clean_prediction, clean_ground_truth)`` of ``scheme`` for ``metric`` (``"ss"``, ``"siou"``, ``"recall"``)."""
    if scheme == "calico":
        return normalize_label, normalize_label
    if scheme == "osprey":
        return (_lower(osprey_pred), _lower(osprey_gt)) if metric == "siou" else (osprey_pred, osprey_gt)
    if scheme == "none":
        return str, str
    raise ValueError(f"label cleaning {scheme!r}; expected one of {CLEANINGS}")


__all__ = ["CLEANINGS", "normalize_label", "osprey_gt", "osprey_pred", "cleaners"]
