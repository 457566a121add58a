"""The CALICO batch contract: what the model reads (:class:`CalicoInputs`), what its loss compares with
(:class:`CalicoTargets`) and, per config, each field's shape, dtype and logical axes (:func:`spec`).

One vocabulary everywhere. The grain pipeline (:mod:`calico_jax.data.pipeline`) emits a flat dict of numpy arrays
whose keys are these field names; the training task splits it (:func:`split`) and calls
``Calico.__call__(inputs, labels=targets.labels)``; the predictor builds a :class:`CalicoInputs` itself; the dry run,
the AOT plans and the benchmarks build abstract inputs with :func:`abstract` over :func:`spec`. A new field is one
declaration below (its dims, dtype, the programs that carry it and the switch it needs) plus its producers.

Dims (B rows, N image slots, T tokens, M = ``seg.max_seg`` [SEG] slots; sizes from ``config.preprocess``):
``Hc`` = ``blip_size`` (EVA / CLIP input), ``Hd`` = ``dinov2_side``, ``S`` = ``sam_size``, ``h, w, C`` = the SAM
image embedding (``prompt_encoder.image_embedding_size``, ``embed_dim``), ``Hm`` = ``mask_size``, ``Tq`` =
``qformer_max_tokens``. Logical axes: ``B`` is ``"batch"``, ``T`` and ``Tq`` are ``"length"`` (the names of
:data:`calico_jax.parallel.sharding.RULES`), every other axis is unnamed (replicated).

Programs: ``"train"`` -- every field the pipeline emits (inputs, targets, bookkeeping); ``"predict"`` -- what the
predictor's generation program takes (:func:`calico_jax.inference.predictor.generate_program`: the prompt, the
images and their sizes; no routing, no targets).

Bookkeeping: ``task`` and ``sample_index`` travel on :class:`CalicoTargets` (they describe the example, like the
targets; neither the model nor the loss reads them; ``sample_index`` finds a row's Q-Former instruction).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

if TYPE_CHECKING:
    from calico_jax.models.calico_config import CalicoConfig

PROGRAMS = ("train", "predict")
AXES = {"B": "batch", "T": "length", "Tq": "length"}   # dim -> logical axis name; others unnamed


def _field(dims: str, dtype: Any, *, programs: tuple[str, ...] = PROGRAMS, when: str | None = None) -> Any:
    """A contract field (default None): ``dims`` its shape in the module doc's dim names, ``when`` the switch of
    :func:`spec` it needs (see ``_switches``)."""
    return struct.field(default=None, metadata={"dims": tuple(dims.split()), "dtype": dtype, "programs": programs,
                                                 "when": when})


@struct.dataclass
class CalicoInputs:
    """Everything ``Calico.__call__`` / ``prefill`` read; optional fields are None."""
    # int32 [B, T]: token ids, one ``image_token_index`` (-200) placeholder per valid image, in image order
    input_ids: Any = _field("B T", jnp.int32)
    # int32 [B, T]: 1 on real tokens (the pipeline right-pads, the predictor left-pads)
    attention_mask: Any = _field("B T", jnp.int32)
    # float32 [B, N, Hc, Hc, 3]: EVA-CLIP / Q-Former input (BLIP-normalised; CLIP's with image_path "clip_mlp")
    pixel_values: Any = _field("B N Hc Hc 3", jnp.float32)
    # float32 [B, N, Hd, Hd, 3]: DINOv2 input (the CEM's X_semantic); only with ``preprocess.dinov2_size``
    dino_pixel_values: Any = _field("B N Hd Hd 3", jnp.float32, when="dinov2")
    # float32 [B, N, S, S, 3]: SAM input, normalised, zero-padded bottom/right
    sam_pixel_values: Any = _field("B N S S 3", jnp.float32, when="sam_pixels")
    # float32 [B, N, h, w, C]: the frozen SAM encoder's output instead of sam_pixel_values (precomputed)
    sam_image_embeddings: Any = _field("B N h w C", jnp.float32, programs=("train",), when="sam_embeddings")
    # bool [B, N]: False for padding image slots (absent: every placeholder's image is valid)
    image_valid: Any = _field("B N", jnp.bool_, programs=("train",))
    # int32 [B, N, 2]: (h, w) of the image inside sam_pixel_values before padding (SAM's reshaped_input_size)
    resized_hw: Any = _field("B N 2", jnp.int32)
    # int32 [B, N, 2]: (h, w) the masks of image i are produced at, top-left on the Hm x Hm mask grid: the valid
    # region of the pipeline's masks (longest side resized to Hm); the original size where Hm holds the image
    mask_hw: Any = _field("B N 2", jnp.int32, programs=("train",))
    # int32 [B, N, 2]: (H, W) of each image as loaded (0 for padding); not read by the model: host-side
    # post-processing back to the image (crop the mask_hw region, resize to original_hw)
    original_hw: Any = _field("B N 2", jnp.int32)
    # int32 [B]: prompt length of each row (last prompt token = prompt_lengths - 1; absent: the first target of
    # ``labels`` minus one, else the last attended token)
    prompt_lengths: Any = _field("B", jnp.int32, programs=("train",), when="prompt_lengths")
    # int32 [B, M]: image (0-based, within the sample) of the k-th [SEG], host-side routing (-1: none; absent:
    # the identifier tokens after each [SEG] route it)
    seg_image: Any = _field("B M", jnp.int32, programs=("train",))
    # int32 [B, Tq]: the Q-Former's instruction tokens (InstructBLIP); only with ``qformer_text_input``
    qformer_input_ids: Any = _field("B Tq", jnp.int32, when="qformer_text")
    # int32 [B, Tq]: 1 on the instruction's real tokens
    qformer_attention_mask: Any = _field("B Tq", jnp.int32, when="qformer_text")


@struct.dataclass
class CalicoTargets:
    """What the loss and the evaluation compare the model's output with, and two bookkeeping fields."""
    # int32 [B, T]: input_ids with the prompt, image slots and padding = -100 (unshifted: position t predicts
    # token t, the model shifts); the answer, every [SEG] and its "(IMAGEk)" identifier, </s> are targets
    labels: Any = _field("B T", jnp.int32, programs=("train",))
    # bool [B, M, Hm, Hm]: ground truth of the k-th [SEG] on the mask grid (the image's valid region
    # [:h, :w] = mask_hw of its image, padded with False)
    masks: Any = _field("B M Hm Hm", jnp.bool_, programs=("train",))
    # bool [B, M]: True for the first (number of [SEG] in input_ids) entries
    mask_valid: Any = _field("B M", jnp.bool_, programs=("train",))
    # int32 [B]: bookkeeping: index into calico_jax.data.pairs.TASKS
    task: Any = _field("B", jnp.int32, programs=("train",))
    # int32 [B]: bookkeeping: index of the sample in its pairs file
    sample_index: Any = _field("B", jnp.int32, programs=("train",))


GROUPS = (CalicoInputs, CalicoTargets)


class Field(NamedTuple):
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]   # logical axis names (calico_jax.parallel.sharding.RULES); None: unnamed


def names(cls: type = CalicoInputs) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _switches(config: CalicoConfig, sam_embeddings: bool, prompt_lengths: bool) -> dict[str, bool]:
    return {"dinov2": bool(config.preprocess.dinov2_size), "qformer_text": bool(config.qformer_text_input),
            "sam_pixels": not sam_embeddings, "sam_embeddings": sam_embeddings, "prompt_lengths": prompt_lengths}


def spec(config: CalicoConfig, rows: int, num_images: int, num_tokens: int, *, program: str = "train",
         sam_embeddings: bool = False, prompt_lengths: bool = False) -> dict[str, Field]:
    """name -> :class:`Field` of every field ``program`` carries for ``config`` (``rows`` x ``num_images`` image
    slots x ``num_tokens`` tokens), inputs then targets. ``sam_embeddings``: precomputed SAM image embeddings in
    place of the SAM pixels; ``prompt_lengths``: the rows' prompt lengths too."""
    if program not in PROGRAMS:
        raise ValueError(f"spec: program {program!r} unknown; known: {PROGRAMS}")
    pre, (h, w) = config.preprocess, config.sam.prompt_encoder.image_embedding_size
    dims = {"B": rows, "N": num_images, "T": num_tokens, "M": config.seg.max_seg, "Hc": pre.blip_size,
            "Hd": pre.dinov2_side, "S": pre.sam_size, "h": h, "w": w, "C": config.sam.prompt_encoder.embed_dim,
            "Hm": pre.mask_size, "Tq": config.qformer_max_tokens}
    on = _switches(config, sam_embeddings, prompt_lengths)
    out = {}
    for group in GROUPS:
        for f in dataclasses.fields(group):
            meta = f.metadata
            if program in meta["programs"] and (meta["when"] is None or on[meta["when"]]):
                out[f.name] = Field(tuple(dims[d] if d in dims else int(d) for d in meta["dims"]), meta["dtype"],
                                    tuple(AXES.get(d) for d in meta["dims"]))
    return out


def abstract(fields: Mapping[str, Field], sharding: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
    """{name: ShapeDtypeStruct}; ``sharding``: one for every field, a callable ``Field -> sharding``, or None."""
    pick = sharding if callable(sharding) else lambda _: sharding
    return {k: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=pick(f)) for k, f in fields.items()}


def split(batch: Mapping[str, Any]) -> tuple[CalicoInputs, CalicoTargets]:
    """A flat batch dict (the pipeline's, or :func:`abstract`'s) -> (inputs, targets); a key that is no contract
    field is an error (an old or misspelt name would otherwise be silently dropped)."""
    unknown = sorted(set(batch) - {n for g in GROUPS for n in names(g)})
    if unknown:
        raise KeyError(f"batch keys {unknown} are not CALICO contract fields (calico_jax.models.inputs)")
    return tuple(g(**{k: batch[k] for k in names(g) if k in batch}) for g in GROUPS)   # type: ignore[return-value]


def as_dict(x: CalicoInputs | CalicoTargets) -> dict[str, Any]:
    """The fields that are set (not None), by name."""
    return {k: v for k in names(type(x)) if (v := getattr(x, k)) is not None}
