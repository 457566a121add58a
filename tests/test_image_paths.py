"""The image-path parts of :mod:`calico_jax.models.image_paths`: one interface, today's parameter names.

Shapes only (``jax.eval_shape``: nothing is compiled or allocated): every registered part reports the token count
its encode produces, and the part's parameters sit at the top level of Calico's tree under the names the converters,
the torch export and the golden tree use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from calico_jax.core.config import ConfigError
from calico_jax.models import image_paths, init_variables
from calico_jax.models.calico import Calico, CalicoConfig
from calico_jax.models.cam import CamConfig
from calico_jax.models.cem import CemConfig
from calico_jax.models.clip import ClipVisionConfig

TINY_CLIP = ClipVisionConfig(image_size=28, patch_size=7, hidden_size=20, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=2)
# Every top-level name an image path may own, and the ones each part owns (with one leaf's shape each).
IMAGE_PATH_NAMES = {"vision_model", "qformer", "query_tokens", "language_projection", "linear_projection",
                    "vision_tower", "mm_projector_0", "mm_projector_2"}
OWNED = {"qformer": {"vision_model", "qformer", "query_tokens", "language_projection"},
         "linear": {"vision_model", "linear_projection"},
         "clip_mlp": {"vision_tower", "mm_projector_0", "mm_projector_2"}}
LEAF_SHAPES = {"qformer": {("query_tokens",): (1, 4, 24), ("language_projection", "kernel"): (24, 48)},
               "linear": {("linear_projection", "kernel"): (32, 48), ("linear_projection", "bias"): (48,)},
               "clip_mlp": {("mm_projector_0", "kernel"): (20, 48), ("mm_projector_2", "kernel"): (48, 48)}}


def config_for(name: str) -> CalicoConfig:
    """CalicoConfig.tiny with ``name`` as image path (no CAMs where the part offers none)."""
    if image_paths.IMAGE_PATHS[name].offers_cams:
        return CalicoConfig.tiny(image_path=name)
    extra = {"clip": TINY_CLIP, "cem": CemConfig(enabled=False)} if name == "clip_mlp" else {}
    return CalicoConfig.tiny(image_path=name, cam=CamConfig(layers=()), **extra)


def abstract_params(model: Calico):
    return jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0))["params"]


def nn_value(leaf):
    return getattr(leaf, "value", leaf)   # a logically partitioned param's box, else the array


def test_registry():
    assert set(image_paths.IMAGE_PATHS) == set(OWNED)
    for name, cls in image_paths.IMAGE_PATHS.items():
        assert cls.name == name and issubclass(cls, image_paths.ImagePath)
    assert [n for n, c in image_paths.IMAGE_PATHS.items() if c.offers_cams] == ["qformer"]


@pytest.mark.parametrize("name", sorted(OWNED))
def test_token_count_and_names(name):
    cfg = config_for(name)
    part = image_paths.for_config(cfg)
    model = Calico(cfg)
    params = abstract_params(model)

    # the part's names, at the top level, and none of another part's
    assert IMAGE_PATH_NAMES & set(params) == OWNED[name]
    for path, shape in LEAF_SHAPES[name].items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert nn_value(leaf).shape == shape, (path, nn_value(leaf).shape)

    # num_tokens == what encode produces, at the dummy input's size and at the pre-processing size
    s = part.pixel_size(cfg)
    assert model.dummy_inputs().pixel_values.shape[2:4] == (s, s)
    assert part.num_tokens(cfg) == cfg.num_image_tokens
    text = (jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), jnp.int32)) if cfg.qformer_text_input else (None, None)
    for size in {s, cfg.preprocess.blip_size}:
        x_global, tokens = jax.eval_shape(
            lambda p, x: model.apply({"params": p}, x, *text, method=Calico.encode_images), params,
            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
        assert tokens.shape == (2, cfg.num_image_tokens, cfg.llm.hidden_size), (size, tokens.shape)
        assert x_global.shape[0] == 2


def test_cam_parts_only_where_offered():
    """The CAMs re-query the Q-Former with its queries: only the qformer part has them; the config says so."""
    with pytest.raises(ConfigError, match="image_path 'linear' has no Q-Former for CAMs"):
        CalicoConfig.tiny(image_path="linear")
    with pytest.raises(ConfigError, match="image_path 'clip_mlp' has no Q-Former for CAMs"):
        CalicoConfig.tiny(image_path="clip_mlp", clip=TINY_CLIP)
    with pytest.raises(ConfigError, match="no Q-Former for CAMs"):
        image_paths.LinearPath().cam_parts(None)


def test_config_rules():
    with pytest.raises(ConfigError, match=r"image_path must be one of 'qformer', 'linear', 'clip_mlp', got 'clip'"):
        CalicoConfig.tiny(image_path="clip")
    with pytest.raises(ConfigError, match="qformer_text_input needs image_path 'qformer'"):
        config_for("linear").replace(qformer_text_input=True)
    with pytest.raises(ConfigError, match="qformer_text_input needs image_path 'qformer'"):
        CalicoConfig.tiny(qformer_text_input=True, vision=CalicoConfig.tiny().vision.replace(
            qformer=CalicoConfig.tiny().vision.qformer.replace(text_embeddings=False)))
    with pytest.raises(ConfigError, match="qformer_max_tokens 17 > the Q-Former's max_position_embeddings 16"):
        CalicoConfig.tiny(qformer_text_input=True, qformer_max_tokens=17)
    with pytest.raises(ConfigError, match="needs preprocess.blip_size == clip.image_size"):
        config_for("clip_mlp").replace(clip=TINY_CLIP.replace(image_size=42, patch_size=7))
