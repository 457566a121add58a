"""The image path 𝓘 of :class:`~calico_jax.models.calico.Calico`: interchangeable parts from pixels to visual tokens.

``CalicoConfig.image_path`` names one part of :data:`IMAGE_PATHS`:

* ``"qformer"`` (BLIP-2 / InstructBLIP, the paper): EVA ViT ``vision_model`` -> X_global; Q-Former ``qformer`` with
  the learnable ``query_tokens`` (S_I = ``vision.num_query_tokens``, 32) [+ the instruction text] ->
  ``language_projection``. The only part that offers the CAMs what they re-query: the Q-Former, its queries and
  the EVA features X_global.
* ``"linear"`` (the paper's "Q-Former replaced by a linear projection" ablation): every EVA token X_global at the
  native resolution (S_I = CLS + grid) -> ``linear_projection``.
* ``"clip_mlp"`` (GLaMM / LLaVA): CLIP patch tokens ``vision_tower`` (S_I = ``clip.num_patches``) ->
  ``mm_projector`` Linear-GELU-Linear (params ``mm_projector_0`` / ``mm_projector_2``).

One interface (:class:`ImagePath`): :meth:`~ImagePath.num_tokens` (S_I), :meth:`~ImagePath.pixel_size` (the side of
the model's dummy image), :meth:`~ImagePath.check` (the part's cross-field config rules), :meth:`~ImagePath.setup`
(its submodules) and :meth:`~ImagePath.encode` (pixels [n, H, W, 3] -> ``(x_global, image_tokens [n, S_I, D])``),
plus ``offers_cams`` / ``takes_text`` and :meth:`~ImagePath.cam_parts` for the CAMs.

Why plain strategy objects and not Linen modules: a part's parameters must keep the top-level names the converters,
the torch export and the golden tree use (``vision_model``, ``qformer``, ``query_tokens``, ...). A wrapping
``nn.Module`` nests its variables under its own name (``image_path/qformer/...``); ``nn.share_scope`` could undo that,
but then a module would own variables that live in its parent's scope, which is harder to follow. So a part is a
stateless object: :meth:`~ImagePath.setup` runs inside ``Calico.setup`` and assigns the submodules / params on the
Calico module itself (``setattr`` in ``setup`` names them exactly as ``self.x = ...`` does), and
:meth:`~ImagePath.encode` runs them on the bound Calico module. Submodules are lazy (only called ones get params);
``query_tokens`` is an eager setup param, created only by the qformer part.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import jax

from calico_jax.core.config import ConfigError
from calico_jax.models import layers
from calico_jax.models.blip2 import QUERY_TOKENS_INIT, image_features, query_tokens_shape, vision_parts
from calico_jax.models.clip import ClipVision
from calico_jax.models.eva_vit import EvaVit

# ``cfg`` below is a CalicoConfig and ``module`` a Calico (not imported: calico_config imports this module).
TEXT_INPUT_RULE = ("CalicoConfig: qformer_text_input needs image_path 'qformer' and a Q-Former with instruction "
                   "embeddings (vision.qformer.text_embeddings, the InstructBLIP layout)")


class CamParts(NamedTuple):
    """What the CAMs re-query (Eq. 8): the Q-Former 𝓠 and its learnable queries q [1, S_I, D_q]; they read
    the EVA features X_global that :meth:`ImagePath.encode` returns (fused by the CEM)."""

    qformer: Any
    query_tokens: jax.Array


class ImagePath(abc.ABC):
    """One image path; stateless (see the module docstring). Subclasses register in :data:`IMAGE_PATHS`."""

    name: ClassVar[str]
    offers_cams: ClassVar[bool] = False   # setup defines qformer + query_tokens over EVA's X_global
    takes_text: ClassVar[bool] = False    # encode reads the Q-Former instruction tokens (qformer_text_input)

    @abc.abstractmethod
    def num_tokens(self, cfg: Any) -> int:
        """S_I: visual tokens per image in the LLM sequence."""

    @abc.abstractmethod
    def pixel_size(self, cfg: Any) -> int:
        """Side of the square dummy image ``Calico.dummy_inputs`` gives this path (smallest valid input)."""

    def check(self, cfg: Any) -> None:
        """Cross-field rules of this path beyond the shared ones of :func:`check_config`; raises ConfigError."""
        return None   # none by default

    @abc.abstractmethod
    def setup(self, module: Any) -> None:
        """Inside ``Calico.setup``: assign this path's submodules / params on ``module`` under their names."""

    @abc.abstractmethod
    def encode(self, module: Any, pixel_values: jax.Array, qformer_input_ids: jax.Array | None = None,
               qformer_attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Pixels [n, H, W, 3] on the bound ``module`` -> (X_global [n, S_C, D_C], image tokens [n, S_I, D])."""

    def cam_parts(self, module: Any) -> CamParts:
        raise ConfigError(f"CalicoConfig: image_path {self.name!r} has no Q-Former for CAMs")


class QFormerPath(ImagePath):
    """BLIP-2 / InstructBLIP: X_global = EVA(image); f_image(𝓠(q, X_global[, text])) (HF's names)."""

    name = "qformer"
    offers_cams = True
    takes_text = True

    def num_tokens(self, cfg: Any) -> int:
        return cfg.vision.num_query_tokens

    def pixel_size(self, cfg: Any) -> int:
        return cfg.vision.vision.patch_size   # any grid works: the Q-Former's query count fixes S_I

    def check(self, cfg: Any) -> None:
        if cfg.qformer_text_input and not cfg.vision.qformer.text_embeddings:
            raise ConfigError(TEXT_INPUT_RULE)
        if cfg.qformer_text_input and cfg.qformer_max_tokens > cfg.vision.qformer.max_position_embeddings:
            raise ConfigError(f"CalicoConfig: qformer_max_tokens {cfg.qformer_max_tokens} > the Q-Former's "
                              f"max_position_embeddings {cfg.vision.qformer.max_position_embeddings}")

    def setup(self, module: Any) -> None:
        v = module.config.vision
        module.vision_model, module.qformer, module.language_projection = vision_parts(v, module.dtype)
        module.query_tokens = module.param("query_tokens", QUERY_TOKENS_INIT, query_tokens_shape(v))

    def encode(self, module, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        # By default no instruction text for the Q-Former (Eq. 2): the CAMs carry the prompt.
        if module.config.qformer_text_input and qformer_input_ids is None:
            raise ValueError("qformer_text_input is on: pass qformer_input_ids / qformer_attention_mask")
        out = image_features(module.vision_model, module.qformer, module.query_tokens, module.language_projection,
                             pixel_values, dtype=module.dtype, input_ids=qformer_input_ids,
                             attention_mask=qformer_attention_mask)
        return out["vision"], out["image_tokens"]

    def cam_parts(self, module: Any) -> CamParts:
        return CamParts(module.qformer, module.query_tokens)


class LinearPath(ImagePath):
    """The paper's ablation: all EVA tokens X_global -> ``linear_projection`` (no Q-Former, so no CAMs)."""

    name = "linear"

    def num_tokens(self, cfg: Any) -> int:
        return cfg.vision.vision.grid ** 2 + 1   # every EVA token at the native resolution (CLS + grid)

    def pixel_size(self, cfg: Any) -> int:
        return cfg.vision.vision.image_size      # the token count is the native grid's

    def setup(self, module: Any) -> None:
        module.vision_model = EvaVit(module.config.vision.vision, module.dtype)
        module.linear_projection = layers.dense(module.config.llm.hidden_size, (None, "embed"), name=None,
                                                dtype=module.dtype)

    def encode(self, module, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        x_global = module.vision_model(pixel_values)["last_hidden_state"]
        return x_global, module.linear_projection(x_global)


class ClipMlpPath(ImagePath):
    """GLaMM / LLaVA: CLIP patch tokens -> ``mm_projector`` (Linear, GELU, Linear); no Q-Former, so no CAMs."""

    name = "clip_mlp"

    def num_tokens(self, cfg: Any) -> int:
        return cfg.clip.num_patches

    def pixel_size(self, cfg: Any) -> int:
        return cfg.clip.image_size               # CLIP has a fixed position table

    def check(self, cfg: Any) -> None:
        if cfg.preprocess.blip_size != cfg.clip.image_size:
            raise ConfigError(f"CalicoConfig: image_path 'clip_mlp' needs preprocess.blip_size == clip.image_size "
                              f"({cfg.clip.image_size}, a fixed position table), got {cfg.preprocess.blip_size}")

    def setup(self, module: Any) -> None:
        module.vision_tower = ClipVision(module.config.clip, module.dtype)
        d = module.config.llm.hidden_size
        module.mm_projector = {"0": layers.dense(d, (None, "embed"), name=None, dtype=module.dtype),
                               "2": layers.dense(d, ("embed", "embed"), name=None, dtype=module.dtype)}

    def encode(self, module, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        feats = module.vision_tower(pixel_values)
        return feats, module.mm_projector["2"](layers.gelu(module.mm_projector["0"](feats)))


IMAGE_PATHS: dict[str, type[ImagePath]] = {p.name: p for p in (QFormerPath, LinearPath, ClipMlpPath)}


def for_config(cfg: Any) -> ImagePath:
    """The part ``cfg.image_path`` names (a CalicoConfig's name is already checked by :func:`check_config`)."""
    if cfg.image_path not in IMAGE_PATHS:
        raise ConfigError(f"CalicoConfig: image_path must be one of {', '.join(map(repr, IMAGE_PATHS))}, "
                          f"got {cfg.image_path!r}")
    return IMAGE_PATHS[cfg.image_path]()


def check_config(cfg: Any) -> None:
    """The image-path rules of a CalicoConfig: a known name, CAMs only on a part that offers them, the Q-Former
    instruction input only on a part that takes it, then the part's own :meth:`ImagePath.check`."""
    part = for_config(cfg)
    if cfg.cam.layers and not part.offers_cams:
        raise ConfigError(f"CalicoConfig: image_path {cfg.image_path!r} has no Q-Former for CAMs: set cam.layers=()")
    if cfg.qformer_text_input and not part.takes_text:
        raise ConfigError(TEXT_INPUT_RULE)
    part.check(cfg)
