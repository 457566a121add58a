"""Which image and which hidden state each ``[SEG]`` uses: the one home of CALICO's [SEG] conventions.

Identifier: a ``[SEG]`` is followed by the name of the image it segments, ``" (IMAGE{k+1})"`` for the
k-th (0-based) image of the sample (:func:`identifier_text`). It is read in two places, both defined here:

* traced, inside the model: :func:`route_segs` matches ``SegConfig.identifier_ids`` (each identifier's
  token ids) after every [SEG], unless the caller routes on the host (``seg_image``);
* on the host: :func:`parse_identifier`, used by :class:`~calico_jax.data.tokenize.SampleTokenizer` for
  training samples (``TokenizedSample.seg_images``, which the pipeline checks against the pairs file's
  ``seg_image``) and by :class:`~calico_jax.inference.predictor.Predictor` on generated ids.

Hidden state (``SegConfig.hidden_position``): a [SEG]'s embedding is the final-norm hidden state
*before* it (GLaMM/LISA, the default) or *at* it. Its index depends on how the hidden states line up
with the tokens, see :func:`seg_hidden_index`:

=====================  ==========================================  ==========  ======
sequence               hidden[i] is the state ...                  "before"    "at"
=====================  ==========================================  ==========  ======
teacher-forced         at token i (the training forward)           p - 1       p
generated              whose logits produced generated token i     j           j + 1
=====================  ==========================================  ==========  ======

(p: the [SEG]'s position in the forward's sequence; j: its index among the generated tokens.)
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calico_jax.core.config import Config, ConfigError

HIDDEN_POSITIONS = ("before", "at")
IDENTIFIER_RE = re.compile(r"^\s*\(IMAGE(\d+)\)")
# The decoded-text fallback of parse_identifier looks at most this many tokens past the [SEG].
MAX_IDENTIFIER_TOKENS = 15


@dataclasses.dataclass(frozen=True)
class SegConfig(Config):
    token_id: int = 32004                                # [SEG] in GLaMM's tokenizer
    identifier_ids: tuple[tuple[int, ...], ...] = ()      # per image: ids of " (IMAGE{i+1})" after [SEG]
    hidden_position: str = "before"                      # "before" [SEG] (GLaMM/LISA) | "at" [SEG]
    projection: str = "mlp"                              # "mlp" (text_hidden_fcs) | "linear"
    max_seg: int = 8                                     # static [SEG] slots per sample
    unrouted: str = "drop"                               # "drop" | "first"

    def __post_init__(self):
        for field, value, options in (("hidden_position", self.hidden_position, HIDDEN_POSITIONS),
                                      ("projection", self.projection, ("mlp", "linear")),
                                      ("unrouted", self.unrouted, ("drop", "first"))):
            if value not in options:
                raise ConfigError(f"SegConfig: {field} must be one of {options}, got {value!r}")
        if any(len(t) == 0 for t in self.identifier_ids):
            raise ConfigError("SegConfig: an identifier has no tokens")


def identifier_text(k: int) -> str:
    """The text after a [SEG] that names the 0-based image ``k``."""
    return f" (IMAGE{k + 1})"


def seg_hidden_index(position, hidden_position: str, *, generated: bool = False):
    """Index of the hidden state a [SEG] at ``position`` uses (ints or integer arrays; see the module doc).

    ``generated=False``: ``position`` indexes a teacher-forced sequence whose hidden[i] belongs to token i.
    ``generated=True``: ``position`` = j indexes the generated tokens, hidden[:, j] produced token j."""
    if hidden_position not in HIDDEN_POSITIONS:
        raise ValueError(f"hidden_position must be one of {HIDDEN_POSITIONS}, got {hidden_position!r}")
    # "Before" the [SEG] is one state earlier than "at" it; a generated token's producer is one state
    # earlier than the token itself, so the generated index is one more than the teacher-forced one.
    offset = (-1 if hidden_position == "before" else 0) + (1 if generated else 0)
    return position + offset


# ------------------------------------------------------------------------------------------- host side
def identifier_token_ids(tokenizer, seg_token: str, seg_id: int, k: int) -> list[int]:
    """The usual token ids of image ``k``'s identifier right after a [SEG] (tokenized in context, since a
    sentencepiece tokenizer spells a word differently at the start of a text)."""
    ids = tokenizer(seg_token + identifier_text(k), add_special_tokens=False).input_ids
    return ids[ids.index(seg_id) + 1:]


def parse_identifier(ids: list[int], p: int, num_images: int, *, seg_id: int,
                     ident_ids: Callable[[int], list[int]],
                     decode: Callable[[Sequence[int]], str]) -> tuple[int, int] | None:
    """(end position exclusive, 0-based image) of the identifier after the [SEG] at ``ids[p]``, or None.

    Fast path: ``ident_ids(k)`` (:func:`identifier_token_ids`) for k < ``num_images``. Slow path, for a
    tokenizer that merged the identifier with what follows (e.g. ``")."``): decode growing spans, up to
    the next [SEG]. The image index is returned as written (the caller checks it against its images)."""
    for k in range(num_images):
        t = ident_ids(k)
        if ids[p + 1:p + 1 + len(t)] == t:
            return p + 1 + len(t), k
    for e in range(p + 1, min(len(ids), p + 1 + MAX_IDENTIFIER_TOKENS)):
        if ids[e] == seg_id:
            break
        m = IDENTIFIER_RE.match(decode(ids[p + 1:e + 1]))
        if m:
            return e + 1, int(m.group(1)) - 1
    return None


# -------------------------------------------------------------------------------------- in the model
def route_segs(input_ids: jax.Array, seg: SegConfig, num_valid_images: jax.Array,
               seg_image: jax.Array | None = None) -> dict[str, jax.Array]:
    """[SEG] slots [B, M] (M = ``seg.max_seg``, the first M [SEG]s of each row; extras are counted in
    ``num_dropped``): original ``position`` (-1 for an empty slot), target ``image``, ``valid`` and the
    ``num_unrouted`` / ``num_dropped`` counts [B].

    The image is the one whose ``seg.identifier_ids`` follow the [SEG], or ``seg_image`` [B, M] when
    given (host-side routing, -1 = none). A [SEG] without a valid image (no identifier matches, or it
    names an absent image) is unrouted: ``seg.unrouted="drop"`` gives it no mask, ``"first"`` sends it
    to image 0; either way it is counted."""
    b, t = input_ids.shape
    is_seg = input_ids == seg.token_id
    pos = jax.vmap(lambda m: jnp.nonzero(m, size=seg.max_seg, fill_value=-1)[0])(is_seg)
    present = pos >= 0
    if seg_image is None:
        image = _match_identifiers(input_ids, pos, seg.identifier_ids)
    else:
        image = jnp.asarray(seg_image, jnp.int32)
    routed = present & (image >= 0) & (image < num_valid_images[:, None])
    unrouted = present & ~routed
    if seg.unrouted == "first":
        image, valid = jnp.where(unrouted, 0, image), present & (num_valid_images[:, None] > 0)
    else:
        valid = routed
    return {"position": pos, "image": jnp.where(valid, image, 0).astype(jnp.int32), "valid": valid,
            "num_unrouted": jnp.sum(unrouted, axis=1),
            "num_dropped": jnp.sum(is_seg, axis=1) - jnp.sum(present, axis=1)}


def _match_identifiers(input_ids: jax.Array, pos: jax.Array,
                       identifier_ids: tuple[tuple[int, ...], ...]) -> jax.Array:
    """The first image whose identifier tokens follow each [SEG] at ``pos`` [B, M] (-1: none)."""
    if not identifier_ids:
        raise ValueError("no seg.identifier_ids in the config: pass seg_image (host-side routing)")
    t = input_ids.shape[1]
    width = max(len(p) for p in identifier_ids)
    table = np.full((len(identifier_ids), width), -1, np.int64)   # -1 pads a shorter identifier
    for i, p in enumerate(identifier_ids):
        table[i, :len(p)] = p
    idx = pos[..., None] + 1 + jnp.arange(width)                                    # [B, M, L]
    window = jnp.where(idx < t, jnp.take_along_axis(input_ids[:, None, :], jnp.minimum(idx, t - 1), axis=2), -2)
    ok = (window[:, :, None, :] == table) | (table == -1)                         # [B, M, K, L]
    match = jnp.all(ok, axis=-1)
    return jnp.where(jnp.any(match, -1), jnp.argmax(match, -1), -1)
